"""Run a gateway app under uvicorn in a background thread, for the tests that talk HTTP to it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from gateway.serving import listen, uvicorn_config
from gateway.settings import HttpSettings


@contextmanager
def serve_in_thread(
    app: FastAPI,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 180.0,
    http: HttpSettings | None = None,
) -> Iterator[str]:
    """Serve ``app`` on a free loopback port until the block exits; yields its base URL.

    The server is configured as ``palm-serve serve`` configures its own (:mod:`gateway.serving`), with
    ``http`` limits (the defaults unless given).

    Raises:
        RuntimeError: the server did not finish its startup (lifespan) within ``startup_timeout_s``.
    """
    listener = listen(host, 0)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, http or HttpSettings(), "warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see the log for the lifespan error)")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            raise RuntimeError(f"uvicorn did not start within {startup_timeout_s:.0f}s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        listener.close()

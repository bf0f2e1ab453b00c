"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread that verifies every
request with the ``standardwebhooks`` library (the reference implementation, not our signing code)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Reply:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Received:
    id: str
    headers: dict[str, str]
    body: dict[str, Any]
    verified: bool
    status: int
    path: str


class Receiver:
    """Verifies each request against every secret in ``secrets``, each alone (a rotation is proven by a
    receiver that lists the old and the new secret); an empty list checks nothing. Answers from
    ``script`` in order, then ``Reply()`` (204); unverified requests get 401. ``accepted`` counts 2xx
    answers by ``webhook-id``.
    """

    def __init__(self, secrets: list[str], port: int = 0, script: list[Reply] | None = None) -> None:
        self.secrets = secrets
        self.script = list(script or [])
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = True
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                    except WebhookVerificationError:
                        verified = False
                with receiver.lock:
                    reply = receiver.script.pop(0) if receiver.script else Reply()
                if not verified:
                    reply = Reply(401)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                with receiver.lock:
                    receiver.received.append(
                        Received(
                            headers.get("webhook-id", ""),
                            headers,
                            json.loads(body or b"null"),
                            verified,
                            reply.status,
                            self.path,
                        )
                    )
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                with suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/palm"

    @property
    def accepted(self) -> Counter[str]:
        with self.lock:
            return Counter(r.id for r in self.received if r.verified and 200 <= r.status < 300)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.received if r.verified and 200 <= r.status < 300]


@contextmanager
def receiving(secrets: list[str], port: int = 0, script: list[Reply] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(secrets, port, script)
    thread = threading.Thread(target=receiver.server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(10)

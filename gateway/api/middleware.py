"""ASGI middleware: request ids and HTTP metrics by route template; deadlines on request bodies."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import RequestTimeout
from gateway.logs import request_id_var
from gateway.metrics import Metrics
from gateway.settings import HttpSettings

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class ObservabilityMiddleware:
    """Counts and times every HTTP request and echoes/assigns ``X-Request-ID``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"")
        request_id = incoming if _SAFE_ID.match(incoming) else secrets.token_hex(8).encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        method = scope.get("method", "GET")
        entry = {
            "type": "http",
            "path": scope["path"],
            "root_path": scope.get("root_path", ""),
            "method": method,
        }
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id)]
            await send(message)

        self.metrics.http_inflight.inc()
        token = request_id_var.set(request_id.decode())
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_inflight.dec()
            elapsed = time.perf_counter() - start
            route = route_template(scope, entry)
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_latency.labels(route, method).observe(elapsed)
            logger.info(
                "%s %s %s %.1fms",
                method,
                route,
                status,
                elapsed * 1000,
                extra={"route": route, "status": status, "duration_ms": round(elapsed * 1000, 1)},
            )
            request_id_var.reset(token)


def route_template(scope: Scope, entry: Scope) -> str:
    """The path template of the route that served ``scope`` (``/v1/jobs/{job_id}``), or ``unmatched``.

    FastAPI's own routes record themselves in the scope; plain Starlette routes and mounts (the
    OpenAPI document, static files) are matched here against the app's routes, with ``entry``: the
    path as the request arrived (a mount rewrites it in the scope).
    """
    route = scope.get("route")
    if route is None:
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(entry)
            if match is Match.FULL:
                route = candidate
                break
    return str(getattr(route, "path", "unmatched")) if route is not None else "unmatched"


class BodyGuard:
    """Deadlines on reading a request body, and a closed connection after an answer given early.

    Every ``receive`` of body bytes must return within ``body_idle_timeout_s``, and once
    ``body_grace_s`` has passed the body must have averaged at least ``body_min_rate_bytes`` per second
    (the deadline moves out by one second per ``body_min_rate_bytes`` received, as nginx and Apache's
    mod_reqtimeout do). A late body raises :class:`RequestTimeout` in whoever reads it (408). A
    response that starts before the request body was read whole carries ``Connection: close``: the
    rest of the body is not read, so the connection cannot serve another request.
    """

    def __init__(self, app: ASGIApp, limits: HttpSettings) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        has_body = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
        limits = self.limits
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        complete = not has_body

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            now = loop.time()
            budget = started + limits.body_grace_s - now
            if limits.body_min_rate_bytes:
                budget += received / limits.body_min_rate_bytes
            timeout = min(limits.body_idle_timeout_s, budget)
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(_too_slow(limits, received, loop.time() - started)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, guarded_receive, closing_send)


def _too_slow(limits: HttpSettings, received: int, elapsed: float) -> str:
    return (
        f"the request body stalled: {received} bytes in {elapsed:.1f} s; a body may pause at most "
        f"{limits.body_idle_timeout_s:g} s and must average {limits.body_min_rate_bytes} bytes/s after "
        f"{limits.body_grace_s:g} s"
    )

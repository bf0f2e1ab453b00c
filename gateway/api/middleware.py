"""ASGI middleware: request ids and HTTP metrics, labelled by route template (bounded cardinality)."""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.logs import request_id_var
from gateway.metrics import Metrics

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

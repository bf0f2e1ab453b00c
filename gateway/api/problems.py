"""The one RFC 9457 problem+json handler: every error, ours or the framework's, as problem+json."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.errors import PROBLEM_JSON, TYPE_BASE, ClientClosedRequest, GatewayError

logger = logging.getLogger(__name__)


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """Build one RFC 9457 problem+json response."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error, ours or the framework's, through problem+json."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        if exc.status >= 500:
            logger.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.detail)
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            slug=exc.slug,
            instance=request.url.path,
            headers=exc.headers(),
            **exc.extensions,
        )

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return problem(
            exc.status_code,
            _reason(exc.status_code),
            str(exc.detail),
            instance=request.url.path,
            headers=dict(exc.headers or {}),
        )

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return problem(
            422,
            "Invalid request",
            detail,
            slug="invalid-parameter",
            instance=request.url.path,
            errors=errors,
        )

    async def on_client_gone(request: Request, exc: Exception) -> JSONResponse:
        # Nobody reads this answer; it is what the logs and metrics record (nginx's 499).
        logger.info("%s %s: the client closed the connection", request.method, request.url.path)
        return problem(
            ClientClosedRequest.status,
            ClientClosedRequest.title,
            "The client closed the connection before the response.",
            slug=ClientClosedRequest.slug,
            instance=request.url.path,
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500,
            "Internal error",
            "The server hit an unexpected condition; the error was logged.",
            slug="internal-error",
            instance=request.url.path,
        )

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"

"""FastAPI dependencies that yield the request's :class:`Principal` once it holds a scope.

The app's lifespan puts its :class:`~gateway.auth.authenticator.Authenticator` on ``app.state``; each
dependency below is one function object, so FastAPI runs it once per request however many times a
route and its router name it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from gateway.auth.authenticator import Authenticator
from gateway.auth.principal import ANONYMOUS, Principal, Scope


def _requiring(scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
    async def principal(request: Request) -> Principal:
        authenticator: Authenticator = request.app.state.authenticator
        return await authenticator.authenticate(request.headers, scope)

    principal.__name__ = f"principal_with_{scope.value}"
    return principal


require_predict = _requiring(Scope.predict)
require_jobs = _requiring(Scope.jobs)
require_admin = _requiring(Scope.admin)


async def metrics_access(request: Request) -> Principal:
    """``/metrics``: open, unless ``PALM_AUTH__PROTECT_METRICS`` asks for a key with ``admin``."""
    authenticator: Authenticator = request.app.state.authenticator
    if not authenticator.protect_metrics:
        return ANONYMOUS
    return await authenticator.authenticate(request.headers, Scope.admin)

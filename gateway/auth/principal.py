"""The caller of a request: a tenant, the scopes its key grants, and the key's id."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import GatewayError

REALM = "palm-serve"


class Scope(StrEnum):
    """What a key may do: ``predict`` (``/v1/predict``), ``jobs`` (``/v1/jobs``), ``admin`` (operations,
    e.g. ``/metrics`` when it is protected)."""

    predict = "predict"
    jobs = "jobs"
    admin = "admin"


ALL_SCOPES = frozenset(Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]
    key_id: str | None
    """``None`` when authentication is off."""


ANONYMOUS = Principal(tenant="default", scopes=ALL_SCOPES, key_id=None)
"""Everyone, when ``PALM_AUTH__MODE=off``: one tenant holding every scope."""


class NotAuthenticated(GatewayError):
    """No key, a key we do not know, or a revoked one (RFC 6750: 401 with ``WWW-Authenticate``)."""

    status = 401
    slug = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str, *, token_given: bool) -> None:
        super().__init__(detail)
        self.token_given = token_given

    def headers(self) -> dict[str, str]:
        error = ', error="invalid_token"' if self.token_given else ""
        return {"WWW-Authenticate": f'Bearer realm="{REALM}"{error}'}


class ScopeMissing(GatewayError):
    """A valid key without the scope the route needs."""

    status = 403
    slug = "insufficient-scope"
    title = "Insufficient scope"

    def __init__(self, detail: str, *, scope: Scope) -> None:
        super().__init__(detail, scope=scope.value)
        self.scope = scope

    def headers(self) -> dict[str, str]:
        return {
            "WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", scope="{self.scope}"'
        }

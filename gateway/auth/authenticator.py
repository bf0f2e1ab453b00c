"""Requests to principals: the key from ``Authorization: Bearer`` or ``X-API-Key``, checked against the
database on every request (a revoked key fails on the next one), with the scope the route needs.

With ``PALM_AUTH__MODE=off`` every request is :data:`~gateway.auth.principal.ANONYMOUS`; that is
allowed only while the service listens on a loopback address (:func:`refuse_unsafe_exposure`).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from gateway.auth.keys import KeyStore
from gateway.auth.principal import ANONYMOUS, NotAuthenticated, Principal, Scope, ScopeMissing
from gateway.db.engine import Database, create_engine, database_url
from gateway.db.migrate import upgrade
from gateway.metrics import Metrics
from gateway.settings import Settings

logger = logging.getLogger(__name__)

TOUCH_EVERY_S = 60.0
"""``last_used_at`` is written at most this often per key (a write per request would serialise
SQLite)."""

CREATE_HINT = "create a key with: palm-serve keys create --tenant NAME"


class UnsafeExposure(ValueError):
    """The service would listen beyond loopback with nobody's key required."""


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1``; anything else (``0.0.0.0``, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_unsafe_exposure(mode: str, host: str) -> None:
    """Raises:
    UnsafeExposure: authentication is off and ``host`` is not a loopback address.
    """
    if mode == "off" and not is_loopback(host):
        raise UnsafeExposure(
            f"refusing to listen on {host or 'every address'} with PALM_AUTH__MODE=off: anyone who reaches "
            f"the port could read and delete every job. Set PALM_AUTH__MODE=api-key and {CREATE_HINT} "
            "(or listen on 127.0.0.1)."
        )


def refuse_unsafe_start(settings: Settings) -> None:
    """What ``palm-serve serve`` checks before it binds: no open service beyond loopback, and in
    ``api-key`` mode beyond loopback, at least one active key.

    Raises:
        UnsafeExposure: saying how to create a key.
    """
    refuse_unsafe_exposure(settings.auth.mode, settings.host)
    if settings.auth.mode == "off" or is_loopback(settings.host):
        return
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url(settings.data_dir, settings.database_url))
    try:
        upgrade(engine)
        if not KeyStore(engine).count_active():
            raise UnsafeExposure(f"PALM_AUTH__MODE=api-key but no API key exists; {CREATE_HINT}")
    finally:
        engine.dispose()


class Authenticator:
    """Turns a request's headers into a :class:`Principal` holding a scope, or refuses it."""

    def __init__(
        self, keys: KeyStore | None, db: Database | None, metrics: Metrics, *, protect_metrics: bool = False
    ) -> None:
        self.keys = keys
        self.db = db
        self.metrics = metrics
        self.protect_metrics = protect_metrics and keys is not None
        self._touched: dict[str, float] = {}

    async def authenticate(self, headers: Mapping[str, str], scope: Scope) -> Principal:
        """The caller, if its key is valid, active and holds ``scope``.

        Raises:
            NotAuthenticated: no key, a malformed, unknown or revoked one (401).
            ScopeMissing: a valid key without ``scope`` (403).
        """
        if self.keys is None or self.db is None:
            return ANONYMOUS
        token = _token(headers)
        if token is None:
            self._fail("missing")
            raise NotAuthenticated(
                "this API needs a key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                token_given=False,
            )
        key = await self.db.run(self.keys.verify, token)
        if key is None:
            self._fail("unknown" if token.startswith("palm_") else "malformed")
            raise NotAuthenticated("the API key is not valid", token_given=True)
        if not key.active:
            self._fail("revoked")
            raise NotAuthenticated(f"the API key {key.id} was revoked", token_given=True)
        if scope not in key.scopes:
            self._fail("scope")
            raise ScopeMissing(
                f"the API key {key.id} lacks the {scope.value!r} scope this route needs", scope=scope
            )
        now = time.monotonic()
        if now - self._touched.get(key.id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[key.id] = now
            await self.db.run(self.keys.touch, key.id)
        return Principal(tenant=key.tenant, scopes=key.scopes, key_id=key.id)

    def _fail(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason=reason).inc()


def _token(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


@asynccontextmanager
async def open_auth(settings: Settings, metrics: Metrics) -> AsyncIterator[Authenticator]:
    """The app's authenticator; in ``api-key`` mode on the job database (migrated here if needed).

    Raises:
        UnsafeExposure: ``api-key`` mode on a non-loopback host with no active key.
    """
    if settings.auth.mode == "off":
        refuse_unsafe_exposure(settings.auth.mode, settings.host)
        yield Authenticator(None, None, metrics)
        return
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(create_engine(database_url(settings.data_dir, settings.database_url)))
    try:
        await db.run(upgrade, db.engine)
        keys = KeyStore(db.engine)
        if not await db.run(keys.count_active):
            if not is_loopback(settings.host):
                raise UnsafeExposure(f"PALM_AUTH__MODE=api-key but no API key exists; {CREATE_HINT}")
            logger.warning("PALM_AUTH__MODE=api-key but no API key exists; %s", CREATE_HINT)
        yield Authenticator(keys, db, metrics, protect_metrics=settings.auth.protect_metrics)
    finally:
        db.close()

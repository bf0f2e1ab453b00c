"""API keys: ``palm_<id>_<secret>``, stored as the sha256 of the secret with a tenant and scopes.

The id (16 hex characters) finds the row; the secret (32 random bytes, URL-safe base64) is compared
by its digest with :func:`hmac.compare_digest`, so neither the lookup nor the comparison tells how much
of a guess was right. Only the digest is stored: a key is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from gateway.auth.principal import Scope
from gateway.db.engine import aware, utcnow
from gateway.db.tables import api_keys
from gateway.errors import GatewayError, InvalidParameter

PREFIX = "palm_"
TOKEN = re.compile(r"^palm_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})$")
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


class KeyNotFound(GatewayError):
    status = 404
    slug = "key-not-found"
    title = "No such API key"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key, without its secret."""

    id: str
    tenant: str
    name: str
    scopes: frozenset[Scope]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def parse_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else ``None``."""
    match = TOKEN.match(token)
    return (match[1], match[2]) if match else None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(text: str | Iterable[str]) -> frozenset[Scope]:
    """``"predict,jobs"`` (or words) as scopes.

    Raises:
        InvalidParameter: an unknown scope, or none.
    """
    words = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        scopes = frozenset(Scope(word) for word in words)
    except ValueError:
        raise InvalidParameter(
            f"scopes are {', '.join(s.value for s in Scope)}; got {' '.join(words)!r}"
        ) from None
    if not scopes:
        raise InvalidParameter("a key needs at least one scope")
    return scopes


class KeyStore:
    """The ``api_keys`` table; every method is one transaction (blocking)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(self, tenant: str, scopes: frozenset[Scope], name: str = "") -> tuple[ApiKey, str]:
        """A new key for ``tenant``; returns it and the token, which is never stored or shown again.

        Raises:
            InvalidParameter: a tenant name outside ``[A-Za-z0-9._-]`` (64 characters at most).
        """
        if not TENANT.match(tenant):
            raise InvalidParameter(
                f"a tenant is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
                f"got {tenant!r}"
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    tenant=tenant,
                    name=name[:200],
                    scopes=" ".join(sorted(scopes)),
                    secret_sha256=digest(secret),
                    created_at=utcnow(),
                )
            )
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).one()
        return _key(row), f"{PREFIX}{key_id}_{secret}"

    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.tenant, api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key; the next request that carries it is refused.

        Raises:
            KeyNotFound: no key has this id.
        """
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise KeyNotFound(f"there is no API key {key_id!r}")
        return _key(row)

    def count_active(self) -> int:
        with self.engine.connect() as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
            ).scalar()
        return int(count or 0)

    def verify(self, token: str) -> ApiKey | None:
        """The key ``token`` is, revoked or not; ``None`` when it is malformed, unknown or its secret is
        wrong (the digests are compared in constant time)."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        stored = row.secret_sha256 if row is not None else _DUMMY_DIGEST
        if not hmac.compare_digest(digest(secret), stored) or row is None:
            return None
        return _key(row)

    def touch(self, key_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(last_used_at=utcnow()))


def _key(row: sa.Row[object]) -> ApiKey:
    created = aware(row.created_at)
    assert created is not None
    return ApiKey(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        scopes=frozenset(Scope(word) for word in row.scopes.split()),
        created_at=created,
        revoked_at=aware(row.revoked_at),
        last_used_at=aware(row.last_used_at),
    )

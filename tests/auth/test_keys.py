"""API keys on SQLite and PostgreSQL, and the rule that keeps an open service on loopback."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from gateway.app import create_app
from gateway.auth.authenticator import UnsafeExposure, is_loopback, refuse_unsafe_exposure
from gateway.auth.keys import KeyNotFound, KeyStore, parse_scopes, parse_token
from gateway.auth.principal import Scope
from gateway.errors import InvalidParameter
from gateway.settings import AuthSettings, Settings


@pytest.fixture
def keys(engine: sa.Engine) -> KeyStore:
    return KeyStore(engine)


def test_a_key_is_shown_once_stored_hashed_and_verified(keys: KeyStore, engine: sa.Engine) -> None:
    key, token = keys.create("acme", frozenset({Scope.jobs}), "ci")
    parsed = parse_token(token)
    assert parsed is not None
    assert parsed[0] == key.id
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT * FROM api_keys")).one()._mapping
    assert parsed[1] not in " ".join(str(v) for v in stored.values())
    found = keys.verify(token)
    assert found is not None
    assert (found.tenant, found.scopes, found.active) == ("acme", frozenset({Scope.jobs}), True)
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    other_id = token.replace(key.id, "0" * 16)
    for bad in (wrong_secret, other_id, "palm_nothex_secret", "Bearer x", ""):
        assert keys.verify(bad) is None
    assert keys.count_active() == 1


def test_a_revoked_key_stays_known_but_inactive(keys: KeyStore) -> None:
    key, token = keys.create("acme", frozenset(Scope))
    keys.revoke(key.id)
    found = keys.verify(token)
    assert found is not None
    assert not found.active
    assert keys.count_active() == 0
    assert [k.id for k in keys.list(include_revoked=False)] == []
    assert [k.id for k in keys.list()] == [key.id]
    with pytest.raises(KeyNotFound):
        keys.revoke("0" * 16)


def test_tenants_and_scopes_are_checked(keys: KeyStore) -> None:
    with pytest.raises(InvalidParameter, match="tenant"):
        keys.create("two words", frozenset({Scope.jobs}))
    assert parse_scopes("predict, jobs") == {Scope.predict, Scope.jobs}
    with pytest.raises(InvalidParameter, match="scopes are predict, jobs, admin"):
        parse_scopes("jobs,root")
    with pytest.raises(InvalidParameter, match="at least one"):
        parse_scopes("")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.2", False), ("palm.internal", False)],
)  # fmt: skip
def test_only_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_open_service_beyond_loopback_is_refused() -> None:
    with pytest.raises(UnsafeExposure, match="palm-serve keys create"):
        refuse_unsafe_exposure("off", "0.0.0.0")
    refuse_unsafe_exposure("api-key", "0.0.0.0")
    with pytest.raises(UnsafeExposure):
        create_app(Settings(host="0.0.0.0"))
    create_app(Settings(host="0.0.0.0", auth=AuthSettings(mode="api-key")))

"""``palm-serve keys`` and the refusal of an open service beyond loopback, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.auth.keys import KeyStore, parse_token
from gateway.db.engine import create_engine


def palm_serve(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env={**os.environ, "PALM_DATA_DIR": str(data_dir), "PALM_LOG_LEVEL": "WARNING", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_are_created_once_listed_without_secrets_and_revoked(tmp_path: Path) -> None:
    created = palm_serve(tmp_path, "keys", "create", "--tenant", "acme", "--name", "ci", "--scopes", "jobs")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    parsed = parse_token(token)
    assert parsed is not None
    key_id, secret = parsed
    assert "not shown again" in created.stderr
    listing = palm_serve(tmp_path, "keys", "list")
    assert key_id in listing.stdout
    assert "acme" in listing.stdout
    assert secret not in listing.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'palm.db'}")
    try:
        found = KeyStore(engine).verify(token)
        assert found is not None
        assert found.active
        assert palm_serve(tmp_path, "keys", "revoke", key_id).returncode == 0
        found = KeyStore(engine).verify(token)
        assert found is not None
        assert not found.active
    finally:
        engine.dispose()
    assert key_id not in palm_serve(tmp_path, "keys", "list", "--active").stdout
    unknown = palm_serve(tmp_path, "keys", "revoke", "0123456789abcdef")
    assert unknown.returncode == 2
    assert "no API key" in unknown.stderr
    assert palm_serve(tmp_path, "keys", "create", "--tenant", "acme", "--scopes", "root").returncode == 2


@pytest.mark.parametrize("mode", ["off", "api-key"])
def test_serve_beyond_loopback_without_keys_refuses_to_start(tmp_path: Path, mode: str) -> None:
    refused = palm_serve(tmp_path, "serve", "--host", "0.0.0.0", "--port", "1", PALM_AUTH__MODE=mode)
    assert refused.returncode == 2
    assert "palm-serve keys create" in refused.stderr

"""API keys, tenants and their limits over real HTTP (uvicorn on 127.0.0.1, the fake inference
backend), on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import create_app
from gateway.auth.keys import KeyStore
from gateway.auth.principal import Scope
from gateway.db.engine import create_engine
from gateway.settings import (
    AuthSettings,
    DecodeSettings,
    JobSettings,
    Settings,
    TenantLimitSettings,
    TenantSettings,
    WebhookSettings,
)
from gateway.webhooks.signing import new_secret
from tests.factories import make_geotiff
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread
from tests.integration.test_jobs_api import upload, wait_done

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


@dataclass
class Keys:
    acme: str
    globex: str
    predict_only: str
    revoked: str
    admin: str


def make_keys(database_url: str) -> Keys:
    engine = create_engine(database_url)
    store = KeyStore(engine)
    try:
        tokens = [
            store.create("acme", frozenset({Scope.jobs, Scope.predict}))[1],
            store.create("globex", frozenset({Scope.jobs}))[1],
            store.create("acme", frozenset({Scope.predict}))[1],
        ]
        revoked, token = store.create("acme", frozenset({Scope.jobs}))
        store.revoke(revoked.id)
        admin = store.create("ops", frozenset({Scope.admin}))[1]
    finally:
        engine.dispose()
    return Keys(*tokens, token, admin)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("trust-scenes")
    return [make_geotiff(root / f"t{i}.tif", width=600, height=500, seed=i) for i in range(3)]


def serve(settings: Settings) -> Any:
    return serve_in_thread(create_app(settings, inference=FakeInference(fixed_box(100, 100, 120, 120))))


@pytest.fixture
def secured(tmp_path: Path, database_url: str) -> Iterator[tuple[httpx.Client, Keys]]:
    keys = make_keys(database_url)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        auth=AuthSettings(mode="api-key"),
        decode=DecodeSettings(workers=1, file_timeout_s=60),
        jobs=JobSettings(lease_s=5, poll_s=0.2),
        webhook=WebhookSettings(secrets=SecretStr(new_secret())),
    )
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, keys


def job_calls(job_id: str, scene: Path) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"/v1/jobs/{job_id}"
    return [
        ("GET", base, {}),
        ("GET", f"{base}/files", {}),
        ("GET", f"{base}/errors", {}),
        ("GET", f"{base}/events", {}),
        ("GET", f"{base}/results", {}),
        ("GET", f"{base}/results.geojson", {}),
        ("GET", f"{base}/webhooks", {}),
        ("POST", f"{base}/webhooks/redeliver", {}),
        ("POST", f"{base}/files", {"files": upload([scene], ["new.tif"])}),
        ("POST", f"{base}/start", {}),
        ("POST", f"{base}/cancel", {}),
        ("DELETE", base, {}),
    ]


def test_every_job_route_hides_another_tenants_jobs(
    secured: tuple[httpx.Client, Keys], scenes: list[Path]
) -> None:
    api, keys = secured
    acme = bearer(keys.acme)
    finished = api.post("/v1/jobs", files=upload(scenes[:1]), headers=acme)
    assert finished.status_code == 202, finished.text
    with httpx.Client(base_url=api.base_url, headers=acme, timeout=60) as owner:
        done = wait_done(owner, finished.json()["id"])
    staged = api.post("/v1/jobs", json={"name": "staged"}, headers=acme).json()["id"]

    for job_id in (done["id"], staged):
        for method, path, extra in job_calls(job_id, scenes[1]):
            response = api.request(method, path, headers=bearer(keys.globex), **extra)
            assert response.status_code == 404, (method, path, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert response.json()["type"].endswith("/job-not-found")
    assert api.get("/v1/jobs", headers=bearer(keys.globex)).json()["jobs"] == []
    mine = api.get("/v1/jobs", headers=acme).json()["jobs"]
    assert sorted(j["id"] for j in mine) == sorted([done["id"], staged])
    # the owner reaches the same routes
    assert api.get(f"/v1/jobs/{done['id']}/results", headers=acme).status_code == 200
    assert api.post(f"/v1/jobs/{staged}/files", files=upload(scenes[1:2]), headers=acme).status_code == 200
    assert api.delete(f"/v1/jobs/{done['id']}", headers={"X-API-Key": keys.acme}).status_code == 204


def test_missing_invalid_revoked_and_unscoped_keys_are_refused(
    secured: tuple[httpx.Client, Keys], scenes: list[Path]
) -> None:
    api, keys = secured
    job_id = api.post("/v1/jobs", json={}, headers=bearer(keys.acme)).json()["id"]
    for method, path, extra in [
        *job_calls(job_id, scenes[0]),
        ("GET", "/v1/jobs", {}),
        ("POST", "/v1/jobs", {}),
    ]:
        response = api.request(method, path, **extra)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == 'Bearer realm="palm-serve"'
        assert response.headers["content-type"] == PROBLEM
        revoked = api.request(method, path, headers=bearer(keys.revoked), **extra)
        assert revoked.status_code == 401, (method, path)
        assert "revoked" in revoked.json()["detail"]
        assert 'error="invalid_token"' in revoked.headers["www-authenticate"]
        unscoped = api.request(method, path, headers=bearer(keys.predict_only), **extra)
        assert unscoped.status_code == 403, (method, path)
        assert unscoped.json()["scope"] == "jobs"
        assert 'error="insufficient_scope"' in unscoped.headers["www-authenticate"]
    wrong = keys.acme[:-3] + ("xyz" if not keys.acme.endswith("xyz") else "abc")
    assert api.get("/v1/jobs", headers=bearer(wrong)).status_code == 401
    assert api.get("/v1/jobs", headers=bearer("not-a-key")).status_code == 401
    predict = api.post(
        "/v1/predict", files={"file": ("a.tif", scenes[0].read_bytes())}, headers=bearer(keys.globex)
    )
    assert predict.status_code == 403
    ok = api.post(
        "/v1/predict", files={"file": ("a.tif", scenes[0].read_bytes())}, headers=bearer(keys.predict_only)
    )
    assert ok.status_code == 200, ok.text
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    metrics = api.get("/metrics").text
    for reason in ("missing", "revoked", "scope", "unknown", "malformed"):
        assert f'palm_auth_failures_total{{reason="{reason}"}}' in metrics


def test_a_key_revoked_while_the_service_runs_fails_on_the_next_request(
    secured: tuple[httpx.Client, Keys], database_url: str
) -> None:
    api, keys = secured
    assert api.get("/v1/jobs", headers=bearer(keys.globex)).status_code == 200
    engine = create_engine(database_url)
    try:
        store = KeyStore(engine)
        (key,) = [k for k in store.list() if k.tenant == "globex"]
        store.revoke(key.id)
    finally:
        engine.dispose()
    assert api.get("/v1/jobs", headers=bearer(keys.globex)).status_code == 401


def test_webhook_urls_are_checked_at_creation_and_secrets_never_shown(
    secured: tuple[httpx.Client, Keys], scenes: list[Path]
) -> None:
    api, keys = secured
    acme = bearer(keys.acme)
    for url, reason in [
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://2130706433:8080/hook", "loopback"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("https://user:secret@93.184.216.34/hook", "credentials"),
        ("ftp://93.184.216.34/hook", "http or https"),
    ]:
        refused = api.post("/v1/jobs", json={"webhook_url": url}, headers=acme)
        assert refused.status_code == 422, url
        assert reason in refused.json()["detail"]
        multipart = api.post("/v1/jobs", files=upload(scenes[:1]), data={"webhook_url": url}, headers=acme)
        assert multipart.status_code == 422, url
    bad_events = api.post(
        "/v1/jobs",
        json={"webhook_url": "https://93.184.216.34/h", "webhook_events": ["job.exploded"]},
        headers=acme,
    )
    assert bad_events.status_code == 422
    assert "job.progress" in bad_events.json()["detail"]
    secret = new_secret()
    created = api.post(
        "/v1/jobs",
        json={
            "webhook_url": "https://93.184.216.34/h",
            "webhook_secret": secret,
            "webhook_events": ["job.started"],
        },
        headers=acme,
    )
    assert created.status_code == 201, created.text
    assert created.json()["webhook"] == {
        "url": "https://93.184.216.34/h",
        "events": ["job.started"],
        "signed_with": "job secret",
        "disabled": False,
    }
    job_id = created.json()["id"]
    for path in (
        f"/v1/jobs/{job_id}",
        "/v1/jobs",
        f"/v1/jobs/{job_id}/webhooks",
        f"/v1/jobs/{job_id}/events",
    ):
        with api.stream("GET", path, headers=acme) as response:
            text = next(response.iter_text()) if path.endswith("events") else response.read().decode()
        assert secret not in text
        assert secret.removeprefix("whsec_")[:16] not in text
    assert api.post(f"/v1/jobs/{job_id}/webhooks/redeliver", headers=acme).status_code == 409


@pytest.fixture
def limited(tmp_path: Path, database_url: str, scenes: list[Path]) -> Iterator[tuple[httpx.Client, Keys]]:
    keys = make_keys(database_url)
    room = int(scenes[0].stat().st_size * 3.5)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        auth=AuthSettings(mode="api-key"),
        decode=DecodeSettings(workers=1),
        jobs=JobSettings(workers=False),  # jobs stay queued: they count as active
        tenants=TenantSettings(
            limits={
                "globex": TenantLimitSettings(max_active_jobs=1, max_files_per_job=2, max_storage_bytes=room)
            }
        ),
    )
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, keys


def test_tenant_limits_answer_429_and_413(limited: tuple[httpx.Client, Keys], scenes: list[Path]) -> None:
    api, keys = limited
    globex, acme = bearer(keys.globex), bearer(keys.acme)
    too_many = api.post("/v1/jobs", files=upload(scenes), headers=globex)
    assert too_many.status_code == 413
    assert too_many.json()["type"].endswith("/tenant-quota-exceeded")
    assert "at most 2 files" in too_many.json()["detail"]
    first = api.post("/v1/jobs", files=upload(scenes[:1]), headers=globex)
    assert first.status_code == 202, first.text
    second = api.post("/v1/jobs", files=upload(scenes[1:2]), headers=globex)
    assert second.status_code == 429
    assert second.headers["retry-after"] == "30"
    assert second.headers["content-type"] == PROBLEM
    assert second.json()["type"].endswith("/tenant-limit-reached")
    staged = api.post("/v1/jobs", json={}, headers=globex).json()["id"]
    for scene in scenes[1:3]:
        assert api.post(f"/v1/jobs/{staged}/files", files=upload([scene]), headers=globex).status_code == 200
    third = api.post(f"/v1/jobs/{staged}/files", files=upload(scenes[:1], ["again.tif"]), headers=globex)
    assert third.status_code == 413
    assert third.json()["type"].endswith("/tenant-quota-exceeded")
    assert api.post(f"/v1/jobs/{staged}/start", headers=globex).status_code == 429
    assert api.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=globex).status_code == 200
    full = api.post("/v1/jobs", files=upload(scenes[:1]), headers=globex)  # three scenes stored of 3.5
    assert full.status_code == 413
    assert "more bytes" in full.json()["detail"]
    assert api.post(f"/v1/jobs/{staged}/start", headers=globex).status_code == 202
    # another tenant's budget is its own
    assert api.post("/v1/jobs", files=upload(scenes), headers=acme).status_code == 202


def test_metrics_can_require_an_admin_key(tmp_path: Path, database_url: str) -> None:
    keys = make_keys(database_url)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        auth=AuthSettings(mode="api-key", protect_metrics=True),
        decode=DecodeSettings(workers=1),
    )
    with serve(settings) as url, httpx.Client(base_url=url, timeout=30) as api:
        assert api.get("/metrics").status_code == 401
        assert api.get("/metrics", headers=bearer(keys.acme)).status_code == 403
        assert api.get("/metrics", headers=bearer(keys.admin)).status_code == 200
        assert api.get("/healthz").status_code == 200
        assert api.get("/readyz").status_code == 200
        assert api.get("/openapi.json").status_code == 200

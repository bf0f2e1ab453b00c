"""Job webhooks over real HTTP: the service on uvicorn (fake inference backend) delivers to a real
receiver on 127.0.0.1 that verifies every request with the ``standardwebhooks`` library; retry
schedules are scaled down to fractions of a second. SQLite and PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import DecodeSettings, JobSettings, Settings, WebhookSettings
from gateway.webhooks.signing import new_secret
from tests.factories import make_geotiff
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread
from tests.integration.test_jobs_api import upload, wait_done
from tests.integration.waiting import wait_for
from tests.receiver import Reply, receiving

pytestmark = pytest.mark.integration

OLD, NEW = new_secret(), new_secret()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("hook-scenes")
    good = [make_geotiff(root / f"h{i}.tif", width=600, height=500, seed=i) for i in range(2)]
    truncated = root / "truncated.tif"
    truncated.write_bytes(good[0].read_bytes()[:1500])  # a TIFF header, then nothing: fails in the decoder
    return [*good, truncated]


@pytest.fixture
def service(tmp_path: Path, database_url: str) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        decode=DecodeSettings(workers=1, file_timeout_s=60),
        jobs=JobSettings(lease_s=5, poll_s=0.1, max_attempts=1),
        webhook=WebhookSettings(
            secrets=SecretStr(f"{OLD} {NEW}"),  # a rotation: both sign
            retry_schedule="0.3,0.3,0.6,1,1,2,2",
            allow_private=True,
            poll_s=0.1,
            timeout_s=2,
            lease_s=5,
        ),
    )
    app = create_app(settings, inference=FakeInference(fixed_box(100, 100, 120, 120)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def deliveries(api: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/jobs/{job_id}/webhooks")
    assert response.status_code == 200, response.text
    return list(response.json()["deliveries"])


def until(
    api: httpx.Client, job_id: str, condition: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        seen[:] = deliveries(api, job_id)
        return condition(seen)

    assert wait_for(check, timeout_s), seen
    return seen


def test_every_event_arrives_once_per_id_after_the_receiver_comes_back(
    service: httpx.Client, scenes: list[Path]
) -> None:
    port = free_port()  # nobody listens there yet: the first attempts are refused
    created = service.post(
        "/v1/jobs",
        files=upload(scenes),
        data={
            "webhook_url": f"http://127.0.0.1:{port}/hooks/palm",
            "webhook_events": "job.started,file.failed",
        },
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    job = wait_done(service, job_id)
    assert job["webhook"]["signed_with"] == "server secrets"
    until(service, job_id, lambda ds: len(ds) == 3 and all(len(d["attempts"]) >= 2 for d in ds))

    with receiving([OLD, NEW], port=port) as receiver:  # verifies each secret of the rotation alone
        settled = until(service, job_id, lambda ds: all(d["status"] == "succeeded" for d in ds))
        assert wait_for(lambda: len(receiver.accepted) == 3, 10)

    ids = {d["id"] for d in settled}
    assert receiver.accepted == dict.fromkeys(ids, 1)  # once per webhook-id
    assert all(r.verified for r in receiver.received)
    assert {d["type"] for d in settled} == {"job.started", "file.failed", "job.succeeded"}
    for delivery in settled:
        outcomes = [a["outcome"] for a in delivery["attempts"]]
        assert outcomes[-1] == "success"
        assert set(outcomes[:-1]) == {"connection"}
        assert len(outcomes) >= 3
        assert delivery["attempts"][-1]["status_code"] == 204
        assert [a["number"] for a in delivery["attempts"]] == list(range(1, len(outcomes) + 1))
    events = {e["type"]: e for e in receiver.events()}
    end = events["job.succeeded"]["data"]
    assert end["job_id"] == job_id
    assert (end["status"], end["errors_count"]) == ("succeeded", 1)
    assert end["results_sha256"] == job["results"]["sha256"]
    assert end["annotations"] == job["results"]["annotations"]
    assert end["results_url"] == f"/v1/jobs/{job_id}/results"
    assert service.get(end["results_url"]).status_code == 200
    assert events["file.failed"]["data"]["file"] == "truncated.tif"
    assert events["job.started"]["data"]["status"] == "running"
    signatures = next(r for r in receiver.received).headers["webhook-signature"].split(" ")
    assert len(signatures) == 2


def test_redelivery_sends_the_last_event_again_with_the_same_id(
    service: httpx.Client, scenes: list[Path]
) -> None:
    with receiving([NEW]) as receiver:
        job_id = service.post(
            "/v1/jobs", files=upload(scenes[:1]), data={"webhook_url": receiver.url}
        ).json()["id"]
        wait_done(service, job_id)
        (first,) = until(service, job_id, lambda ds: len(ds) == 1 and ds[0]["status"] == "succeeded")
        again = service.post(f"/v1/jobs/{job_id}/webhooks/redeliver")
        assert again.status_code == 202
        (second,) = until(
            service, job_id, lambda ds: len(ds[0]["attempts"]) == 2 and ds[0]["status"] == "succeeded"
        )
    assert second["id"] == first["id"]
    assert receiver.accepted == {first["id"]: 2}
    assert [r.body["type"] for r in receiver.received] == ["job.succeeded", "job.succeeded"]
    assert receiver.received[0].body == receiver.received[1].body  # the same event, re-signed


def test_a_jobs_secret_signs_alone_redirects_are_not_followed_and_410_disables(
    service: httpx.Client, scenes: list[Path]
) -> None:
    own = new_secret()
    script = [Reply(302, {"Location": "/elsewhere"}), Reply(410)]
    with receiving([own], script=script) as receiver:
        created = service.post(
            "/v1/jobs", files=upload(scenes[:1]), data={"webhook_url": receiver.url, "webhook_secret": own}
        )
        job_id = created.json()["id"]
        assert created.json()["webhook"]["signed_with"] == "job secret"
        wait_done(service, job_id)
        (delivery,) = until(service, job_id, lambda ds: len(ds) == 1 and ds[0]["status"] == "disabled")
    assert [(a["outcome"], a["status_code"]) for a in delivery["attempts"]] == [
        ("redirect", 302),
        ("gone", 410),
    ]
    assert "redirects are not followed" in delivery["attempts"][0]["error"]
    assert [r.path for r in receiver.received] == ["/hooks/palm", "/hooks/palm"]
    assert all(r.verified and len(r.headers["webhook-signature"].split(" ")) == 1 for r in receiver.received)
    assert service.get(f"/v1/jobs/{job_id}").json()["webhook"]["disabled"] is True
    metrics = service.get("/metrics").text
    assert 'palm_webhook_deliveries_total{outcome="disabled"}' in metrics
    assert 'palm_webhook_attempts_total{outcome="redirect"}' in metrics
    assert "palm_webhook_delivery_duration_seconds_count" in metrics

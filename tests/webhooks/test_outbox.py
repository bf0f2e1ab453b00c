"""The webhook outbox on SQLite and PostgreSQL: events written with the job's state, leases that never
hand one attempt to two senders, 410, redelivery."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import orjson
import pytest
import sqlalchemy as sa

from gateway.db.engine import create_engine, utcnow
from gateway.errors import CorruptRaster
from gateway.jobs.models import JobPriority
from gateway.jobs.store import FileResult, JobStore, NewFile, new_job_id
from gateway.webhooks.outbox import (
    AttemptRecord,
    DeliveryLeaseLost,
    DeliveryStatus,
    NothingToRedeliver,
    Outbox,
)

MODEL = {"name": "palm", "version": "1.1.0", "sha256": "ab" * 32}
PARAMETERS = {"score_threshold": 0.3, "bands": None, "tile_size": 512, "overlap": 128, "nms_iou": 0.5}
URL = "https://hooks.example.com/palm"


def make_job(
    store: JobStore, files: int, *, url: str | None = URL, events: tuple[str, ...] = (), start: bool = True
) -> str:
    job_id = new_job_id()
    store.create_job(
        job_id=job_id,
        tenant="default",
        name="hooked",
        priority=JobPriority.normal,
        parameters=PARAMETERS,
        model=MODEL,
        new_files=[NewFile(f"f{i}.tif", 100, None, f"jobs/{job_id}/uploads/{i}") for i in range(files)],
        start=start,
        webhook_url=url,
        webhook_secret=None,
        webhook_events=events,
    )
    return job_id


def finish(store: JobStore, job_id: str) -> None:
    assembly = store.claim_assembly("w", 30)
    assert assembly is not None
    assert assembly.job_id == job_id
    store.finish_assembly(assembly, "w", coco=("c" * 64, 10), geojson=("g" * 64, 5), annotations=3)


def record(outcome: str = "http_error", status: int | None = 500) -> AttemptRecord:
    return AttemptRecord(utcnow(), 0.01, status, outcome, None if outcome == "success" else "HTTP 500")


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine, public_url="https://palm.example.org")


@pytest.fixture
def outbox(engine: sa.Engine) -> Outbox:
    return Outbox(engine)


def test_events_are_written_with_the_state_they_describe(store: JobStore, outbox: Outbox) -> None:
    job_id = make_job(store, 2, events=("file.failed", "job.started"))
    first = store.claim("w", 30)
    assert first is not None
    assert first.job_id == job_id
    store.complete(first, FileResult(10, 10, None, None, [], 1, 0, []))
    second = store.claim("w", 30)
    assert second is not None
    store.fail(second, CorruptRaster("truncated strip"), retry=False, max_attempts=3, backoff_s=0)
    silent = make_job(store, 1, url=None)
    other = store.claim("w", 30)
    assert other is not None
    assert other.job_id == silent
    store.complete(other, FileResult(10, 10, None, None, [], 1, 0, []))
    finish(store, job_id)
    finish(store, silent)

    deliveries = outbox.deliveries(job_id)
    assert [d["type"] for d in deliveries] == ["job.started", "file.failed", "job.succeeded"]
    assert len({d["id"] for d in deliveries}) == 3
    assert outbox.deliveries(silent) == []
    claims = {c.type: c for c in outbox.claim("d", 30, 10)}
    end = orjson.loads(claims["job.succeeded"].body)
    assert end["type"] == "job.succeeded"
    assert end["data"] == {
        "job_id": job_id,
        "status": "succeeded",
        "progress": end["data"]["progress"],
        "errors_count": 1,
        "results_url": f"https://palm.example.org/v1/jobs/{job_id}/results",
        "geojson_url": f"https://palm.example.org/v1/jobs/{job_id}/results.geojson",
        "results_sha256": "c" * 64,
        "annotations": 3,
    }
    assert end["data"]["progress"]["files_done"] == 1
    failed = orjson.loads(claims["file.failed"].body)["data"]
    assert (failed["file"], failed["error"]["type"]) == (
        "f1.tif",
        "https://palm-serve.dev/problems/corrupt-raster",
    )


def test_progress_events_are_throttled(engine: sa.Engine, outbox: Outbox) -> None:
    throttled = JobStore(engine, progress_interval_s=3600)
    job_id = make_job(throttled, 1, events=("job.progress",))
    assert throttled.claim("w", 30) is not None
    for _ in range(3):
        throttled.add_progress_event(job_id)
    assert [d["type"] for d in outbox.deliveries(job_id)] == ["job.progress"]
    eager = JobStore(engine, progress_interval_s=0.01)
    time.sleep(0.05)
    eager.add_progress_event(job_id)
    assert [d["type"] for d in outbox.deliveries(job_id)] == ["job.progress", "job.progress"]


def test_an_expired_lease_is_the_next_attempt_and_its_old_holder_cannot_settle(
    store: JobStore, outbox: Outbox
) -> None:
    job_id = make_job(store, 0, start=False)
    store.cancel(job_id, "default")
    finish(store, job_id)
    (stale,) = outbox.claim("p1", 0.2, 10)
    assert (stale.type, stale.attempt) == ("job.cancelled", 1)
    assert outbox.claim("p2", 30, 10) == []  # held
    time.sleep(0.4)
    (fresh,) = outbox.claim("p2", 30, 10)
    assert (fresh.id, fresh.attempt) == (stale.id, 2)
    with pytest.raises(DeliveryLeaseLost):
        outbox.settle(stale, record(), DeliveryStatus.pending, utcnow())
    outbox.settle(fresh, record("success", 204), DeliveryStatus.succeeded)
    (delivery,) = outbox.deliveries(job_id)
    assert delivery["status"] == "succeeded"
    assert [(a["number"], a["status_code"]) for a in delivery["attempts"]] == [(2, 204)]
    assert outbox.claim("p3", 30, 10) == []


def test_a_retry_waits_for_its_time(store: JobStore, outbox: Outbox) -> None:
    job_id = make_job(store, 0, start=False)
    store.cancel(job_id, "default")
    finish(store, job_id)
    (claim,) = outbox.claim("p", 30, 10)
    outbox.settle(claim, record(), DeliveryStatus.pending, utcnow() + timedelta(seconds=0.3))
    assert outbox.claim("p", 30, 10) == []
    time.sleep(0.4)
    (again,) = outbox.claim("p", 30, 10)
    assert again.attempt == 2


def test_410_disables_the_jobs_endpoint_until_a_redelivery(store: JobStore, outbox: Outbox) -> None:
    job_id = make_job(store, 2, events=("job.started", "file.failed"))
    claim = store.claim("w", 30)
    assert claim is not None
    (started,) = outbox.claim("p", 30, 10)
    store.fail(claim, CorruptRaster("x"), retry=False, max_attempts=1, backoff_s=0)  # file.failed queued
    outbox.settle(started, record("gone", 410), DeliveryStatus.disabled)
    assert [d["status"] for d in outbox.deliveries(job_id)] == ["disabled", "disabled"]
    assert store.get_job(job_id, "default")["webhook_disabled"]
    second = store.claim("w", 30)
    assert second is not None
    store.fail(second, CorruptRaster("y"), retry=False, max_attempts=1, backoff_s=0)
    finish(store, job_id)
    assert len(outbox.deliveries(job_id)) == 2  # nothing new for a disabled endpoint
    assert outbox.claim("p", 30, 10) == []

    latest = outbox.redeliver(job_id)
    assert latest == outbox.deliveries(job_id)[-1]["id"]
    assert not store.get_job(job_id, "default")["webhook_disabled"]
    (again,) = outbox.claim("p", 30, 10)
    assert (again.id, again.type, again.attempt) == (latest, "file.failed", 1)
    with pytest.raises(NothingToRedeliver, match="right now"):
        outbox.redeliver(job_id)
    outbox.settle(again, record("success", 200), DeliveryStatus.succeeded)
    outbox.redeliver(job_id)
    (third,) = outbox.claim("p", 30, 10)
    assert (third.id, third.attempt) == (latest, 2)
    with pytest.raises(NothingToRedeliver, match="no webhook event"):
        outbox.redeliver(make_job(store, 1))
    outbox.settle(third, record("success", 200), DeliveryStatus.succeeded)
    store.delete(job_id, "default")
    assert outbox.deliveries(job_id) == []


def test_concurrent_dispatchers_never_share_an_attempt(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(4)]
    store = JobStore(engines[0])
    for _ in range(30):
        job_id = make_job(store, 0, start=False)
        store.cancel(job_id, "default")
    while (assembly := store.claim_assembly("w", 30)) is not None:
        store.finish_assembly(assembly, "w", coco=("c" * 64, 1), geojson=("g" * 64, 1), annotations=0)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def dispatcher(engine: sa.Engine, owner: str) -> None:
        local = Outbox(engine)
        while claims := local.claim(owner, 30, 3):
            with lock:
                taken.extend((c.id, c.attempt) for c in claims)

    threads = [threading.Thread(target=dispatcher, args=(e, f"p{i}")) for i, e in enumerate(engines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert len(taken) == 30
    assert len(set(taken)) == 30

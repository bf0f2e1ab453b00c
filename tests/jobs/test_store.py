"""The job store's leases, scheduling and bookkeeping, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.db.tables import detections
from gateway.errors import CorruptRaster, DecoderFailed, InvalidParameter, UnsupportedMediaType
from gateway.jobs.models import FileStatus, JobPriority, JobStatus
from gateway.jobs.store import FileResult, JobConflict, JobNotFound, JobStore, LeaseLost, NewFile, new_job_id

MODEL = {"name": "palm", "version": "1.1.0", "sha256": "ab" * 32}
PARAMETERS = {"score_threshold": 0.3, "bands": None, "tile_size": 512, "overlap": 128, "nms_iou": 0.5}


def make_job(
    store: JobStore,
    files: int,
    *,
    priority: JobPriority = JobPriority.normal,
    start: bool = True,
    key: str | None = None,
    fingerprint: str | None = None,
    refused: int = 0,
) -> str:
    job_id = new_job_id()
    new = [NewFile(f"f{i:04d}.tif", 100, "cd" * 32, f"jobs/{job_id}/uploads/{i}") for i in range(files)]
    new += [
        NewFile(f"bad{i}.tif", 5, None, None, UnsupportedMediaType("an HTML page")) for i in range(refused)
    ]
    job, _ = store.create_job(
        job_id=job_id,
        tenant="default",
        name="test",
        priority=priority,
        parameters=PARAMETERS,
        model=MODEL,
        new_files=new,
        start=start,
        idempotency_key=key,
        request_sha256=fingerprint,
    )
    return str(job["id"])


def result(n: int) -> FileResult:
    rows = [
        {"category_id": 1, "x": 10.0 * i, "y": 5.0, "w": 8.0, "h": 8.0, "score": 0.9, "geometry": None}
        for i in range(n)
    ]
    return FileResult(640, 480, "EPSG:32633", [0.5, 0, 500000, 0, -0.5, 4e6], [], 2, 0, rows)


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine)


def test_files_are_claimed_in_order_and_committed_under_their_lease(
    store: JobStore, engine: sa.Engine
) -> None:
    job_id = make_job(store, 2, refused=1)
    job = store.get_job(job_id, "default")
    assert (job["status"], job["files_total"], job["files_failed"]) == ("queued", 3, 1)
    first = store.claim("w1", 30)
    assert first is not None
    assert (first.position, first.attempt) == (1, 1)
    assert store.get_job(job_id, "default")["status"] == JobStatus.running
    second = store.claim("w1", 30)
    assert second is not None
    assert second.position == 2
    assert store.claim("w1", 30) is None  # the refused file is never claimed

    store.complete(first, result(3))
    store.complete(second, result(2))
    job = store.get_job(job_id, "default")
    assert (job["files_done"], job["detections"], job["tiles_done"]) == (2, 5, 4)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(detections)).scalar() == 5
    with pytest.raises(LeaseLost):
        store.complete(first, result(3))  # its lease ended with the first commit


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_write(store: JobStore) -> None:
    make_job(store, 1)
    stale = store.claim("w1", 0.2)
    assert stale is not None
    assert store.claim("w2", 30) is None  # still leased
    time.sleep(0.4)
    fresh = store.claim("w2", 30)
    assert fresh is not None
    assert (fresh.file_id, fresh.attempt) == (stale.file_id, 2)
    assert not store.heartbeat(stale, 30, 1, 2).held
    with pytest.raises(LeaseLost):
        store.complete(stale, result(1))
    with pytest.raises(LeaseLost):
        store.fail(stale, CorruptRaster("x"), retry=True, max_attempts=3, backoff_s=0)
    store.complete(fresh, result(1))
    assert store.get_job(fresh.job_id, "default")["files_done"] == 1


def test_failures_retry_with_backoff_only_when_a_retry_can_help(store: JobStore) -> None:
    job_id = make_job(store, 2)
    timeout = store.claim("w", 30)
    assert timeout is not None
    slow = DecoderFailed("took longer than its budget", cause="timeout")
    assert store.fail(timeout, slow, retry=True, max_attempts=2, backoff_s=0.3) == FileStatus.pending
    corrupt = store.claim("w", 30)
    assert corrupt is not None
    assert corrupt.position == 2
    assert (
        store.fail(corrupt, CorruptRaster("damaged"), retry=True, max_attempts=2, backoff_s=0)
        == FileStatus.failed
    )
    assert store.claim("w", 30) is None
    time.sleep(0.35)
    again = store.claim("w", 30)
    assert again is not None
    assert (again.position, again.attempt) == (1, 2)
    assert store.fail(again, slow, retry=True, max_attempts=2, backoff_s=0) == FileStatus.failed
    job = store.get_job(job_id, "default")
    assert job["files_failed"] == 2
    errors = store.list_files(job_id, "default", after=0, limit=10, failed_only=True)
    assert [(e["name"], e["error_type"]) for e in errors] == [
        ("f0000.tif", "decoder-failed"),
        ("f0001.tif", "corrupt-raster"),
    ]


def test_jobs_share_the_workers_by_priority(store: JobStore) -> None:
    big = make_job(store, 1000)
    for _ in range(5):
        claim = store.claim("w", 30)
        assert claim is not None
        assert claim.job_id == big
        store.complete(claim, result(0))
    small = make_job(store, 1)
    urgent = make_job(store, 20, priority=JobPriority.high)
    taken = []
    for _ in range(12):
        claim = store.claim("w", 30)
        assert claim is not None
        taken.append(claim.job_id)
        store.complete(claim, result(0))
    assert small in taken[:3], "a one-file job behind a thousand-file job is served at once"
    assert taken.count(urgent) >= 2 * taken.count(big) - 2  # high weighs 4, normal 2


def test_concurrent_claimers_never_share_a_file(database_url: str) -> None:
    from gateway.db.engine import create_engine

    engines = [create_engine(database_url) for _ in range(4)]
    make_job(JobStore(engines[0]), 60)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(engine: sa.Engine, owner: str) -> None:
        local = JobStore(engine)
        while (claim := local.claim(owner, 30)) is not None:
            with lock:
                claimed.append(claim.file_id)

    threads = [threading.Thread(target=claimer, args=(e, f"w{i}")) for i, e in enumerate(engines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert len(claimed) == 60
    assert len(set(claimed)) == 60


def test_an_idempotency_key_returns_the_same_job_or_conflicts(store: JobStore) -> None:
    first = make_job(store, 2, key="k1", fingerprint="same")
    again = make_job(store, 2, key="k1", fingerprint="same")
    assert again == first
    with pytest.raises(JobConflict, match="different request"):
        make_job(store, 2, key="k1", fingerprint="other")
    assert len(store.list_jobs("default", status=None, before=None, limit=10)) == 1


def test_staged_jobs_take_files_then_start(store: JobStore) -> None:
    job_id = make_job(store, 0, start=False)
    assert store.claim("w", 30) is None
    with pytest.raises(InvalidParameter, match="no files"):
        store.start_job(job_id, "default")
    store.add_files(job_id, "default", [NewFile("a.tif", 1, None, "k/a")])
    with pytest.raises(JobConflict, match=r"already has a file named 'a\.tif'"):
        store.add_files(job_id, "default", [NewFile("a.tif", 1, None, "k/a2")])
    store.add_files(job_id, "default", [NewFile("b.tif", 1, None, "k/b")])
    assert store.claim("w", 30) is None  # not started
    store.start_job(job_id, "default")
    with pytest.raises(JobConflict):
        store.start_job(job_id, "default")
    claim = store.claim("w", 30)
    assert claim is not None
    assert (claim.name, claim.position) == ("a.tif", 1)


def test_cancel_stops_pending_files_and_tells_the_running_ones(store: JobStore) -> None:
    job_id = make_job(store, 3)
    running = store.claim("w", 30)
    assert running is not None
    store.cancel(job_id, "default")
    assert store.get_job(job_id, "default")["status"] == JobStatus.cancelled
    assert store.claim("w", 30) is None
    assert store.heartbeat(running, 30, 0, 0).cancelled
    assert store.claim_assembly("w", 30) is None  # a file is still stopping
    with pytest.raises(JobConflict, match="still stopping"):
        store.delete(job_id, "default")
    store.stop_cancelled(running)
    assembly = store.claim_assembly("w", 30)
    assert assembly is not None
    assert assembly.status == JobStatus.cancelled
    with pytest.raises(JobConflict, match="already ended"):
        store.cancel(job_id, "default")


def test_assembly_sets_the_final_status_once(store: JobStore) -> None:
    ok = make_job(store, 1, refused=1)
    claim = store.claim("w", 30)
    assert claim is not None
    store.complete(claim, result(1))
    assembly = store.claim_assembly("w", 30)
    assert assembly is not None
    assert assembly.job_id == ok
    assert store.claim_assembly("w2", 30) is None  # held
    job = store.finish_assembly(assembly, "w", coco=("a" * 64, 10), geojson=("b" * 64, 5), annotations=1)
    assert job["status"] == JobStatus.succeeded
    assert store.claim_assembly("w", 30) is None

    bad = make_job(store, 0, refused=2)
    assembly = store.claim_assembly("w", 30)
    assert assembly is not None
    assert assembly.job_id == bad
    with pytest.raises(LeaseLost):
        store.finish_assembly(
            assembly, "someone-else", coco=("a" * 64, 1), geojson=("b" * 64, 1), annotations=0
        )
    job = store.finish_assembly(assembly, "w", coco=("a" * 64, 1), geojson=("b" * 64, 1), annotations=0)
    assert job["status"] == JobStatus.failed


def test_events_are_numbered_and_replayable(store: JobStore) -> None:
    job_id = make_job(store, 1)
    claim = store.claim("w", 30)
    assert claim is not None
    store.complete(claim, result(2))
    events = store.events_after(job_id, 0)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == ["status", "status", "file"]
    assert events[-1]["data"]["detections"] == 2
    assert store.events_after(job_id, events[1]["seq"]) == events[2:]


def test_other_tenants_and_unknown_ids_are_not_found(store: JobStore) -> None:
    job_id = make_job(store, 1)
    for call in (
        lambda: store.get_job(job_id, "someone-else"),
        lambda: store.cancel(job_id, "someone-else"),
        lambda: store.get_job("nope", "default"),
    ):
        with pytest.raises(JobNotFound):
            call()


def test_deleting_an_ended_job_removes_its_rows(store: JobStore, engine: sa.Engine) -> None:
    job_id = make_job(store, 1)
    claim = store.claim("w", 30)
    assert claim is not None
    with pytest.raises(JobConflict):
        store.delete(job_id, "default")
    store.complete(claim, result(4))
    assembly = store.claim_assembly("w", 30)
    assert assembly is not None
    store.finish_assembly(assembly, "w", coco=("a" * 64, 1), geojson=("b" * 64, 1), annotations=4)
    store.delete(job_id, "default")
    with engine.connect() as conn:
        counts: list[Any] = [
            conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("jobs", "files", "detections", "job_events")
        ]
    assert counts == [0, 0, 0, 0]


def test_a_tenants_job_limit_holds_under_concurrent_creation(database_url: str) -> None:
    from gateway.auth.tenants import TenantLimitReached, TenantLimits
    from gateway.db.engine import create_engine

    limits = TenantLimits(max_active_jobs=2, max_files_per_job=10, max_storage_bytes=10**9)
    engines = [create_engine(database_url) for _ in range(5)]
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(engines))

    def create(engine: sa.Engine) -> None:
        barrier.wait()
        job_id = new_job_id()
        try:
            JobStore(engine).create_job(
                job_id=job_id,
                tenant="acme",
                name="race",
                priority=JobPriority.normal,
                parameters=PARAMETERS,
                model=MODEL,
                new_files=[NewFile("a.tif", 100, None, f"jobs/{job_id}/uploads/a")],
                start=True,
                limits=limits,
            )
            outcome = "created"
        except TenantLimitReached:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert sorted(outcomes) == ["created", "created", "refused", "refused", "refused"]

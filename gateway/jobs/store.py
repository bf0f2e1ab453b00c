"""Job state in the database: creation, leases on files, results committed under a live lease.

Work is claimed one file at a time with a lease (owner, token, expiry, attempt count), the designs of
Oban, River and Solid Queue in a small table of our own:

* **claim**: in one transaction, pick the running job with the smallest *pass* (stride scheduling:
  each claim advances a job's pass by ``1 / weight``, so jobs share the workers in proportion to their
  priority and a one-file job behind a thousand-file job is served at once), then its first claimable
  file (pending and due, or running with an expired lease), and take it: new token, expiry,
  ``attempts + 1``. PostgreSQL locks the rows with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers
  pass each other; SQLite serialises writers (``BEGIN IMMEDIATE``, :mod:`gateway.db.engine`).
* **heartbeat**: the holder renews the expiry while the file runs and learns whether the job was
  cancelled.
* **complete / fail**: accepted only while the token is still the file's (``WHERE lease_token = ?``),
  so a worker whose lease expired and was taken over can never write. Completing replaces the file's
  detections and bumps the job's counters in one transaction: a file's results are committed whole
  with its completion, or not at all, and writing them twice gives the same rows.
* **assembly**: once no file of a job is pending or running, one worker takes a lease on the job,
  writes its COCO and GeoJSON, and commits the final status with the results' digests.

Every change a user can watch is also appended to ``job_events`` (Server-Sent Events with ids), and
the changes a job's webhook is told of are written to the webhook outbox in the same transaction
(:mod:`gateway.webhooks.outbox`): the job's start, each failed file, its progress at most every
``progress_interval_s``, and its end, committed by :meth:`JobStore.finish_assembly` with the results'
digests.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gateway.auth.tenants import TenantLimitReached, TenantLimits, TenantQuotaExceeded
from gateway.db.engine import aware, utcnow
from gateway.db.tables import detections, files, job_events, jobs
from gateway.errors import TYPE_BASE, GatewayError, InvalidParameter
from gateway.jobs import views
from gateway.jobs.models import TERMINAL, Assembly, Claim, FileStatus, JobPriority, JobStatus
from gateway.webhooks import events as webhook_events
from gateway.webhooks.outbox import enqueue

CLAIMABLE_JOBS = (JobStatus.queued.value, JobStatus.running.value)
ERRORS_SHOWN = 100
"""Failed files listed in a job's resource; all of them are at ``/v1/jobs/{id}/errors``."""


class JobNotFound(GatewayError):
    status = 404
    slug = "job-not-found"
    title = "No such job"


class JobConflict(GatewayError):
    """The request contradicts the job's state (start twice, delete while running, a repeated name)."""

    status = 409
    slug = "job-conflict"
    title = "Conflict with the job's state"


class ResultsNotReady(GatewayError):
    status = 409
    slug = "results-not-ready"
    title = "Results not ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class LeaseLost(Exception):
    """The file's lease expired and another worker took it (or the job is gone): drop the work."""


@dataclass(frozen=True, slots=True)
class NewFile:
    """A file received for a job: stored under ``storage_key``, or refused at upload (``error``)."""

    name: str
    size: int
    sha256: str | None
    storage_key: str | None
    error: GatewayError | None = None


@dataclass(frozen=True, slots=True)
class FileResult:
    """What a worker commits for a file: the image's facts and its detections, in order."""

    width: int
    height: int
    crs: str | None
    transform: list[float] | None
    warnings: list[str]
    tiles_total: int
    tiles_skipped: int
    rows: list[dict[str, Any]]
    """One per detection: ``category_id, x, y, w, h, score, geometry`` (GeoJSON text or None)."""
    gsd_m: float | None = None
    gsd_source: str | None = None
    inference_gsd_m: float | None = None
    resample_factor: float = 1.0
    out_of_domain: dict[str, Any] | None = None
    """The file's out-of-domain check (:meth:`~gateway.pipeline.domain.DomainCheck.to_json`)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    held: bool
    """The lease is still this worker's."""
    cancelled: bool
    """The job was cancelled: stop the file."""


def new_job_id() -> str:
    """A 32-character id that sorts by creation time (milliseconds, then randomness)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


@dataclass(frozen=True, slots=True)
class TenantUsage:
    active_jobs: int
    """Jobs queued or running."""
    storage_bytes: int
    """Uploads still kept plus results."""


class JobStore:
    """Job and file state in one database; every method is one transaction (blocking: run it in a
    database thread, see :class:`gateway.db.engine.Database`).

    Args:
        engine: the job database.
        public_url: base of the result links in webhook events (paths alone when empty).
        progress_interval_s: ``job.progress`` webhook events at most this often per job.
    """

    def __init__(self, engine: sa.Engine, *, public_url: str = "", progress_interval_s: float = 30.0) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.public_url = public_url.rstrip("/")
        self.progress_interval_s = progress_interval_s

    # -- creation ------------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        job_id: str,
        tenant: str,
        name: str,
        priority: JobPriority,
        parameters: dict[str, Any],
        model: dict[str, str | None],
        new_files: Sequence[NewFile],
        start: bool,
        idempotency_key: str | None = None,
        request_sha256: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_events: Sequence[str] = (),
        limits: TenantLimits | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Insert a job with its files; returns the job row and whether it was created now.

        With an ``idempotency_key`` already used by this tenant, the existing job is returned when
        ``request_sha256`` matches and :class:`JobConflict` raised when it does not.

        Raises:
            TenantLimitReached: a started job beyond the tenant's jobs queued or running (429).
            TenantQuotaExceeded: more files than a job of the tenant may hold, or beyond its storage.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            if idempotency_key is not None:
                existing = conn.execute(
                    sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == idempotency_key)
                ).first()
                if existing is not None:
                    if existing.request_sha256 != request_sha256:
                        raise JobConflict(
                            f"the Idempotency-Key {idempotency_key!r} was used for a different request "
                            f"(job {existing.id})",
                            job_id=existing.id,
                        )
                    return dict(existing._mapping), False
            if limits is not None:
                self._within_limits(
                    conn, tenant, limits, start=start, files=len(new_files), new_files=new_files
                )
            status = JobStatus.queued if start else JobStatus.created
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    tenant=tenant,
                    name=name,
                    status=status.value,
                    priority=priority.value,
                    parameters=parameters,
                    webhook_url=webhook_url,
                    webhook_secret=webhook_secret,
                    webhook_events=list(webhook_events) or None,
                    idempotency_key=idempotency_key,
                    request_sha256=request_sha256,
                    model_name=model["name"] or "",
                    model_version=model["version"] or "",
                    model_sha256=model["sha256"],
                    created_at=now,
                    queued_at=now if start else None,
                    pass_value=self._entry_pass(conn) if start else 0.0,
                    updated_at=now,
                )
            )
            self._insert_files(conn, job_id, 1, new_files, now)
            if start:
                self._refuse_empty(conn, job_id)
            self._event(conn, job_id, "status", {"status": status.value})
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
        return dict(row._mapping), True

    def add_files(
        self, job_id: str, tenant: str, new_files: Sequence[NewFile], limits: TenantLimits | None = None
    ) -> dict[str, Any]:
        """Append files to a job still in ``created``; names must be new to the job.

        Raises:
            TenantQuotaExceeded: the job would hold more files than the tenant's jobs may, or the tenant
                would store more bytes than it may.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            job = self._job(conn, job_id, tenant, lock=True)
            if job.status != JobStatus.created:
                raise JobConflict(
                    f"files can be added to a job in 'created' only; this one is {job.status!r}"
                )
            last = conn.execute(
                sa.select(sa.func.max(files.c.position)).where(files.c.job_id == job_id)
            ).scalar()
            taken = set(
                conn.execute(
                    sa.select(files.c.name).where(
                        files.c.job_id == job_id, files.c.name.in_([f.name for f in new_files])
                    )
                ).scalars()
            )
            if taken:
                raise JobConflict(
                    f"the job already has a file named {sorted(taken)[0]!r}", names=sorted(taken)
                )
            if limits is not None:
                held = conn.execute(sa.select(sa.func.count()).where(files.c.job_id == job_id)).scalar()
                self._within_limits(
                    conn,
                    tenant,
                    limits,
                    start=False,
                    files=int(held or 0) + len(new_files),
                    new_files=new_files,
                )
            self._insert_files(conn, job_id, (last or 0) + 1, new_files, now)
            return dict(self._job(conn, job_id, tenant)._mapping)

    def existing_names(self, job_id: str, tenant: str) -> set[str]:
        with self.engine.connect() as conn:
            self._job(conn, job_id, tenant)
            return set(conn.execute(sa.select(files.c.name).where(files.c.job_id == job_id)).scalars())

    def start_job(self, job_id: str, tenant: str, limits: TenantLimits | None = None) -> dict[str, Any]:
        now = utcnow()
        with self.engine.begin() as conn:
            job = self._job(conn, job_id, tenant, lock=True)
            if job.status != JobStatus.created:
                raise JobConflict(f"only a job in 'created' can be started; this one is {job.status!r}")
            self._refuse_empty(conn, job_id)
            if limits is not None:
                self._within_limits(conn, tenant, limits, start=True, files=0, new_files=())
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    status=JobStatus.queued.value,
                    queued_at=now,
                    pass_value=self._entry_pass(conn),
                    updated_at=now,
                )
            )
            self._event(conn, job_id, "status", {"status": JobStatus.queued.value})
            return dict(self._job(conn, job_id, tenant)._mapping)

    # -- reading -------------------------------------------------------------------------------------

    def get_job(self, job_id: str, tenant: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(self._job(conn, job_id, tenant)._mapping)

    def job_view(self, job_id: str, tenant: str) -> dict[str, Any]:
        """The job's resource as users see it (progress of running files and first errors included)."""
        with self.engine.connect() as conn:
            job = dict(self._job(conn, job_id, tenant)._mapping)
            done, total = self._running(conn, job_id)
            errors = conn.execute(
                sa.select(files)
                .where(files.c.job_id == job_id, files.c.status == FileStatus.failed.value)
                .order_by(files.c.position)
                .limit(ERRORS_SHOWN)
            ).all()
        return views.job_resource(
            job, views.progress(job, done, total, utcnow()), [dict(e._mapping) for e in errors]
        )

    def _running(self, conn: sa.Connection, job_id: str) -> tuple[int, int]:
        """Tiles done and tiles known of the job's files now running (not yet in its counters)."""
        row = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(files.c.tiles_done), 0),
                sa.func.coalesce(sa.func.sum(files.c.tiles_total), 0),
            ).where(files.c.job_id == job_id, files.c.status == FileStatus.running.value)
        ).one()
        return int(row[0]), int(row[1])

    def list_jobs(
        self, tenant: str, *, status: JobStatus | None, before: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Jobs newest first; ``before`` is the id of the last job of the previous page."""
        query = sa.select(jobs).where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if before is not None:
            query = query.where(jobs.c.id < before)
        query = query.order_by(jobs.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def list_files(
        self, job_id: str, tenant: str, *, after: int, limit: int, failed_only: bool = False
    ) -> list[dict[str, Any]]:
        """Files in upload order after position ``after``."""
        query = sa.select(files).where(files.c.job_id == job_id, files.c.position > after)
        if failed_only:
            query = query.where(files.c.status == FileStatus.failed.value)
        query = query.order_by(files.c.position).limit(limit)
        with self.engine.connect() as conn:
            self._job(conn, job_id, tenant)
            return [dict(row._mapping) for row in conn.execute(query)]

    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > seq)
            .order_by(job_events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def images(self, job_id: str) -> Iterator[Any]:
        """The succeeded files of a job in upload order (streamed)."""
        query = (
            sa.select(files)
            .where(files.c.job_id == job_id, files.c.status == FileStatus.succeeded.value)
            .order_by(files.c.position)
        )
        with self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=500).execute(query)

    def detection_rows(self, job_id: str) -> Iterator[Any]:
        """Every detection of the job's succeeded files, by file position then order (streamed)."""
        query = (
            sa.select(
                files.c.position,
                files.c.name,
                detections.c.category_id,
                detections.c.x,
                detections.c.y,
                detections.c.w,
                detections.c.h,
                detections.c.score,
                detections.c.geometry,
            )
            .join(files, files.c.id == detections.c.file_id)
            .where(files.c.job_id == job_id, files.c.status == FileStatus.succeeded.value)
            .order_by(files.c.position, detections.c.seq)
        )
        with self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=5000, stream_results=True).execute(query)

    def category_ids(self, job_id: str) -> list[int]:
        """The distinct category ids among the detections of the job's succeeded files."""
        query = (
            sa.select(detections.c.category_id)
            .distinct()
            .join(files, files.c.id == detections.c.file_id)
            .where(files.c.job_id == job_id, files.c.status == FileStatus.succeeded.value)
        )
        with self.engine.connect() as conn:
            return sorted(int(row[0]) for row in conn.execute(query))

    # -- user actions --------------------------------------------------------------------------------

    def cancel(self, job_id: str, tenant: str) -> dict[str, Any]:
        """Cancel a job that has not ended: pending files are dropped, running ones are stopped by their
        workers; the job is ``cancelled`` at once and its partial results are assembled afterwards."""
        now = utcnow()
        with self.engine.begin() as conn:
            job = self._job(conn, job_id, tenant, lock=True)
            if JobStatus(job.status).terminal:
                raise JobConflict(f"the job has already ended ({job.status})")
            conn.execute(
                files.update()
                .where(files.c.job_id == job_id, files.c.status == FileStatus.pending.value)
                .values(status=FileStatus.cancelled.value, finished_at=now)
            )
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    status=JobStatus.cancelled.value, cancel_requested=True, finished_at=now, updated_at=now
                )
            )
            self._event(conn, job_id, "status", {"status": JobStatus.cancelled.value})
            return dict(self._job(conn, job_id, tenant)._mapping)

    def delete(self, job_id: str, tenant: str) -> None:
        with self.engine.begin() as conn:
            job = self._job(conn, job_id, tenant, lock=True)
            if not JobStatus(job.status).terminal and job.status != JobStatus.created:
                raise JobConflict(f"a {job.status} job cannot be deleted; cancel it first")
            busy = conn.execute(
                sa.select(sa.func.count()).where(
                    files.c.job_id == job_id, files.c.status == FileStatus.running.value
                )
            ).scalar()
            if busy:
                raise JobConflict("the job's cancelled files are still stopping; retry in a moment")
            file_ids = sa.select(files.c.id).where(files.c.job_id == job_id).scalar_subquery()
            conn.execute(detections.delete().where(detections.c.file_id.in_(file_ids)))
            conn.execute(files.delete().where(files.c.job_id == job_id))
            conn.execute(job_events.delete().where(job_events.c.job_id == job_id))
            conn.execute(jobs.delete().where(jobs.c.id == job_id))

    # -- workers -------------------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float) -> Claim | None:
        """Take the next file to work on (see the module docstring), or ``None`` when there is none."""
        now = utcnow()
        claimable = sa.or_(
            sa.and_(files.c.status == FileStatus.pending.value, files.c.available_at <= now),
            sa.and_(files.c.status == FileStatus.running.value, files.c.lease_expires_at < now),
        )
        with self.engine.begin() as conn:
            job_query = (
                sa.select(jobs.c.id, jobs.c.priority, jobs.c.status, jobs.c.parameters)
                .where(
                    jobs.c.status.in_(CLAIMABLE_JOBS),
                    sa.exists().where(files.c.job_id == jobs.c.id, claimable),
                )
                .order_by(jobs.c.pass_value, jobs.c.id)
                .limit(1)
            )
            if self.postgres:
                job_query = job_query.with_for_update(skip_locked=True)
            job = conn.execute(job_query).first()
            if job is None:
                return None
            file_query = (
                sa.select(
                    files.c.id,
                    files.c.position,
                    files.c.name,
                    files.c.storage_key,
                    files.c.attempts,
                    files.c.sha256,
                )
                .where(files.c.job_id == job.id, claimable)
                .order_by(files.c.position)
                .limit(1)
            )
            if self.postgres:
                file_query = file_query.with_for_update(skip_locked=True)
            chosen = conn.execute(file_query).first()
            if chosen is None:
                return None
            token = secrets.token_hex(16)
            conn.execute(
                files.update()
                .where(files.c.id == chosen.id)
                .values(
                    status=FileStatus.running.value,
                    lease_owner=owner,
                    lease_token=token,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=files.c.attempts + 1,
                    tiles_done=0,
                    started_at=sa.func.coalesce(files.c.started_at, now),
                )
            )
            stride = 1.0 / JobPriority(job.priority).weight
            update = (
                jobs.update()
                .where(jobs.c.id == job.id)
                .values(pass_value=jobs.c.pass_value + stride, updated_at=now)
            )
            if job.status == JobStatus.queued:
                update = update.values(status=JobStatus.running.value, started_at=now)
            conn.execute(update)
            if job.status == JobStatus.queued:
                self._event(conn, job.id, "status", {"status": JobStatus.running.value})
                started = self._row(conn, job.id)
                enqueue(
                    conn,
                    started,
                    webhook_events.EventType.job_started,
                    views.event_data(started, views.progress(started, 0, 0, now), self.public_url),
                    now,
                )
            return Claim(
                file_id=chosen.id,
                job_id=job.id,
                position=chosen.position,
                name=chosen.name,
                storage_key=chosen.storage_key,
                token=token,
                attempt=chosen.attempts + 1,
                parameters=dict(job.parameters),
                sha256=chosen.sha256,
            )

    def heartbeat(self, claim: Claim, lease_s: float, tiles_done: int, tiles_total: int) -> Heartbeat:
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(
                files.update()
                .where(files.c.id == claim.file_id, files.c.lease_token == claim.token)
                .values(
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    tiles_done=tiles_done,
                    tiles_total=tiles_total,
                )
            ).rowcount
            cancelled = conn.execute(
                sa.select(jobs.c.cancel_requested).where(jobs.c.id == claim.job_id)
            ).scalar()
        return Heartbeat(held=bool(held), cancelled=bool(cancelled) or cancelled is None)

    def complete(self, claim: Claim, result: FileResult) -> dict[str, Any]:
        """Commit a file's results under its lease; returns the job's new counters.

        Raises:
            LeaseLost: the token is no longer the file's.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            updated = conn.execute(
                files.update()
                .where(
                    files.c.id == claim.file_id,
                    files.c.lease_token == claim.token,
                    files.c.status == FileStatus.running.value,
                )
                .values(
                    status=FileStatus.succeeded.value,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    width=result.width,
                    height=result.height,
                    crs=result.crs,
                    transform=result.transform,
                    warnings=result.warnings,
                    gsd_m=result.gsd_m,
                    gsd_source=result.gsd_source,
                    inference_gsd_m=result.inference_gsd_m,
                    resample_factor=result.resample_factor,
                    out_of_domain=result.out_of_domain,
                    tiles_total=result.tiles_total,
                    tiles_done=result.tiles_total,
                    tiles_skipped=result.tiles_skipped,
                    detections=len(result.rows),
                    error_type=None,
                    error_status=None,
                    error_detail=None,
                    finished_at=now,
                )
            ).rowcount
            if not updated:
                raise LeaseLost(f"file {claim.file_id} is no longer held with this lease")
            conn.execute(detections.delete().where(detections.c.file_id == claim.file_id))
            if result.rows:
                conn.execute(
                    detections.insert(),
                    [{"file_id": claim.file_id, "seq": seq, **row} for seq, row in enumerate(result.rows)],
                )
            conn.execute(
                jobs.update()
                .where(jobs.c.id == claim.job_id)
                .values(
                    files_done=jobs.c.files_done + 1,
                    tiles_total=jobs.c.tiles_total + result.tiles_total,
                    tiles_done=jobs.c.tiles_done + result.tiles_total,
                    tiles_skipped=jobs.c.tiles_skipped + result.tiles_skipped,
                    detections=jobs.c.detections + len(result.rows),
                    updated_at=now,
                )
            )
            self._event(
                conn,
                claim.job_id,
                "file",
                {
                    "file": claim.name,
                    "position": claim.position,
                    "status": FileStatus.succeeded.value,
                    "tiles": result.tiles_total,
                    "detections": len(result.rows),
                },
            )
            return dict(conn.execute(sa.select(jobs).where(jobs.c.id == claim.job_id)).one()._mapping)

    def fail(
        self,
        claim: Claim,
        error: GatewayError,
        *,
        retry: bool,
        max_attempts: int,
        backoff_s: float,
    ) -> FileStatus:
        """Record a failure: back to the queue after a backoff while attempts remain and a retry can
        help, else ``failed`` with the error a direct request would have answered with.

        Raises:
            LeaseLost: the token is no longer the file's.
        """
        now = utcnow()
        again = retry and error.retryable and claim.attempt < max_attempts
        with self.engine.begin() as conn:
            common = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
            error_fields = {
                "error_type": error.slug,
                "error_status": error.status,
                "error_detail": error.detail,
            }
            if again:
                values = {
                    **common,
                    **error_fields,
                    "status": FileStatus.pending.value,
                    "available_at": now + timedelta(seconds=backoff_s * 2 ** (claim.attempt - 1)),
                }
            else:
                values = {**common, **error_fields, "status": FileStatus.failed.value, "finished_at": now}
            updated = conn.execute(
                files.update()
                .where(files.c.id == claim.file_id, files.c.lease_token == claim.token)
                .values(**values)
            ).rowcount
            if not updated:
                raise LeaseLost(f"file {claim.file_id} is no longer held with this lease")
            if again:
                return FileStatus.pending
            self._count_failure(conn, claim.job_id, claim.name, claim.position, error, now)
            return FileStatus.failed

    def release(self, claim: Claim, *, delay_s: float) -> None:
        """Give a file back without counting the attempt (the service, not the file, could not go on)."""
        with self.engine.begin() as conn:
            conn.execute(
                files.update()
                .where(files.c.id == claim.file_id, files.c.lease_token == claim.token)
                .values(
                    status=FileStatus.pending.value,
                    attempts=files.c.attempts - 1,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    available_at=utcnow() + timedelta(seconds=delay_s),
                )
            )

    def stop_cancelled(self, claim: Claim) -> None:
        """A running file of a cancelled job was stopped."""
        with self.engine.begin() as conn:
            conn.execute(
                files.update()
                .where(files.c.id == claim.file_id, files.c.lease_token == claim.token)
                .values(
                    status=FileStatus.cancelled.value,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    finished_at=utcnow(),
                )
            )

    def sweep(self, max_attempts: int) -> int:
        """Settle files whose lease expired and that may not be claimed again: out of attempts (failed)
        or of a cancelled job (cancelled). Returns how many."""
        now = utcnow()
        expired = sa.and_(files.c.status == FileStatus.running.value, files.c.lease_expires_at < now)
        settled = 0
        with self.engine.begin() as conn:
            stale = conn.execute(
                sa.select(
                    files.c.id,
                    files.c.job_id,
                    files.c.name,
                    files.c.position,
                    files.c.attempts,
                    jobs.c.status,
                )
                .join(jobs, jobs.c.id == files.c.job_id)
                .where(
                    expired, sa.or_(files.c.attempts >= max_attempts, jobs.c.status.notin_(CLAIMABLE_JOBS))
                )
            ).all()
            for row in stale:
                if row.status in CLAIMABLE_JOBS:
                    error = GatewayError(
                        f"The file's worker stopped without finishing it {row.attempts} times "
                        "(the service was restarted or a worker was lost); it was given up."
                    )
                    conn.execute(
                        files.update()
                        .where(files.c.id == row.id)
                        .values(
                            status=FileStatus.failed.value,
                            lease_owner=None,
                            lease_token=None,
                            lease_expires_at=None,
                            error_type="worker-lost",
                            error_status=500,
                            error_detail=error.detail,
                            finished_at=now,
                        )
                    )
                    self._count_failure(
                        conn, row.job_id, row.name, row.position, error, now, slug="worker-lost"
                    )
                else:
                    conn.execute(
                        files.update()
                        .where(files.c.id == row.id)
                        .values(status=FileStatus.cancelled.value, lease_token=None, finished_at=now)
                    )
                settled += 1
        return settled

    def claim_assembly(self, owner: str, lease_s: float) -> Assembly | None:
        """Take a job whose files are all settled and whose results are not written yet."""
        now = utcnow()
        unsettled = sa.exists().where(
            files.c.job_id == jobs.c.id,
            files.c.status.in_([FileStatus.pending.value, FileStatus.running.value]),
        )
        with self.engine.begin() as conn:
            query = (
                sa.select(jobs.c.id, jobs.c.status, jobs.c.created_at)
                .where(
                    jobs.c.status.in_([*CLAIMABLE_JOBS, JobStatus.cancelled.value]),
                    jobs.c.results_sha256.is_(None),
                    ~unsettled,
                    sa.or_(jobs.c.assembler.is_(None), jobs.c.assembler_expires_at < now),
                )
                .order_by(jobs.c.id)
                .limit(1)
            )
            if self.postgres:
                query = query.with_for_update(skip_locked=True)
            job = conn.execute(query).first()
            if job is None:
                return None
            token = secrets.token_hex(16)
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job.id)
                .values(assembler=f"{owner}/{token}", assembler_expires_at=now + timedelta(seconds=lease_s))
            )
            created = aware(job.created_at)
            assert created is not None
            return Assembly(job.id, token, JobStatus(job.status), created)

    def renew_assembly(self, assembly: Assembly, owner: str, lease_s: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == assembly.job_id, jobs.c.assembler == f"{owner}/{assembly.token}")
                .values(assembler_expires_at=utcnow() + timedelta(seconds=lease_s))
            )

    def job_row(self, job_id: str) -> dict[str, Any]:
        """A job's row whatever its tenant (for the engine, never for a request)."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()._mapping)

    def finish_assembly(
        self,
        assembly: Assembly,
        owner: str,
        *,
        coco: tuple[str, int],
        geojson: tuple[str, int],
        annotations: int,
    ) -> dict[str, Any]:
        """Commit the results' digests and the job's final status in one transaction.

        Raises:
            LeaseLost: another assembler took the job over.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            job = conn.execute(
                sa.select(jobs).where(
                    jobs.c.id == assembly.job_id, jobs.c.assembler == f"{owner}/{assembly.token}"
                )
            ).first()
            if job is None:
                raise LeaseLost(f"job {assembly.job_id} is assembled by another worker")
            status = JobStatus(job.status)
            if not status.terminal:
                status = JobStatus.succeeded if job.files_done > 0 else JobStatus.failed
            conn.execute(
                jobs.update()
                .where(jobs.c.id == assembly.job_id)
                .values(
                    status=status.value,
                    finished_at=job.finished_at or now,
                    results_sha256=coco[0],
                    results_bytes=coco[1],
                    geojson_sha256=geojson[0],
                    geojson_bytes=geojson[1],
                    annotations=annotations,
                    assembler=None,
                    assembler_expires_at=None,
                    updated_at=now,
                )
            )
            self._event(conn, assembly.job_id, "status", {"status": status.value, "results": True})
            ended = self._row(conn, assembly.job_id)
            enqueue(
                conn,
                ended,
                webhook_events.TERMINAL[status.value],
                views.event_data(ended, views.progress(ended, 0, 0, now), self.public_url),
                now,
            )
            return ended

    def add_progress_event(self, job_id: str) -> None:
        """Record the job's progress now (tiles of running files included) as an event, and as a
        ``job.progress`` webhook event when the job subscribed and the last one is old enough."""
        now = utcnow()
        with self.engine.begin() as conn:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if job is None or job.status not in CLAIMABLE_JOBS:
                return
            done, total = self._running(conn, job_id)
            row = dict(job._mapping)
            progress = views.progress(row, done, total, now)
            self._event(conn, job_id, "progress", progress)
            last = aware(job.webhook_progress_at)
            if last is not None and (now - last).total_seconds() < self.progress_interval_s:
                return
            kind = webhook_events.EventType.job_progress
            if enqueue(conn, row, kind, views.event_data(row, progress, self.public_url), now) is not None:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(webhook_progress_at=now))

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Jobs by status and files by status, over every tenant (for the gauges)."""
        active = [FileStatus.pending.value, FileStatus.running.value]
        with self.engine.connect() as conn:
            by_job = conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
            by_file = conn.execute(
                sa.select(files.c.status, sa.func.count())
                .where(files.c.status.in_(active))
                .group_by(files.c.status)
            ).all()
        return {str(k): int(v) for k, v in by_job}, {str(k): int(v) for k, v in by_file}

    def purgeable(self, finished_before: datetime) -> list[str]:
        """Ended jobs whose uploads are still kept and ended before ``finished_before``."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.status.in_([s.value for s in TERMINAL]),
                        jobs.c.results_sha256.is_not(None),
                        jobs.c.uploads_purged.is_(sa.false()),
                        jobs.c.finished_at < finished_before,
                    )
                ).scalars()
            )

    def mark_purged(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(uploads_purged=True))

    def job_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(jobs.c.id)).scalars())

    def tenant_usage(self, tenant: str) -> TenantUsage:
        with self.engine.connect() as conn:
            return self._usage(conn, tenant)

    # -- internals -----------------------------------------------------------------------------------

    def _job(self, conn: sa.Connection, job_id: str, tenant: str, *, lock: bool = False) -> sa.Row[Any]:
        query = sa.select(jobs).where(jobs.c.id == job_id, jobs.c.tenant == tenant)
        if lock and self.postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise JobNotFound(f"there is no job {job_id!r}")
        return row

    def _row(self, conn: sa.Connection, job_id: str) -> dict[str, Any]:
        return dict(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()._mapping)

    def _usage(self, conn: sa.Connection, tenant: str) -> TenantUsage:
        kept = sa.case((jobs.c.uploads_purged.is_(sa.false()), jobs.c.bytes_total), else_=0)
        results = sa.func.coalesce(jobs.c.results_bytes, 0) + sa.func.coalesce(jobs.c.geojson_bytes, 0)
        row = conn.execute(
            sa.select(
                sa.func.count().filter(jobs.c.status.in_(CLAIMABLE_JOBS)),
                sa.func.coalesce(sa.func.sum(kept + results), 0),
            ).where(jobs.c.tenant == tenant)
        ).one()
        return TenantUsage(int(row[0] or 0), int(row[1] or 0))

    def _within_limits(
        self,
        conn: sa.Connection,
        tenant: str,
        limits: TenantLimits,
        *,
        start: bool,
        files: int,
        new_files: Sequence[NewFile],
    ) -> None:
        if files > limits.max_files_per_job:
            raise TenantQuotaExceeded(
                f"a job of tenant {tenant!r} holds at most {limits.max_files_per_job} files; this one would "
                f"hold {files}",
                limit=limits.max_files_per_job,
            )
        if self.postgres:  # one tenant's creations queue here, so two cannot both take the last place
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"tenant:{tenant}"))))
        usage = self._usage(conn, tenant)
        if start and usage.active_jobs >= limits.max_active_jobs:
            raise TenantLimitReached(
                f"tenant {tenant!r} has {usage.active_jobs} jobs queued or running, its limit; retry once "
                "one has ended",
                limit=limits.max_active_jobs,
            )
        incoming = sum(new.size for new in new_files if new.storage_key is not None)
        if usage.storage_bytes + incoming > limits.max_storage_bytes:
            raise TenantQuotaExceeded(
                f"tenant {tenant!r} stores {usage.storage_bytes} bytes of its {limits.max_storage_bytes}; "
                f"these {incoming} bytes do not fit (delete ended jobs to make room)",
                limit=limits.max_storage_bytes,
            )

    def _entry_pass(self, conn: sa.Connection) -> float:
        """A queued job starts level with the running ones: it neither waits for them nor starves them."""
        lowest = conn.execute(
            sa.select(sa.func.min(jobs.c.pass_value)).where(jobs.c.status.in_(CLAIMABLE_JOBS))
        ).scalar()
        return float(lowest or 0.0)

    def _refuse_empty(self, conn: sa.Connection, job_id: str) -> None:
        count = conn.execute(sa.select(sa.func.count()).where(files.c.job_id == job_id)).scalar()
        if not count:
            raise InvalidParameter("the job has no files; add some before starting it")

    def _insert_files(
        self,
        conn: sa.Connection,
        job_id: str,
        first_position: int,
        new_files: Sequence[NewFile],
        now: datetime,
    ) -> None:
        if not new_files:
            return
        rows = []
        failed = 0
        for offset, new in enumerate(new_files):
            row: dict[str, Any] = {
                "job_id": job_id,
                "position": first_position + offset,
                "name": new.name,
                "size": new.size,
                "sha256": new.sha256,
                "storage_key": new.storage_key,
                "status": FileStatus.pending.value,
                "available_at": now,
                "error_type": None,
                "error_status": None,
                "error_detail": None,
                "finished_at": None,
            }
            if new.error is not None:
                failed += 1
                row.update(
                    status=FileStatus.failed.value,
                    error_type=new.error.slug,
                    error_status=new.error.status,
                    error_detail=new.error.detail,
                    finished_at=now,
                )
            rows.append(row)
        conn.execute(files.insert(), rows)
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(
                files_total=jobs.c.files_total + len(rows),
                files_failed=jobs.c.files_failed + failed,
                bytes_total=jobs.c.bytes_total + sum(new.size for new in new_files),
                updated_at=now,
            )
        )

    def _count_failure(
        self,
        conn: sa.Connection,
        job_id: str,
        name: str,
        position: int,
        error: GatewayError,
        now: datetime,
        slug: str | None = None,
    ) -> None:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(files_failed=jobs.c.files_failed + 1, updated_at=now)
        )
        job = self._row(conn, job_id)
        failure = {
            "job_id": job_id,
            "file": name,
            "position": position,
            "error": {
                "type": TYPE_BASE + (slug or error.slug),
                "status": error.status,
                "detail": error.detail,
            },
        }
        enqueue(conn, job, webhook_events.EventType.file_failed, failure, now)
        self._event(
            conn,
            job_id,
            "file",
            {
                "file": name,
                "position": position,
                "status": FileStatus.failed.value,
                "type": slug or error.slug,
                "detail": error.detail,
            },
        )

    def _event(self, conn: sa.Connection, job_id: str, kind: str, data: dict[str, Any]) -> int:
        seq = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(event_seq=jobs.c.event_seq + 1)
            .returning(jobs.c.event_seq)
        ).scalar_one()
        conn.execute(
            job_events.insert().values(job_id=job_id, seq=seq, type=kind, data=data, created_at=utcnow())
        )
        return int(seq)

"""The job worker: claims files, runs them through the ``Predictor``, commits results under its lease.

One worker runs inside each service process by default (``PALM_JOBS__WORKERS``); several processes,
here or on other machines, share the queue through the database's leases without knowing of each
other. A worker keeps ``files_in_flight`` files going at once (enough to keep Triton's dynamic batcher
fed), renews each file's lease while it runs, and:

* a file that succeeds is committed with its detections in one transaction (:meth:`JobStore.complete`);
* a file that fails for its own reasons fails alone, with the problem type ``/v1/predict`` would give;
  a decode timeout or a lost decoder is retried with backoff up to ``max_attempts``;
* when the model is unavailable (Triton down or restarting) the file goes back to the queue without
  counting an attempt and the worker stops claiming until the model answers ready again;
* a cancelled job's files are stopped within a heartbeat (at once in the process that took the cancel);
* at shutdown, files in flight go back to the queue for the next worker.

Jobs whose files are all settled get their results assembled here too (:mod:`gateway.jobs.results`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from typing import Any

import orjson

from gateway.db.engine import Database, DatabaseUnavailable, aware, utcnow
from gateway.errors import GatewayError, InferenceUnavailable, Overloaded
from gateway.jobs.models import Claim, FileStatus, JobStatus
from gateway.jobs.results import QUICKLOOK_KEY, ResultWriter
from gateway.jobs.store import FileResult, JobStore, LeaseLost
from gateway.metrics import Metrics
from gateway.options import PredictOptions
from gateway.pipeline.atomic import atomic_write
from gateway.pipeline.result import ImageResult
from gateway.predictor import InferenceBackend, Predictor
from gateway.scheduling import Priority
from gateway.settings import Settings
from gateway.storage import Storage

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
COUNT_EVERY_S = 5.0
"""How often the job and file gauges are refreshed from the database."""


class _Stop(Exception):
    """Why a file's task was cancelled from inside the worker."""


class JobWorker:
    """Works on every job's files in this process (see the module docstring).

    Args:
        store: the job state.
        db: runs the store's blocking calls off the event loop.
        storage: where uploads are read and results written.
        predictor: the engine shared with ``/v1/predict``.
        inference: asked whether the model is ready after an outage.
        results: writes a finished job's COCO and GeoJSON.
        settings: ``settings.jobs`` and the default score threshold.
    """

    def __init__(
        self,
        store: JobStore,
        db: Database,
        storage: Storage,
        predictor: Predictor,
        inference: InferenceBackend,
        results: ResultWriter,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.db = db
        self.storage = storage
        self.predictor = predictor
        self.inference = inference
        self.results = results
        self.settings = settings
        self.metrics = metrics
        self.jobs = settings.jobs
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], Claim] = {}
        self._reasons: dict[int, str] = {}
        self._progress: dict[int, tuple[int, int]] = {}
        self._paused_until = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[None] | None = None
        self._last_progress = 0.0
        self._last_maintenance = 0.0
        self._last_count = 0.0

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="job-worker")

    async def stop(self) -> None:
        """Stop claiming and give the files in flight back to the queue."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task, claim in list(self._tasks.items()):
            self._reasons[claim.file_id] = "shutdown"
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        """There may be new work (a job was started): look now instead of at the next poll."""
        self._wake.set()

    def cancel_job(self, job_id: str) -> None:
        """Stop this process's files of ``job_id`` now (other processes notice on their heartbeat)."""
        for task, claim in self._tasks.items():
            if claim.job_id == job_id:
                self._reasons[claim.file_id] = "cancelled"
                task.cancel()
        self._wake.set()

    # -- main loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                logger.warning("job worker: %s", exc.detail)
                await asyncio.sleep(max(self.jobs.poll_s, 1.0))
                continue
            except Exception:
                logger.exception("job worker iteration failed; retrying")
                await asyncio.sleep(self.jobs.poll_s)
                continue
            self._wake.clear()
            pending = [asyncio.ensure_future(self._wake.wait())]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(
                    [*pending, *self._tasks], timeout=self.jobs.poll_s, return_when=asyncio.FIRST_COMPLETED
                )
            for waiter in pending:
                waiter.cancel()

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._paused_until:
            while len(self._tasks) < self.jobs.files_in_flight:
                claim = await self.db.run(self.store.claim, self.owner, self.jobs.lease_s)
                if claim is None:
                    break
                task = asyncio.create_task(self._work(claim), name=f"job-file-{claim.file_id}")
                self._tasks[task] = claim
                task.add_done_callback(self._forget)
        assembly = await self.db.run(self.store.claim_assembly, self.owner, self.jobs.lease_s)
        if assembly is not None:
            job = await self.results.assemble(assembly, self.owner)
            if job is not None and self.metrics is not None and job["started_at"] is not None:
                started, finished = aware(job["started_at"]), aware(job["finished_at"])
                if started is not None and finished is not None:
                    self.metrics.job_duration.observe((finished - started).total_seconds())
        if now - self._last_progress >= PROGRESS_EVERY_S and self._tasks:
            self._last_progress = now
            await self._publish_progress()
        if self.metrics is not None and now - self._last_count >= COUNT_EVERY_S:
            self._last_count = now
            await self._count()
        if now - self._last_maintenance >= self.jobs.maintenance_s:
            self._last_maintenance = now
            await self._maintain()

    def _forget(self, task: asyncio.Task[None]) -> None:
        claim = self._tasks.pop(task, None)
        if claim is not None:
            self._reasons.pop(claim.file_id, None)
            self._progress.pop(claim.file_id, None)
        self._wake.set()

    # -- one file ------------------------------------------------------------------------------------

    async def _work(self, claim: Claim) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(claim, asyncio.current_task()))
        try:
            result = await self._predict(claim)
            if result.quicklook_png is not None:
                key = QUICKLOOK_KEY.format(job_id=claim.job_id, position=claim.position)
                await self.db.run(self._write, key, result.quicklook_png)
            file_result = _file_result(result)
            await self.db.run(self.store.complete, claim, file_result)
            if self.metrics is not None:
                self.metrics.job_files.labels("succeeded").inc()
                self.metrics.job_tiles.inc(file_result.tiles_total)
        except asyncio.CancelledError:
            await self._stopped(claim)
        except (InferenceUnavailable, Overloaded) as exc:
            logger.warning(
                "job %s file %s: %s; pausing until the model is ready", claim.job_id, claim.name, exc.detail
            )
            await self.db.run(self.store.release, claim, delay_s=1.0)
            if self._resuming is None or self._resuming.done():
                self._paused_until = time.monotonic() + 3600
                self._resuming = asyncio.create_task(self._resume_when_ready())
        except GatewayError as exc:
            status = await self._record_failure(claim, exc)
            if self.metrics is not None:
                self.metrics.job_files.labels("failed" if status == "failed" else "retried").inc()
            logger.info(
                "job %s file %s: %s (%s) -> %s", claim.job_id, claim.name, exc.slug, exc.detail, status
            )
        except LeaseLost as exc:
            logger.warning("job %s file %s: %s; its results were dropped", claim.job_id, claim.name, exc)
        except Exception as exc:
            logger.exception("job %s file %s failed unexpectedly", claim.job_id, claim.name)
            with contextlib.suppress(LeaseLost):
                await self._record_failure(
                    claim, GatewayError(f"The server failed on this file ({type(exc).__name__}).")
                )
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _predict(self, claim: Claim) -> ImageResult:
        parameters = claim.parameters
        options = PredictOptions.parse(
            score_threshold=parameters.get("score_threshold"),
            bands=parameters.get("bands"),
            default_score_threshold=self.settings.tiling.score_threshold,
            max_pixels=None,
            resample=parameters.get("resample"),
            gsd=parameters.get("gsd"),
        )
        path = await self.db.run(self.storage.local_path, claim.storage_key)

        def progress(done: int, total: int) -> None:
            self._progress[claim.file_id] = (done, total)

        return await self.predictor.predict_file(
            path,
            claim.name,
            options,
            sha256=claim.sha256,
            progress=progress,
            priority=Priority.BATCH,
            quicklook_max_side=self.jobs.quicklook_max_side or None,
        )

    def _write(self, key: str, data: bytes) -> None:
        with atomic_write(self.storage.result_path(key)) as out:
            out.write(data)

    async def _record_failure(self, claim: Claim, error: GatewayError) -> str:
        status = await self.db.run(
            self.store.fail,
            claim,
            error,
            retry=True,
            max_attempts=self.jobs.max_attempts,
            backoff_s=self.jobs.retry_backoff_s,
        )
        return str(status)

    async def _stopped(self, claim: Claim) -> None:
        reason = self._reasons.get(claim.file_id, "shutdown")
        with contextlib.suppress(Exception):
            if reason == "cancelled":
                await asyncio.shield(self.db.run(self.store.stop_cancelled, claim))
            elif reason == "shutdown":
                await asyncio.shield(self.db.run(self.store.release, claim, delay_s=0.0))

    async def _heartbeat(self, claim: Claim, task: asyncio.Task[Any] | None) -> None:
        interval = min(self.jobs.lease_s / 3, 1.0)
        while True:
            await asyncio.sleep(interval)
            done, total = self._progress.get(claim.file_id, (0, 0))
            try:
                beat = await self.db.run(self.store.heartbeat, claim, self.jobs.lease_s, done, total)
            except Exception:
                logger.exception("heartbeat of job %s file %s failed", claim.job_id, claim.name)
                continue
            if task is None:
                return
            if beat.cancelled:
                self._reasons[claim.file_id] = "cancelled"
                task.cancel()
                return
            if not beat.held:
                self._reasons[claim.file_id] = "lease-lost"
                task.cancel()
                return

    async def _resume_when_ready(self) -> None:
        delay = 1.0
        while not await self.inference.model_ready():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self._paused_until = 0.0
        self._wake.set()

    # -- background duties ---------------------------------------------------------------------------

    async def _count(self) -> None:
        if self.metrics is None:
            return
        by_job, by_file = await self.db.run(self.store.counts)
        for status in JobStatus:
            self.metrics.jobs.labels(status.value).set(by_job.get(status.value, 0))
        self.metrics.job_files_waiting.set(by_file.get(FileStatus.pending.value, 0))
        self.metrics.job_files_running.set(by_file.get(FileStatus.running.value, 0))

    async def _publish_progress(self) -> None:
        for job_id in {claim.job_id for claim in self._tasks.values()}:
            await self.db.run(self.store.add_progress_event, job_id)

    async def _maintain(self) -> None:
        await self.db.run(self.store.sweep, self.jobs.max_attempts)
        await self._count()
        cutoff = utcnow() - timedelta(hours=self.jobs.retention_hours)
        for job_id in await self.db.run(self.store.purgeable, cutoff):
            await self.db.run(self.storage.delete_prefix, f"jobs/{job_id}/uploads")
            await self.db.run(self.store.mark_purged, job_id)
            logger.info(
                "job %s: uploads deleted after %.0f h of retention", job_id, self.jobs.retention_hours
            )


def _file_result(result: ImageResult) -> FileResult:
    det = result.detections
    boxes = det.boxes.astype(float).tolist()
    scores = det.scores.astype(float).tolist()
    classes = det.class_ids.tolist()
    rows = [
        {
            "category_id": int(category),
            "x": round(box[0], 2),
            "y": round(box[1], 2),
            "w": round(box[2] - box[0], 2),
            "h": round(box[3] - box[1], 2),
            "score": round(score, 4),
            "geometry": orjson.dumps(geometry).decode() if geometry is not None else None,
        }
        for box, score, category, geometry in zip(
            boxes,
            scores,
            classes,
            list(result.geometries) + [None] * (len(boxes) - len(result.geometries)),
            strict=True,
        )
    ]
    image = result.image
    return FileResult(
        width=image.width,
        height=image.height,
        crs=image.crs,
        transform=list(image.transform) if image.transform is not None else None,
        warnings=list(image.warnings),
        out_of_domain=image.out_of_domain.to_json() if image.out_of_domain is not None else None,
        tiles_total=result.tiles_total,
        tiles_skipped=result.tiles_skipped,
        rows=rows,
        gsd_m=image.gsd_m,
        gsd_source=image.gsd_source,
        inference_gsd_m=image.inference_gsd_m,
        resample_factor=image.resample_factor,
    )

"""``open_jobs(settings, runtime)``: the job engine assembled (database, storage, store, worker, and the
webhook outbox with its dispatcher)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from gateway.admission import Admission
from gateway.db.engine import Database, create_engine, database_url
from gateway.db.migrate import upgrade
from gateway.jobs.results import ResultWriter
from gateway.jobs.service import JobService
from gateway.jobs.store import JobStore
from gateway.jobs.worker import JobWorker
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.storage import LocalStorage, Storage
from gateway.webhooks.delivery import Sender
from gateway.webhooks.dispatcher import Dispatcher
from gateway.webhooks.outbox import Outbox
from gateway.webhooks.ssrf import UrlGuard

logger = logging.getLogger(__name__)

STAGING_MAX_AGE_S = 3600.0
"""Staged uploads older than this belong to no live request (one died mid-upload): removed at start."""


@dataclass(slots=True)
class Jobs:
    """What the job routes need."""

    db: Database
    store: JobStore
    storage: Storage
    service: JobService
    uploads: Admission
    worker: JobWorker | None
    outbox: Outbox
    dispatcher: Dispatcher | None = None

    async def view(self, job_id: str, tenant: str) -> dict[str, Any]:
        return await self.db.run(self.store.job_view, job_id, tenant)

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def cancel(self, job_id: str) -> None:
        if self.worker is not None:
            self.worker.cancel_job(job_id)


@asynccontextmanager
async def open_jobs(
    settings: Settings, runtime: Runtime, uploads: Admission, metrics: Metrics | None = None
) -> AsyncIterator[Jobs]:
    """Migrate the database, then run a worker in this process unless ``settings.jobs.workers`` is off,
    and a webhook dispatcher unless ``settings.webhook.dispatcher`` is."""
    async with AsyncExitStack() as stack:
        url = database_url(settings.data_dir, settings.database_url)
        db = Database(create_engine(url))
        stack.callback(db.close)
        await db.run(upgrade, db.engine)
        storage = LocalStorage(settings.data_dir / "storage")
        swept = await db.run(storage.sweep_staging, STAGING_MAX_AGE_S)
        if swept:
            logger.info("removed %d upload(s) left by requests that did not finish", swept)
        hooks = settings.webhook
        store = JobStore(
            db.engine, public_url=hooks.public_url or "", progress_interval_s=hooks.progress_interval_s
        )
        guard = UrlGuard(allow_private=hooks.allow_private)
        service = JobService(store, db, storage, runtime.model, settings, guard)
        outbox = Outbox(db.engine)
        dispatcher = None
        if hooks.dispatcher:
            sender = Sender(hooks.timeout_s, hooks.max_response_bytes)
            dispatcher = Dispatcher(outbox, db, guard, sender, hooks, metrics or Metrics())
            dispatcher.start()
            stack.push_async_callback(dispatcher.stop)
        worker = None
        if settings.jobs.workers:
            results = ResultWriter(store, db, storage, runtime.model, settings.jobs.lease_s)
            worker = JobWorker(
                store, db, storage, runtime.predictor, runtime.inference, results, settings, runtime.metrics
            )
            worker.start()
            stack.push_async_callback(worker.stop)
        logger.info(
            "jobs: database %s, storage %s", db.engine.url.render_as_string(hide_password=True), storage.root
        )
        yield Jobs(db, store, storage, service, uploads, worker, outbox, dispatcher)

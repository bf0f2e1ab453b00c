"""``create_app(settings, *, predictor=None)``: assembles the gateway; holds no logic of its own.

Without a ``predictor`` the lifespan opens the engine with :func:`gateway.runtime.open_runtime` (an
embedded ``tritonserver`` unless ``PALM_TRITON_URL`` is set, and the decode workers), then the job
engine with :func:`gateway.jobs.engine.open_jobs` (database, storage, a worker, the webhook
dispatcher), and closes both on shutdown. A caller that passes a ready
:class:`~gateway.predictor.Predictor` keeps ownership of it and gets no bulk jobs. Callers are
authenticated by :func:`gateway.auth.authenticator.open_auth` (API keys; with auth off, loopback only).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import __version__
from gateway.admission import EMBEDDED_BUSY_UPLOAD_BYTES_PER_S, Admission, UploadPacer
from gateway.api import docs, health, pages, predict
from gateway.api import jobs as jobs_api
from gateway.api import webhooks as webhooks_api
from gateway.api.deps import Services
from gateway.api.middleware import BodyGuard, ObservabilityMiddleware
from gateway.api.problems import install_problem_handlers
from gateway.auth.authenticator import open_auth, refuse_unsafe_exposure
from gateway.jobs.engine import Jobs, open_jobs
from gateway.metrics import Metrics
from gateway.predictor import InferenceBackend, Predictor
from gateway.runtime import open_runtime
from gateway.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def upload_pacer(settings: Settings, admission: Admission) -> UploadPacer | None:
    """The pacing of /v1/predict and /v1/quicklook bodies while ``admission`` (those endpoints'
    predictions) has requests in progress, if any."""
    rate = settings.limits.busy_upload_bytes_per_s
    if rate is None:  # the embedded Triton runs on the gateway's own cores; an external one does not
        rate = EMBEDDED_BUSY_UPLOAD_BYTES_PER_S if settings.triton.url is None else 0
    return UploadPacer(rate, lambda: admission.active > 0) if rate else None


def create_app(
    settings: Settings | None = None,
    *,
    predictor: Predictor | None = None,
    inference: InferenceBackend | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the gateway.

    Args:
        settings: configuration; defaults to the environment (``PALM_*``).
        predictor: a ready predictor (decode pool and inference backend already running); the app then
            neither starts nor stops an engine, and reports readiness from its inference backend.
        inference: an inference backend to use instead of Triton; the app starts and stops the rest of
            the engine (the decode workers) as it would with Triton.
        metrics: the metric families; a fresh registry by default.

    Raises:
        UnsafeExposure: authentication is off and ``settings.host`` is not a loopback address.
    """
    settings = settings if settings is not None else get_settings()
    refuse_unsafe_exposure(settings.auth.mode, settings.host)
    metrics = metrics if metrics is not None else Metrics()

    uploads = Admission(settings.limits.max_concurrent_uploads, "uploads")
    # Paced uploads hold their slots longer; large ones have slots of their own (UploadPacer).
    large_uploads = Admission(
        settings.limits.max_concurrent_large_uploads, "uploads over 2 MiB or of unknown length"
    )

    def services(
        ready: Predictor, jobs: Jobs | None = None, triton_metrics_url: str | None = None
    ) -> Services:
        admission = Admission(settings.limits.max_concurrent_predicts, "predictions")
        pacer = upload_pacer(settings, admission)
        return Services(
            settings=settings,
            metrics=metrics,
            model=ready.model,
            predictor=ready,
            readiness=ready.inference,
            admission=admission,
            uploads=uploads,
            large_uploads=large_uploads if pacer is not None else None,
            pacer=pacer,
            jobs=jobs,
            triton_metrics_url=triton_metrics_url,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_auth(settings, metrics) as app.state.authenticator:
            if predictor is not None:
                app.state.services = services(predictor)
                yield
                return
            async with (
                open_runtime(settings, metrics, inference=inference) as runtime,
                open_jobs(settings, runtime, uploads, metrics) as jobs,
            ):
                app.state.services = services(runtime.predictor, jobs, runtime.triton_metrics_url)
                model = runtime.model
                logger.info("gateway up: model %s/%s sha256=%s", model.name, model.version, model.sha256)
                yield

    app = FastAPI(
        title="Palm Serve",
        version=__version__,
        summary="Palm-tree and building detection on GeoTIFFs, served by NVIDIA Triton",
        lifespan=lifespan,
        docs_url=None,  # served from the package by gateway.api.docs, not from a CDN
        redoc_url=None,
    )
    install_problem_handlers(app)
    app.add_middleware(BodyGuard, limits=settings.http)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every status
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(jobs_api.router)
    app.include_router(webhooks_api.router)
    app.include_router(docs.router)
    app.include_router(pages.router)
    app.mount(docs.STATIC_PATH, docs.static_files(), name="static")
    return app

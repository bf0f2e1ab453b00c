"""``create_app(settings, **overrides)``: assembles the gateway; holds no logic of its own.

Collaborators are built in the lifespan unless a caller passes its own: ``inference`` (anything with
``infer``/``model_ready``/``close``, normally the Triton gRPC client) and ``decode`` (the isolated
decode pool). Without ``PALM_TRITON_URL`` the lifespan starts and supervises an embedded
``tritonserver``; with it, it starts nothing and talks to that server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from gateway import __version__
from gateway.api import health, predict
from gateway.api.deps import Admission, Services
from gateway.api.middleware import ObservabilityMiddleware
from gateway.decode import DecodePool
from gateway.errors import install_problem_handlers
from gateway.metrics import Metrics
from gateway.model_card import load_model_info
from gateway.predictor import InferenceBackend, Predictor
from gateway.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    inference: InferenceBackend | None = None,
    decode: DecodePool | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the gateway.

    Args:
        settings: configuration; defaults to the environment (``PALM_*``).
        inference: an already-connected inference backend; the app then neither starts nor closes one.
        decode: a decode pool to use instead of building one from ``settings.decode``.
        metrics: the metric families; a fresh registry by default.
    """
    settings = settings if settings is not None else get_settings()
    metrics = metrics if metrics is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            backend = inference
            if backend is None:
                backend = await stack.enter_async_context(connect_triton(settings, metrics))
            pool = decode
            if pool is None:
                pool = DecodePool.for_settings(settings)
                await pool.start()
                stack.push_async_callback(pool.close)
            model = load_model_info(settings.triton)
            app.state.services = Services(
                settings=settings,
                metrics=metrics,
                model=model,
                predictor=Predictor(settings, pool, backend, model, metrics),
                readiness=backend,
                admission=Admission(settings.limits.max_concurrent_predicts),
            )
            logger.info("gateway up: model %s/%s sha256=%s", model.name, model.version, model.sha256)
            yield

    app = FastAPI(
        title="Palm Serve",
        version=__version__,
        summary="Palm-tree and building detection on GeoTIFFs, served by NVIDIA Triton",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.include_router(health.router)
    app.include_router(predict.router)
    return app


@asynccontextmanager
async def connect_triton(settings: Settings, metrics: Metrics) -> AsyncIterator[InferenceBackend]:
    """The configured Triton, or an embedded one started (and stopped) here."""
    from gateway.triton.client import TritonClient
    from gateway.triton.launcher import EmbeddedTriton

    async with AsyncExitStack() as stack:
        url = settings.triton.url
        if url is None:
            launcher = EmbeddedTriton(
                settings.triton, settings.data_dir / "triton", on_restart=metrics.triton_restarts.inc
            )
            await anyio.to_thread.run_sync(launcher.start)
            stack.push_async_callback(anyio.to_thread.run_sync, launcher.stop)
            url = launcher.grpc_url
            logger.info("embedded tritonserver serving %s on %s", settings.triton.model_name, url)
        client = TritonClient(url, settings.triton)
        stack.push_async_callback(client.close)
        if settings.triton.url is None:
            # The embedded model is ready: refuse a batch size it would reject on every request.
            served = await client.model_info()
            if 0 < served.max_batch_size < settings.triton.batch_size:
                raise ValueError(
                    f"PALM_TRITON__BATCH_SIZE={settings.triton.batch_size} is above the max_batch_size "
                    f"{served.max_batch_size} of {settings.triton.model_name} "
                    f"(configs/{settings.triton.model_config_name}.pbtxt); set it to at most "
                    f"{served.max_batch_size}"
                )
        yield client

"""``open_runtime(settings, metrics)``: the one place that wires the inference engine.

The HTTP app, ``palm-serve predict`` and any other entry point get the same :class:`Runtime`: an
inference backend (the configured Triton, or an embedded ``tritonserver`` started and supervised here),
the pool of isolated decode workers, the served model's identity, and the :class:`Predictor` that runs
files through them. Leaving the context stops what it started.

Start-up order: the embedded ``tritonserver`` is spawned first, then the decode workers start and the
gateway's own heavier modules load while the server loads its model; a failure of either side stops the
other. This module therefore imports the engine's modules inside :func:`open_runtime`, not at the top.

The model's contract (tile side, ``K``, tensor names; :mod:`gateway.pipeline.contract`) sizes the decode
workers' shared-memory slots, so they start alongside the server when the model card states it; for a
model without one they start once Triton has described the model. Once the server answers, what it
states is checked against the card: a difference stops the start with both values named.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.decode import DecodePool
    from gateway.metrics import Metrics
    from gateway.pipeline.contract import ModelContract
    from gateway.pipeline.result import ModelInfo
    from gateway.predictor import InferenceBackend, Predictor

logger = logging.getLogger(__name__)

CONTRACT_TIMEOUT_S = 5.0
"""How long a configured (remote) Triton may take to describe the model at start-up."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """A running inference engine: what every entry point needs to predict."""

    settings: Settings
    metrics: Metrics
    inference: InferenceBackend
    decode: DecodePool
    model: ModelInfo
    predictor: Predictor
    triton_metrics_url: str | None = None
    """Triton's own Prometheus endpoint, re-exported at ``/metrics/triton``; ``None`` when unknown."""


@asynccontextmanager
async def open_runtime(
    settings: Settings, metrics: Metrics | None = None, *, inference: InferenceBackend | None = None
) -> AsyncIterator[Runtime]:
    """Start Triton (or connect to ``settings.triton.url``) and the decode workers; stop both on exit.

    Args:
        settings: the service configuration.
        metrics: where the engine's metrics go; a fresh registry by default.
        inference: a backend to use instead of Triton (the caller owns it); everything else is built
            as configured.

    Raises:
        InferenceUnavailable: the embedded Triton did not get the model ready.
        ContractMismatch: the model card and Triton describe different tensors (both named).
        ContractError: the model's contract is off what the gateway serves, or unknown (no card and
            no answer from Triton).
        ValueError: the configuration contradicts the served model (e.g. a batch size above its
            ``max_batch_size``, an overlap above half its tile).
        RuntimeError: the decode workers could not start.
    """
    from gateway.metrics import Metrics

    metrics = metrics if metrics is not None else Metrics()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        backend_context = connect_triton(settings, metrics) if inference is None else _given(inference)
        triton = asyncio.create_task(_enter(stack, backend_context))
        await asyncio.sleep(0)  # let the embedded server spawn before the imports below hold the loop
        from gateway.decode import DecodePool
        from gateway.model_card import card_contract, load_model_info
        from gateway.predictor import Predictor

        try:
            stated = card_contract(settings.triton)
        except BaseException:
            triton.cancel()  # the server's own context stops what it started
            await asyncio.gather(triton, return_exceptions=True)
            raise
        # Without a contract in the card the slots' size is Triton's to tell: the workers start after.
        pool = None if stated is None else DecodePool.for_settings(settings, stated)
        starting: list[Awaitable[object]] = [triton]
        if pool is not None:
            stack.push_async_callback(pool.close)
            starting.append(pool.start())
        started = await asyncio.gather(*starting, return_exceptions=True)
        failure = next((r for r in started if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure
        backend = triton.result()
        model = load_model_info(settings.triton, await _served_contract(backend, settings, stated))
        if pool is None:
            pool = DecodePool.for_settings(settings, model.contract)
            stack.push_async_callback(pool.close)
            await pool.start()
        predictor = Predictor(
            pool, backend, model, tiling=settings.tiling, triton=settings.triton, metrics=metrics
        )
        metrics.build_info.labels(__version__).set(1)
        metrics.model_info.labels(model.name, model.version, model.sha256 or "").set(1)
        metrics_url = getattr(backend, "metrics_url", None)
        yield Runtime(settings, metrics, backend, pool, model, predictor, metrics_url)


async def _served_contract(
    backend: InferenceBackend, settings: Settings, stated: ModelContract | None
) -> ModelContract | None:
    """What Triton states about the model, for the card to be checked against; ``None`` for another
    backend, or for a configured Triton that cannot be asked now (then the card's contract is used
    unchecked, and without one the start fails naming both sources).

    The client names and checks its calls by the card's contract from then on (Triton's, without one).
    """
    from gateway.errors import GatewayError
    from gateway.triton.client import TritonClient

    if not isinstance(backend, TritonClient):
        return None
    if settings.triton.url is None:
        served = await backend.served_contract()
    else:
        try:
            served = await backend.served_contract(timeout_s=CONTRACT_TIMEOUT_S)
        except GatewayError as exc:
            logger.warning(
                "cannot ask Triton at %s for the contract of model %r now: %s",
                settings.triton.url,
                settings.triton.model_name,
                exc.detail,
            )
            return None
    backend.use_contract(stated or served)
    return served


def triton_metrics_url(settings: Settings) -> str | None:
    """Where a configured Triton serves its metrics: ``PALM_TRITON__METRICS_URL``, else port 8002 of the
    gRPC host (Triton's default)."""
    if settings.triton.metrics_url:
        return settings.triton.metrics_url
    if settings.triton.url is None:
        return None
    host = settings.triton.url.rsplit(":", 1)[0]
    return f"http://{host}:8002/metrics"


@asynccontextmanager
async def _given(inference: InferenceBackend) -> AsyncIterator[InferenceBackend]:
    yield inference


async def _enter(
    stack: AsyncExitStack, context: AbstractAsyncContextManager[InferenceBackend]
) -> InferenceBackend:
    return await stack.enter_async_context(context)


@asynccontextmanager
async def connect_triton(settings: Settings, metrics: Metrics) -> AsyncIterator[InferenceBackend]:
    """The configured Triton, or an embedded one started (and stopped) here."""
    async with AsyncExitStack() as stack:
        url = settings.triton.url
        metrics_url = triton_metrics_url(settings)
        if url is None:
            from gateway.triton.launcher import EmbeddedTriton

            launcher = EmbeddedTriton(
                settings.triton, settings.data_dir / "triton", on_restart=metrics.triton_restarts.inc
            )
            # Stop is registered before start: interrupted while the model loads (Ctrl-C), the server
            # started in the background thread is stopped too, not left to die with this process.
            stack.push_async_callback(asyncio.to_thread, launcher.stop)
            await asyncio.to_thread(launcher.start)
            url = launcher.grpc_url
            metrics_url = launcher.metrics_url
            logger.info("embedded tritonserver serving %s on %s", settings.triton.model_name, url)
        from gateway.triton.client import TritonClient

        client = TritonClient(url, settings.triton)
        client.metrics_url = metrics_url
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

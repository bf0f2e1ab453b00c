"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import urllib.request

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import MetricsAccess, ServicesDep
from gateway.api.schemas import PROBLEM_RESPONSES, Health, Ready
from gateway.errors import InferenceUnavailable
from gateway.pipeline.render import model_record

router = APIRouter(tags=["operations"])

TRITON_METRICS_TIMEOUT_S = 3.0
READY_PROBE_TIMEOUT_S = 2.0
TRITON_METRICS_MAX_BYTES = 16 * 1024 * 1024


@router.get("/healthz", response_model=Health, summary="Liveness: 200 while the process lives")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: PROBLEM_RESPONSES[503]},
    summary="Readiness: 200 once Triton reports the model ready",
)
async def readyz(services: ServicesDep) -> JSONResponse:
    ready = await services.readiness.model_ready()
    services.metrics.triton_ready.set(1 if ready else 0)
    if not ready:
        raise InferenceUnavailable(
            f"model {services.model.name!r} version {services.model.triton_version} is not ready on Triton",
            retry_after_s=2,
        )
    return JSONResponse({"status": "ready", "model": model_record(services.model)})


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    dependencies=[MetricsAccess],
)
async def metrics(services: ServicesDep) -> Response:
    # Each scrape asks Triton, so palm_triton_ready is as fresh as the scrape; a Triton that does not
    # answer within the bound counts as not ready.
    try:
        ready = await asyncio.wait_for(services.readiness.model_ready(), READY_PROBE_TIMEOUT_S)
    except TimeoutError:
        ready = False
    services.metrics.triton_ready.set(1 if ready else 0)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/metrics/triton",
    summary="Triton's own Prometheus metrics (queue and compute time, batch sizes), re-exported",
    response_class=Response,
    responses={503: PROBLEM_RESPONSES[503]},
    dependencies=[MetricsAccess],
)
async def triton_metrics(services: ServicesDep) -> Response:
    url = services.triton_metrics_url
    if url is None:
        raise InferenceUnavailable(
            "this gateway does not know where its Triton serves metrics", retry_after_s=30
        )
    try:
        body = await asyncio.to_thread(_fetch, url)
    except OSError as exc:
        raise InferenceUnavailable(
            f"Triton's metrics at {url} are unavailable ({exc})", retry_after_s=5
        ) from exc
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _fetch(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback or the cluster: no proxy
    with opener.open(url, timeout=TRITON_METRICS_TIMEOUT_S) as response:
        return bytes(response.read(TRITON_METRICS_MAX_BYTES))

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import MetricsAccess, ServicesDep
from gateway.api.schemas import PROBLEM_RESPONSES, Health, Ready
from gateway.errors import InferenceUnavailable
from gateway.pipeline.render import model_record

router = APIRouter(tags=["operations"])


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
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

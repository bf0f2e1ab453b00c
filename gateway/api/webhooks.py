"""A job's webhook deliveries: what was sent, each attempt's answer, and sending the last event again."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.api.deps import JobsAccess, JobsDep, JobsPrincipal, StrictQuery
from gateway.api.schemas import PROBLEM_RESPONSES, WebhookDeliveries

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"], dependencies=[JobsAccess, StrictQuery])

RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    404: {"description": "No such job", "content": {"application/problem+json": {}}},
}


async def _deliveries(job_id: str, jobs: JobsDep, tenant: str) -> dict[str, Any]:
    job = await jobs.db.run(jobs.store.get_job, job_id, tenant)
    return {
        "webhook_url": job["webhook_url"],
        "disabled": bool(job["webhook_disabled"]),
        "deliveries": await jobs.db.run(jobs.outbox.deliveries, job_id),
    }


@router.get(
    "/{job_id}/webhooks",
    summary="The job's webhook events, oldest first, with every attempt (status code, latency, error)",
    response_model=WebhookDeliveries,
    responses=RESPONSES,
)
async def list_deliveries(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    return JSONResponse(await _deliveries(job_id, jobs, principal.tenant))


@router.post(
    "/{job_id}/webhooks/redeliver",
    summary="Send the job's latest event again now, as a new attempt with the same webhook-id",
    status_code=202,
    response_model=WebhookDeliveries,
    responses={
        **RESPONSES,
        409: {"description": "No event yet, or one in flight", "content": {"application/problem+json": {}}},
    },
)
async def redeliver(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    await jobs.db.run(jobs.store.get_job, job_id, principal.tenant)
    await jobs.db.run(jobs.outbox.redeliver, job_id)
    if jobs.dispatcher is not None:
        jobs.dispatcher.wake()
    return JSONResponse(await _deliveries(job_id, jobs, principal.tenant), status_code=202)

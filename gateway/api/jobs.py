"""Bulk jobs over HTTP: create (one request or staged), watch, cancel, delete, download results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from gateway.api.deps import JobsAccess, JobsDep, JobsPrincipal, StrictQuery, body_stream
from gateway.api.schemas import PROBLEM_RESPONSES, FileList, Job, JobList
from gateway.auth.tenants import limits_for
from gateway.errors import InputError, UnsupportedMediaType
from gateway.jobs.engine import Jobs
from gateway.jobs.models import JobStatus
from gateway.jobs.results import COCO_KEY, GEOJSON_KEY, QUICKLOOK_KEY, QuicklookNotFound
from gateway.jobs.store import ResultsNotReady
from gateway.jobs.views import file_resource

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[JobsAccess, StrictQuery])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0

JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    404: {"description": "No such job", "content": {"application/problem+json": {}}},
    409: {"description": "Conflicts with the job's state", "content": {"application/problem+json": {}}},
    429: {
        "description": "The tenant has its most jobs queued or running (see Retry-After)",
        "content": {"application/problem+json": {}},
    },
}

CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "GeoTIFF, PNG or JPEG files, repeated (folders kept in names)",
                        },
                        "name": {"type": "string"},
                        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
                        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                        "bands": {"type": "string", "example": "3,2,1"},
                        "resample": {"type": "string", "enum": ["auto", "off"]},
                        "gsd": {"type": "number", "exclusiveMinimum": 0, "description": "metres per pixel"},
                        "webhook_url": {"type": "string", "format": "uri"},
                        "webhook_secret": {"type": "string", "description": "whsec_<base64>; never shown"},
                        "webhook_events": {
                            "type": "string",
                            "example": "job.started,job.progress,file.failed",
                        },
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
                        "score_threshold": {"type": "number"},
                        "bands": {"type": "string"},
                        "resample": {"type": "string", "enum": ["auto", "off"]},
                        "gsd": {"type": "number"},
                        "webhook_url": {"type": "string"},
                        "webhook_secret": {"type": "string"},
                        "webhook_events": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "example": {"name": "north coast, 2026-11", "priority": "normal"},
            },
        },
    }
}


FILES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}


def _created(job: dict[str, Any], status: int) -> JSONResponse:
    return JSONResponse(job, status_code=status, headers={"Location": job["links"]["self"]})


@router.post(
    "",
    summary="Create a job: files in this request (started at once), or JSON for a staged job",
    description=(
        "multipart/form-data with `files` repeated: the files stream to storage as they arrive, each is "
        "checked by its bytes (an unreadable one is listed in the job's errors, the others go on), and "
        "the job starts; answers 202. application/json: a job in `created` that takes files over several "
        "`POST /v1/jobs/{id}/files` requests and starts with `POST /v1/jobs/{id}/start`; answers 201. "
        "An `Idempotency-Key` header makes the request safe to retry: the same key with the same "
        "content returns the same job, with different content 409."
    ),
    status_code=202,
    response_model=Job,
    responses={201: {"model": Job, "description": "staged job created"}, **JOB_RESPONSES},
    openapi_extra=CREATE_BODY,
)
async def create_job(
    request: Request,
    jobs: JobsDep,
    principal: JobsPrincipal,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            fields = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise InputError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise InputError("the body must be a JSON object of job fields")
        job = await jobs.service.create_staged(
            tenant=principal.tenant, fields=fields, idempotency_key=idempotency_key
        )
        return _created(await jobs.view(job["id"], principal.tenant), 201)
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "send files as multipart/form-data (parts named 'files'), or JSON to create a staged job"
        )
    async with jobs.uploads.slot():
        job, _ = await jobs.service.create_with_files(
            tenant=principal.tenant,
            content_type=content_type,
            content_length=request.headers.get("content-length"),
            body=body_stream(request),
            idempotency_key=idempotency_key,
        )
    jobs.wake()
    return _created(await jobs.view(job["id"], principal.tenant), 202)


@router.post(
    "/{job_id}/files",
    summary="Add files to a staged job (in `created`)",
    response_model=Job,
    responses=JOB_RESPONSES,
    openapi_extra=FILES_BODY,
)
async def add_files(job_id: str, request: Request, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    async with jobs.uploads.slot():
        await jobs.service.add_files(
            job_id=job_id,
            tenant=principal.tenant,
            content_type=request.headers.get("content-type"),
            content_length=request.headers.get("content-length"),
            body=body_stream(request),
        )
    return JSONResponse(await jobs.view(job_id, principal.tenant))


@router.post(
    "/{job_id}/start",
    summary="Queue a staged job",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
)
async def start_job(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    limits = limits_for(principal.tenant, jobs.service.settings)
    await jobs.db.run(jobs.store.start_job, job_id, principal.tenant, limits)
    jobs.wake()
    return JSONResponse(await jobs.view(job_id, principal.tenant), status_code=202)


@router.get("", summary="Jobs, newest first", response_model=JobList, responses=JOB_RESPONSES)
async def list_jobs(
    jobs: JobsDep,
    principal: JobsPrincipal,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page", max_length=64)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JSONResponse:
    rows = await jobs.db.run(
        jobs.store.list_jobs, principal.tenant, status=status, before=cursor, limit=limit
    )
    items = [await jobs.view(row["id"], principal.tenant) for row in rows]
    return JSONResponse({"jobs": items, "next_cursor": rows[-1]["id"] if len(rows) == limit else None})


@router.get(
    "/{job_id}",
    summary="A job: status, progress, first errors, links",
    response_model=Job,
    responses=JOB_RESPONSES,
)
async def get_job(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    return JSONResponse(await jobs.view(job_id, principal.tenant))


@router.get(
    "/{job_id}/files",
    summary="The job's files in upload order",
    response_model=FileList,
    responses=JOB_RESPONSES,
)
async def list_files(
    job_id: str,
    jobs: JobsDep,
    principal: JobsPrincipal,
    cursor: Annotated[int, Query(ge=0, description="`next_cursor` of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    rows = await jobs.db.run(jobs.store.list_files, job_id, principal.tenant, after=cursor, limit=limit)
    return JSONResponse(
        {
            "files": await _file_resources(jobs, rows),
            "next_cursor": rows[-1]["position"] if len(rows) == limit else None,
        }
    )


@router.get(
    "/{job_id}/errors",
    summary="Every failed file of the job",
    response_model=FileList,
    responses=JOB_RESPONSES,
)
async def list_errors(
    job_id: str,
    jobs: JobsDep,
    principal: JobsPrincipal,
    cursor: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    rows = await jobs.db.run(
        jobs.store.list_files, job_id, principal.tenant, after=cursor, limit=limit, failed_only=True
    )
    return JSONResponse(
        {
            "files": await _file_resources(jobs, rows),
            "next_cursor": rows[-1]["position"] if len(rows) == limit else None,
        }
    )


async def _file_resources(jobs: JobsDep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def stored() -> list[bool]:
        keys = (QUICKLOOK_KEY.format(job_id=r["job_id"], position=r["position"]) for r in rows)
        return [jobs.storage.exists(key) for key in keys]

    return [file_resource(r, quicklook=q) for r, q in zip(rows, await jobs.db.run(stored), strict=True)]


@router.get(
    "/{job_id}/files/{position}/quicklook",
    summary="A file's image as a PNG (at most 2048 px a side, alpha where pixels are invalid), for maps",
    description="Rendered when the file is processed, with the bands and scaling of its tiles; place it "
    "on a map at the file's `footprint`.",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **JOB_RESPONSES},
)
async def file_quicklook(
    job_id: str,
    position: Annotated[int, Path(ge=1, le=2**31 - 1)],
    jobs: JobsDep,
    principal: JobsPrincipal,
) -> Response:
    await jobs.db.run(jobs.store.get_job, job_id, principal.tenant)
    key = QUICKLOOK_KEY.format(job_id=job_id, position=position)
    if not await jobs.db.run(jobs.storage.exists, key):
        raise QuicklookNotFound(
            f"file {position} of job {job_id} has no quicklook (not processed, or failed)"
        )
    path = await jobs.db.run(jobs.storage.local_path, key)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job; partial results stay downloadable",
    response_model=Job,
    responses=JOB_RESPONSES,
)
async def cancel_job(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> JSONResponse:
    await jobs.db.run(jobs.store.cancel, job_id, principal.tenant)
    jobs.cancel(job_id)
    return JSONResponse(await jobs.view(job_id, principal.tenant))


@router.delete(
    "/{job_id}",
    summary="Delete an ended job with its uploads and results",
    status_code=204,
    responses=JOB_RESPONSES,
)
async def delete_job(job_id: str, jobs: JobsDep, principal: JobsPrincipal) -> Response:
    await jobs.db.run(jobs.store.delete, job_id, principal.tenant)
    await jobs.db.run(jobs.storage.delete_prefix, f"jobs/{job_id}")
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    summary="Server-Sent Events: progress, file, status (resume with Last-Event-ID)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **JOB_RESPONSES},
)
async def job_events(
    job_id: str,
    request: Request,
    jobs: JobsDep,
    principal: JobsPrincipal,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:
    await jobs.db.run(jobs.store.get_job, job_id, principal.tenant)  # 404 before the stream starts
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0

    async def stream() -> AsyncIterator[bytes]:
        seq = start
        quiet = 0.0
        yield b"retry: 2000\n\n"
        while True:
            events = await jobs.db.run(jobs.store.events_after, job_id, seq)
            for event in events:
                seq = event["seq"]
                yield (
                    f"id: {seq}\nevent: {event['type']}\ndata: ".encode()
                    + orjson.dumps(event["data"])
                    + b"\n\n"
                )
                if event["type"] == "status" and event["data"].get("results"):
                    return
            if events:
                quiet = 0.0
                continue
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)
            quiet += SSE_POLL_S
            if quiet >= SSE_KEEPALIVE_S:
                quiet = 0.0
                yield b": keep-alive\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _result(
    job_id: str,
    jobs: Jobs,
    tenant: str,
    request: Request,
    key: str,
    digest: str,
    media_type: str,
    filename: str,
) -> Response:
    job = await jobs.db.run(jobs.store.get_job, job_id, tenant)
    sha = job[digest]
    if not JobStatus(job["status"]).terminal:
        raise ResultsNotReady(f"the job is {job['status']}; its results exist once it has ended")
    if sha is None:
        raise ResultsNotReady("the job has ended; its results are being written")
    etag = f'"{sha}"'
    if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    path = await jobs.db.run(jobs.storage.local_path, key.format(job_id=job_id))
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        headers={"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"},
    )


@router.get(
    "/{job_id}/results",
    summary="The job's detections as one COCO document (409 until the job has ended)",
    response_class=FileResponse,
    responses={200: {"content": {"application/json": {}}}, **JOB_RESPONSES},
)
async def coco_results(job_id: str, jobs: JobsDep, principal: JobsPrincipal, request: Request) -> Response:
    return await _result(
        job_id,
        jobs,
        principal.tenant,
        request,
        COCO_KEY,
        "results_sha256",
        "application/json",
        f"{job_id}.coco.json",
    )


@router.get(
    "/{job_id}/results.geojson",
    summary="The job's detections as an RFC 7946 FeatureCollection in EPSG:4326",
    response_class=FileResponse,
    responses={200: {"content": {"application/geo+json": {}}}, **JOB_RESPONSES},
)
async def geojson_results(job_id: str, jobs: JobsDep, principal: JobsPrincipal, request: Request) -> Response:
    return await _result(
        job_id,
        jobs,
        principal.tenant,
        request,
        GEOJSON_KEY,
        "geojson_sha256",
        "application/geo+json",
        f"{job_id}.geojson",
    )

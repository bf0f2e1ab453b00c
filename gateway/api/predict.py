"""``POST /v1/predict``: one image in, detections out, synchronously."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway.api.deps import (
    PredictAccess,
    Services,
    ServicesDep,
    StrictQuery,
    body_stream,
    client_gone,
    unless_disconnected,
)
from gateway.api.schemas import PROBLEM_RESPONSES, PredictResponse
from gateway.errors import ClientClosedRequest, GatewayError
from gateway.options import PredictOptions
from gateway.pipeline.render import MEDIA_TYPES, OutputFormat, render
from gateway.pipeline.result import ImageResult
from gateway.uploads import Upload, discard, receive_upload

T = TypeVar("T")

router = APIRouter(tags=["inference"], dependencies=[PredictAccess, StrictQuery])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "GeoTIFF (any band layout; see the reading policy), PNG or JPEG",
                        }
                    },
                }
            }
        },
    }
}


RESAMPLE_QUERY = Query(
    description=(
        "`auto`: imagery finer than the model's ground sample distance range is resampled to it, imagery "
        "far coarser is refused (422 resolution-out-of-range); `off`: every image is read as it is, "
        "with a warning when it is outside the range"
    ),
    json_schema_extra={"enum": ["auto", "off"], "default": "auto"},
    max_length=16,
)
GSD_QUERY = Query(
    description=(
        "Ground sample distance in metres per pixel for an image without georeferencing (a PNG, a "
        "GeoTIFF without CRS); it is then checked and resampled like a georeferenced one"
    ),
    json_schema_extra={"exclusiveMinimum": 0.0, "maximum": 100000.0},
)


@router.post(
    "/v1/predict",
    summary="Detect palm trees and buildings in one image",
    description=(
        "Upload one image as multipart field `file`. Images larger than one of the model's tiles (512x512 "
        "for palm) are tiled with overlap, batched to Triton, and detections are merged across seams. "
        "Images above the pixel limit get 413; send those through `palm-serve predict`, which has no pixel "
        "limit. Images finer "
        "than the model's ground sample distance range are resampled to it while they are read (boxes "
        "come back in the file's pixels); images far coarser get 422 `resolution-out-of-range` unless "
        "`resample=off`."
    ),
    response_model=PredictResponse,
    responses={
        200: {"content": {"application/geo+json": {}}, "description": "json (default), coco or geojson"},
        **PROBLEM_RESPONSES,
    },
    openapi_extra=UPLOAD_BODY,
)
async def predict(
    request: Request,
    services: ServicesDep,
    score_threshold: Annotated[
        float | None,
        Query(
            description="Drop detections scoring below this (0 to 1)",
            json_schema_extra={"minimum": 0.0, "maximum": 1.0},
        ),
    ] = None,
    format: Annotated[OutputFormat, Query(description="Response body format")] = OutputFormat.json,
    bands: Annotated[
        str | None,
        Query(description="Source bands for R,G,B (1-based), e.g. 3,2,1 for multispectral", max_length=64),
    ] = None,
    resample: Annotated[str | None, RESAMPLE_QUERY] = None,
    gsd: Annotated[float | None, GSD_QUERY] = None,
) -> Response:
    settings = services.settings
    options = PredictOptions.parse(
        score_threshold=score_threshold,
        bands=bands,
        default_score_threshold=settings.tiling.score_threshold,
        max_pixels=settings.limits.max_predict_pixels,
        resample=resample,
        gsd=gsd,
    )
    received = time.perf_counter()
    # Only COCO reports the image's sha256 (images[].sha256); hashing costs CPU per byte.
    upload = await _receive(request, services, sha256=format is OutputFormat.coco)
    uploaded = time.perf_counter()
    try:
        services.metrics.upload_bytes.inc(upload.size)
        services.metrics.stage_latency.labels("upload").observe(uploaded - received)
        result = await _while_present(
            request,
            services,
            lambda: services.predictor.predict_file(
                upload.path, upload.file_name, options, sha256=upload.sha256
            ),
        )
    except GatewayError as exc:
        services.metrics.images.labels(exc.slug).inc()
        raise
    finally:
        discard(upload)
    return _respond(services, result, options, format, {"upload": uploaded - received})


async def _receive(request: Request, services: Services, *, sha256: bool) -> Upload:
    """The request's one file, streamed to disk under an upload slot, paced, and within the size cap."""
    async with services.upload_slot(request.headers.get("content-length")):
        return await receive_upload(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            body_stream(request, services.pacer),
            services.settings.data_dir / "uploads",
            services.settings.limits.max_upload_bytes,
            sha256=sha256,
        )


async def _while_present(request: Request, services: Services, start: Callable[[], Awaitable[T]]) -> T:
    """The work ``start`` begins, under a prediction slot and cancelled if the client leaves; none at all
    for a client that sent its file and left already. The slot is taken only now that there is work:
    a slow upload holds none."""
    if await client_gone(request):
        raise ClientClosedRequest("the client closed the connection after its upload")
    async with services.admission.slot():
        return await unless_disconnected(request, start())


def _respond(
    services: Services,
    result: ImageResult,
    options: PredictOptions,
    format: OutputFormat,
    stages: dict[str, float],
) -> Response:
    services.metrics.images.labels("ok").inc()
    model = services.model
    ids, counts = np.unique(result.detections.class_ids, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    for category in model.categories:
        services.metrics.detections.labels(category.name).inc(found.get(category.id, 0))
    rendering = time.perf_counter()
    tiling = services.predictor.tiling_info(options.score_threshold)
    content = render(format, [result], model, tiling, created=datetime.now(UTC))
    done = time.perf_counter()
    services.metrics.stage_latency.labels("render").observe(done - rendering)
    stages = {**stages, **result.timings, "render": done - rendering}
    # Server-Timing (W3C): where the time of this request went, shown by browsers' developer tools.
    timing = ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in stages.items())
    return Response(content, media_type=MEDIA_TYPES[format], headers={"Server-Timing": timing})


@router.post(
    "/v1/quicklook",
    summary="One image as a PNG a browser can show (what the web page draws predictions on)",
    description=(
        "Upload one image as multipart field `file`; the answer is an RGBA PNG of at most `max_side` "
        "pixels a side, read with the same bands and scaling as the tiles `/v1/predict` sees "
        "(transparent where pixels are invalid)."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **PROBLEM_RESPONSES},
    openapi_extra=UPLOAD_BODY,
)
async def quicklook(
    request: Request,
    services: ServicesDep,
    max_side: Annotated[int, Query(ge=16, le=2048, description="Longest side of the PNG")] = 1024,
    bands: Annotated[str | None, Query(description="Source bands for R,G,B (1-based)", max_length=64)] = None,
) -> Response:
    settings = services.settings
    options = PredictOptions.parse(
        score_threshold=None,
        bands=bands,
        default_score_threshold=settings.tiling.score_threshold,
        max_pixels=settings.limits.max_predict_pixels,
    )
    upload = await _receive(request, services, sha256=False)
    try:
        look = await _while_present(
            request,
            services,
            lambda: services.predictor.quicklook(upload.path, upload.file_name, options, max_side=max_side),
        )
    finally:
        discard(upload)
    return Response(look.png, media_type="image/png", headers={"Cache-Control": "no-store"})

"""``POST /v1/predict``: one image in, detections out, synchronously."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway.api.deps import Services, ServicesDep
from gateway.api.schemas import PROBLEM_RESPONSES, PredictResponse
from gateway.api.uploads import discard, receive_upload
from gateway.errors import GatewayError, InvalidParameter
from gateway.pipeline.coco import CATEGORIES, to_coco, to_geojson, to_json
from gateway.predictor import PredictOptions

router = APIRouter(tags=["inference"])


class OutputFormat(StrEnum):
    json = "json"
    coco = "coco"
    geojson = "geojson"


MEDIA_TYPES = {
    OutputFormat.json: "application/json",
    OutputFormat.coco: "application/json",
    OutputFormat.geojson: "application/geo+json",
}

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


def parse_bands(raw: str | None) -> tuple[int, ...] | None:
    """``"3,2,1"`` → ``(3, 2, 1)``: 1-based source bands for red, green, blue."""
    if raw is None or not raw.strip():
        return None
    try:
        bands = tuple(int(part) for part in raw.split(","))
    except ValueError as exc:
        raise InvalidParameter(f"bands must be comma-separated band numbers like 3,2,1, got {raw!r}") from exc
    if len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise InvalidParameter(f"bands takes 1 or 3 band numbers starting at 1, got {raw!r}")
    return bands


@router.post(
    "/v1/predict",
    summary="Detect palm trees and buildings in one image",
    description=(
        "Upload one image as multipart field `file`. Images larger than one 512x512 tile are tiled with "
        "overlap, batched to Triton, and detections are merged across seams. Images above the pixel "
        "limit get 413; send those through `palm-serve predict` or a bulk job."
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
        float | None, Query(ge=0.0, le=1.0, description="Drop detections scoring below this")
    ] = None,
    format: Annotated[OutputFormat, Query(description="Response body format")] = OutputFormat.json,
    bands: Annotated[
        str | None,
        Query(description="Source bands for R,G,B (1-based), e.g. 3,2,1 for multispectral", max_length=64),
    ] = None,
) -> Response:
    async with services.admission.slot():
        return await _predict(request, services, score_threshold, format, bands)


async def _predict(
    request: Request,
    services: Services,
    score_threshold: float | None,
    format: OutputFormat,
    bands: str | None,
) -> Response:
    settings = services.settings
    threshold = settings.tiling.score_threshold if score_threshold is None else score_threshold
    options = PredictOptions(
        score_threshold=threshold,
        bands=parse_bands(bands),
        max_pixels=settings.limits.max_predict_pixels,
    )
    received = time.perf_counter()
    upload = await receive_upload(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        settings.data_dir / "uploads",
        settings.limits.max_upload_bytes,
        # Only COCO reports the image's sha256 (images[].sha256); hashing costs about 0.5 ms of CPU per MB.
        sha256=format is OutputFormat.coco,
    )
    services.metrics.upload_bytes.inc(upload.size)
    uploaded = time.perf_counter()
    services.metrics.stage_latency.labels("upload").observe(uploaded - received)
    try:
        result = await services.predictor.predict_file(
            upload.path, upload.file_name, options, sha256=upload.sha256
        )
    except GatewayError as exc:
        services.metrics.images.labels(exc.slug).inc()
        raise
    finally:
        discard(upload)
    services.metrics.images.labels("ok").inc()
    counts = np.bincount(result.detections.class_ids, minlength=max(CATEGORIES) + 1)
    for category_id, name in CATEGORIES.items():
        services.metrics.detections.labels(name).inc(int(counts[category_id]))
    model = services.model
    rendering = time.perf_counter()
    if format is OutputFormat.coco:
        body = to_coco([result], model, services.predictor.tiling_info(threshold))
    elif format is OutputFormat.geojson:
        body = to_geojson([result], model)
    else:
        body = to_json(result, model)
    content = orjson.dumps(body)
    done = time.perf_counter()
    services.metrics.stage_latency.labels("render").observe(done - rendering)
    stages = {"upload": uploaded - received, **result.timings, "render": done - rendering}
    # Server-Timing (W3C): where the time of this request went, shown by browsers' developer tools.
    timing = ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in stages.items())
    return Response(content, media_type=MEDIA_TYPES[format], headers={"Server-Timing": timing})

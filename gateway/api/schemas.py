"""Response schemas for the OpenAPI document (responses themselves are rendered by pipeline/render.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=["https://palm-serve.dev/problems/corrupt-raster"])
    title: str
    status: int
    detail: str
    instance: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class ModelOut(BaseModel):
    name: str
    version: str = Field(description="The model's release, from its model card (e.g. 1.1.0)")
    triton_version: str = Field(description="The version directory Triton serves (e.g. 1)")
    sha256: str | None = Field(description="sha256 of the weights' file")


class Ready(BaseModel):
    status: Literal["ready"]
    model: ModelOut


class OutOfDomain(BaseModel):
    """How far a file's input statistics lie from the imagery the model was validated on."""

    score: float = Field(
        description="the largest deviation of a statistic from the nearest validated variant, in its "
        "validation standard deviations (floored at 2 levels)"
    )
    threshold: float = Field(description="above it the file is out of domain (the model card's, calibrated)")
    flagged: bool = Field(description="score > threshold; the warnings then say so too")
    statistic: str = Field(examples=["channel_spread_r"], description="the statistic that drove the score")
    value: float = Field(description="the file's value of that statistic (8-bit levels)")
    baseline_mean: float = Field(description="its mean over the validation scenes")
    variant: Literal["colour", "grey"] = Field(description="the nearest validated imagery")


class ImageOut(BaseModel):
    file_name: str
    width: int
    height: int
    crs: str | None = Field(description='"EPSG:32633"-style, or WKT; null without a CRS')
    transform: list[float] | None = Field(description="[a, b, c, d, e, f] in rasterio's affine order")
    gsd_m: float | None = Field(
        description="ground sample distance in metres per pixel at the image's centre; null when unknown"
    )
    gsd_source: Literal["file", "caller"] | None = Field(
        description="file: from its georeferencing; caller: the gsd= parameter; null when unknown"
    )
    inference_gsd_m: float | None = Field(
        description="the ground sample distance the model saw (the file was resampled when it differs)"
    )
    resample_factor: float = Field(description="source pixels per model pixel along each axis; 1 as read")
    out_of_domain: OutOfDomain | None = Field(description="null when the model card has no input baseline")


class DetectionOut(BaseModel):
    category_id: int
    category: str
    score: float
    bbox: list[float] = Field(description="[x, y, width, height] in image pixels (COCO convention)")
    geometry: dict[str, Any] | None = Field(description="GeoJSON Polygon in EPSG:4326; null without a CRS")


class TilesOut(BaseModel):
    total: int
    skipped: int = Field(description="tiles fully masked by nodata/alpha, never sent to the model")


class PredictResponse(BaseModel):
    model: ModelOut
    image: ImageOut
    detections: list[DetectionOut]
    tiles: TilesOut
    warnings: list[str]


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text, "content": {"application/problem+json": {}}}
    for code, text in {
        400: "Malformed request",
        401: "No API key, or an invalid or revoked one (see WWW-Authenticate)",
        403: "The API key lacks the scope this route needs",
        413: "Upload or raster over a size budget",
        415: "Not an image format we read",
        422: "Invalid parameter, corrupt or undecodable raster, ground sample distance out of range",
        503: "Inference unavailable (see Retry-After)",
    }.items()
}


class JobModel(BaseModel):
    name: str
    version: str
    sha256: str | None


class Progress(BaseModel):
    files_total: int
    files_done: int = Field(description="files that succeeded")
    files_failed: int
    tiles_total: int = Field(description="tiles of the files opened so far")
    tiles_done: int
    tiles_skipped: int = Field(description="tiles fully masked, never sent to the model")
    detections: int
    percent: float
    eta_seconds: float | None
    tiles_per_second: float


class FileError(BaseModel):
    file: str
    type: str = Field(description="the problem type /v1/predict would answer for this file")
    status: int | None
    detail: str | None


class Results(BaseModel):
    ready: bool
    sha256: str | None = Field(description="sha256 of the COCO document (its ETag)")
    bytes: int | None
    geojson_sha256: str | None
    annotations: int | None


class JobLinks(BaseModel):
    self: str
    files: str
    errors: str
    results: str
    geojson: str
    events: str
    webhooks: str


class JobWebhook(BaseModel):
    url: str
    events: list[str] = Field(description="optional events subscribed to; terminal events always go")
    signed_with: Literal["job secret", "server secrets"]
    disabled: bool = Field(description="the receiver answered 410 Gone; a redelivery re-enables it")


class Job(BaseModel):
    id: str
    name: str
    status: Literal["created", "queued", "running", "succeeded", "failed", "cancelled"]
    priority: Literal["low", "normal", "high"]
    created_at: str
    started_at: str | None
    finished_at: str | None
    model: JobModel
    parameters: dict[str, Any]
    progress: Progress
    errors: list[FileError] = Field(description="the first 100 failed files; all at links.errors")
    results: Results
    webhook: JobWebhook | None
    links: JobLinks


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class FileLinks(BaseModel):
    quicklook: str | None = Field(description="the image as a PNG of at most 2048 px a side, once rendered")


class JobFile(BaseModel):
    position: int = Field(description="1-based upload order; the COCO image id")
    name: str
    size: int
    sha256: str | None
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    attempts: int
    width: int | None
    height: int | None
    tiles: int = Field(description="tiles of the image (known once it is opened)")
    tiles_done: int
    tiles_skipped: int
    detections: int
    warnings: list[str]
    gsd_m: float | None = Field(description="ground sample distance in metres per pixel; null when unknown")
    gsd_source: Literal["file", "caller"] | None
    inference_gsd_m: float | None = Field(description="the ground sample distance the model saw")
    resample_factor: float | None = Field(description="source pixels per model pixel; null until read")
    out_of_domain: OutOfDomain | None = Field(description="null until read, or without an input baseline")
    error: FileError | None
    footprint: list[list[float]] | None = Field(
        description="the image's corners as [lon, lat] in WGS 84: top-left, top-right, bottom-right, "
        "bottom-left; null without georeferencing"
    )
    links: FileLinks


class FileList(BaseModel):
    files: list[JobFile]
    next_cursor: int | None


class WebhookAttempt(BaseModel):
    number: int
    started_at: str
    duration_ms: float
    status_code: int | None
    outcome: Literal["success", "redirect", "gone", "http_error", "timeout", "connection", "refused", "error"]
    error: str | None


class WebhookDelivery(BaseModel):
    id: str = Field(description="the webhook-id header: the same on every attempt")
    type: str
    status: Literal["pending", "sending", "succeeded", "failed", "disabled"]
    created_at: str
    next_attempt_at: str | None
    finished_at: str | None
    attempts: list[WebhookAttempt]


class WebhookDeliveries(BaseModel):
    webhook_url: str | None
    disabled: bool
    deliveries: list[WebhookDelivery]

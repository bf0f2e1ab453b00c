"""Every Prometheus metric the gateway exports, declared in one place.

Names carry the ``palm_`` prefix and base units; counters end in ``_total``; labels are bounded (route
template, method, status class, outcome, format), never a job id or a file name. Each app owns its own
registry so several apps (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.pipeline.inputs import CHANNELS, InputSummary

CHANNEL_BUCKETS = tuple(float(v) for v in range(16, 256, 16))
SPREAD_BUCKETS = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0)
COLOURFULNESS_BUCKETS = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0)
FRACTION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
GSD_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 1000.0)
TILE_DETECTION_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2048.0)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


WEBHOOK_SETTLED = ("succeeded", "failed", "disabled")
"""How a webhook event ends: delivered, every retry spent, or its endpoint answered 410 Gone."""
WEBHOOK_ATTEMPT_OUTCOMES = (
    "success",
    "http_error",
    "redirect",
    "gone",
    "timeout",
    "connection",
    "refused",
    "error",
)
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown", "revoked", "scope")


class Metrics:
    """The gateway's metric families, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "palm_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "palm_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_inflight = Gauge("palm_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.images = Counter(
            "palm_images_total",
            "Images processed, by outcome (ok or an error type).",
            ["outcome"],
            registry=r,
        )
        self.tiles = Counter(
            "palm_tiles_total",
            "Tiles cut from images, by outcome (inferred, skipped because fully masked).",
            ["outcome"],
            registry=r,
        )
        self.detections = Counter(
            "palm_detections_total", "Detections returned, by category.", ["category"], registry=r
        )
        self.upload_bytes = Counter("palm_upload_bytes_total", "Bytes received in uploads.", registry=r)
        self.stage_latency = Histogram(
            "palm_stage_duration_seconds",
            "Time per image in each stage: upload, open, decode_infer, merge, georeference, render.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_latency = Histogram(
            "palm_triton_request_duration_seconds",
            "Latency of one gRPC infer call to Triton (one batch of tiles).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_batch_tiles = Histogram(
            "palm_triton_batch_tiles",
            "Tiles per gRPC infer call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.triton_errors = Counter(
            "palm_triton_errors_total", "Failed infer calls by error type.", ["error"], registry=r
        )
        self.triton_ready = Gauge(
            "palm_triton_ready", "1 when the last readiness probe found the model ready.", registry=r
        )
        self.triton_restarts = Counter(
            "palm_triton_restarts_total", "Restarts of the embedded tritonserver.", registry=r
        )
        self.input_channel_mean = Histogram(
            "palm_input_channel_mean",
            "Per file, the mean of each channel of the 8-bit tiles the model was given (0-255).",
            ["channel"],
            buckets=CHANNEL_BUCKETS,
            registry=r,
        )
        self.input_channel_spread = Histogram(
            "palm_input_channel_spread",
            "Per file, the standard deviation of each channel of the model's 8-bit input.",
            ["channel"],
            buckets=SPREAD_BUCKETS,
            registry=r,
        )
        self.input_colourfulness = Histogram(
            "palm_input_colourfulness",
            "Per file, the mean absolute difference between the channels of the model's input (0: grey).",
            buckets=COLOURFULNESS_BUCKETS,
            registry=r,
        )
        self.input_valid_fraction = Histogram(
            "palm_input_valid_fraction",
            "Per file, the share of pixels that are valid (not nodata, alpha 0 or masked).",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.input_gsd = Histogram(
            "palm_input_gsd_meters",
            "Per georeferenced file, the ground sample distance at its centre.",
            buckets=GSD_BUCKETS,
            registry=r,
        )
        self.tile_detections = Histogram(
            "palm_tile_detections",
            "Per tile sent to the model, the detections above the score threshold before the seam merge.",
            buckets=TILE_DETECTION_BUCKETS,
            registry=r,
        )
        self.detection_scores = Histogram(
            "palm_detection_score",
            "Scores of the detections returned (after the seam merge).",
            buckets=SCORE_BUCKETS,
            registry=r,
        )

        self.job_files = Counter(
            "palm_job_files_total",
            "Job files settled by a worker of this process, by outcome (succeeded, failed, retried).",
            ["outcome"],
            registry=r,
        )
        self.job_tiles = Counter(
            "palm_job_tiles_total", "Tiles of job files committed by this process's worker.", registry=r
        )
        self.job_duration = Histogram(
            "palm_job_duration_seconds",
            "From a job's start to its results, for jobs assembled by this process.",
            buckets=(1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 48 * 3600.0),
            registry=r,
        )
        self.jobs = Gauge("palm_jobs", "Jobs in the database, by status.", ["status"], registry=r)
        self.job_files_waiting = Gauge(
            "palm_job_files_waiting", "Job files queued and not yet claimed (all jobs).", registry=r
        )
        self.job_files_running = Gauge(
            "palm_job_files_running", "Job files claimed by a worker and not yet settled.", registry=r
        )
        self.build_info = Gauge("palm_build_info", "The gateway's version.", ["version"], registry=r)
        self.model_info = Gauge(
            "palm_model_info", "The served model.", ["name", "version", "sha256"], registry=r
        )
        self.webhook_deliveries = Counter(
            "palm_webhook_deliveries_total",
            "Webhook events settled, by outcome (succeeded, failed after the last retry, disabled by 410).",
            ["outcome"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "palm_webhook_attempts_total",
            "Webhook delivery attempts, by outcome (success, http_error, timeout, connection, refused).",
            ["outcome"],
            registry=r,
        )
        self.webhook_latency = Histogram(
            "palm_webhook_delivery_duration_seconds",
            "Time of one webhook delivery attempt, from resolving the host to the response.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "palm_auth_failures_total",
            "Refused API calls by reason (missing, malformed, unknown, revoked, scope).",
            ["reason"],
            registry=r,
        )
        # Every known label value starts at 0, so rates and alerts see a series before the first event.
        for outcome in WEBHOOK_SETTLED:
            self.webhook_deliveries.labels(outcome=outcome)
        for outcome in WEBHOOK_ATTEMPT_OUTCOMES:
            self.webhook_attempts.labels(outcome=outcome)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason=reason)

    def observe_inputs(
        self,
        inputs: InputSummary | None,
        gsd_m: float | None,
        tile_detections: Sequence[int],
        scores: npt.NDArray[np.floating],
    ) -> None:
        """Record what one file showed the model and what it found (the drift histograms)."""
        if inputs is not None:
            for name, mean, spread in zip(CHANNELS, inputs.mean, inputs.spread, strict=True):
                self.input_channel_mean.labels(name).observe(mean)
                self.input_channel_spread.labels(name).observe(spread)
            self.input_colourfulness.observe(inputs.colourfulness)
            self.input_valid_fraction.observe(inputs.valid_fraction)
        if gsd_m is not None:
            self.input_gsd.observe(gsd_m)
        for count in tile_detections:
            self.tile_detections.observe(count)
        for score in scores.tolist():
            self.detection_scores.observe(score)

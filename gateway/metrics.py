"""Every Prometheus metric the gateway exports, declared in one place.

Names carry the ``palm_`` prefix and base units; counters end in ``_total``; labels are bounded (route
template, method, status class, outcome, format), never a job id or a file name. Each app owns its own
registry so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


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

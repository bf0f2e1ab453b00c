"""Configuration: one pydantic-settings class, ``PALM_`` prefix, nested groups joined with ``__``.

Examples::

    PALM_DATA_DIR=/srv/palm
    PALM_TRITON__URL=triton:8001        # use that server; start nothing
    PALM_LIMITS__MAX_PREDICT_PIXELS=100000000

``PALM_TRITON_URL`` (single underscore) is accepted as an alias of ``PALM_TRITON__URL`` because it is
the name the docs and docker-compose use. Sources, highest priority first: arguments passed to
``Settings(...)``, ``PALM_*`` environment variables (``PALM_TRITON__URL`` among them), then
``PALM_TRITON_URL``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_URL_ALIAS = "PALM_TRITON_URL"


class TritonSettings(BaseModel):
    """Where inference runs and how the gateway talks to it.

    Calls in flight are bounded twice: ``max_inflight`` per image (enough to keep the model fed while
    the next batch decodes) and ``max_calls_in_flight`` for the whole gateway, handed out online
    requests first (:class:`~gateway.scheduling.PriorityLimiter`). Its default, 8, is twice what the
    default decode workers (2) times ``max_inflight`` (2) produce, so online images at the defaults
    never wait on it; it keeps Triton's queue short when many images or jobs run at once. Of those,
    batch (job) work holds at most ``max_batch_calls_in_flight``: 2, one call per model instance in the
    shipped configs, keeps a job streaming while it never queues more than two calls ahead of an
    online request (which Triton then serves first anyway: its requests carry priority level 1).
    """

    url: str | None = Field(
        default=None,
        description="host:port of a running Triton gRPC endpoint. Unset: start an embedded tritonserver.",
    )
    metrics_url: str | None = Field(
        default=None,
        description="Triton's Prometheus endpoint for /metrics/triton; default: port 8002 of the url's host.",
    )
    model_name: str = "palm"
    model_version: str = "1"
    model_repository: Path = REPO_ROOT / "model_repository"
    model_config_name: str = Field(
        default="cpu", description="Embedded server only: palm/configs/<name>.pbtxt selects the CPU config."
    )
    instances: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Embedded server only: model instances to run instead of the config's count.",
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one gRPC infer call.")
    ready_timeout_s: float = Field(default=120.0, gt=0, description="How long the embedded server may take.")
    batch_size: int = Field(
        default=4, ge=1, le=64, description="Tiles per gRPC request; at most the model's max_batch_size."
    )
    max_inflight: int = Field(default=2, ge=1, le=64, description="Concurrent gRPC requests per image.")
    max_calls_in_flight: int = Field(
        default=8, ge=1, le=1024, description="gRPC infer calls in flight in the whole gateway, online first."
    )
    max_batch_calls_in_flight: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="Of max_calls_in_flight, the most batch (job) work holds; at most max_calls_in_flight.",
    )
    shared_memory: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: Triton reads tiles in the decoders' /dev/shm if it can map it; off: always gRPC.",
    )


class LimitSettings(BaseModel):
    """Budgets checked before any decode; every one is configurable."""

    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="Enforced while the upload streams.")
    max_concurrent_predicts: int = Field(
        default=32,
        gt=0,
        description="/v1/predict requests predicting at once (uploads done); more get 503 + Retry-After.",
    )
    max_concurrent_uploads: int = Field(
        default=64, gt=0, description="Uploads streaming to disk at once; more get 503 + Retry-After."
    )
    max_concurrent_large_uploads: int = Field(
        default=16,
        gt=0,
        description=(
            "While uploads are paced (busy_upload_bytes_per_s): bodies to /v1/predict and /v1/quicklook "
            "over 2 MiB or of unknown length streaming at once, within max_concurrent_uploads; more get "
            "503 + Retry-After."
        ),
    )
    busy_upload_bytes_per_s: int | None = Field(
        default=None,
        ge=0,
        description=(
            "While /v1/predict or /v1/quicklook requests are predicting, the bodies of those endpoints "
            "are read no faster than this in total (bytes/s), each past its first 2 MiB, so that a "
            "flood of large uploads cannot take the cores the predictions need. Unset: 64 MiB/s with "
            "the embedded (CPU) Triton, unpaced with an external one; 0: never paced."
        ),
    )
    max_predict_pixels: int = Field(
        default=64_000_000, gt=0, description="Above this /v1/predict answers 413."
    )
    max_width: int = Field(default=200_000, gt=0)
    max_height: int = Field(default=200_000, gt=0)
    max_bands: int = Field(default=64, gt=0)
    max_decoded_bytes: int = Field(
        default=64 * 1024**3, gt=0, description="width x height x bands x bytes per sample of the source."
    )


class HttpSettings(BaseModel):
    """What a client may hold of the server: time and bytes before and while it sends a request.

    The HTTP server closes connections that stay silent or send their headers too slowly, and refuses
    oversized request lines and headers; the app times out bodies that arrive too slowly.
    """

    header_timeout_s: float = Field(
        default=10.0, gt=0, description="A new request's line and headers must arrive within this."
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="Idle time between requests before close.")
    body_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest pause between two chunks of a request body."
    )
    body_min_rate_bytes: int = Field(
        default=16 * 1024,
        ge=0,
        description="Slowest average body rate accepted (bytes/s) once body_grace_s has passed.",
    )
    body_grace_s: float = Field(
        default=10.0, ge=0, description="Time a body may take before the rate counts."
    )
    max_header_bytes: int = Field(
        default=32 * 1024, gt=0, description="Request line and headers together; more is 431."
    )
    max_headers: int = Field(default=100, gt=0, description="Header fields per request; more is 431.")
    max_url_bytes: int = Field(default=8 * 1024, gt=0, description="Path and query; longer is 414.")


class TilingSettings(BaseModel):
    """How images are cut and detections merged; recorded in every COCO ``info``.

    The tile side is the served model's (its card's ``contract``, or Triton's config), never a setting.
    """

    overlap: int | None = Field(
        default=None,
        ge=0,
        description="Pixels shared by neighbouring tiles; unset: a quarter of the model's tile side "
        "(128 at 512 px). At most half the tile.",
    )
    nms_iou: float = Field(default=0.5, gt=0, le=1)
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Default when a request sets none.")


class DecodeSettings(BaseModel):
    """Isolated raster decoding (worker processes).

    ``reserved_online_workers`` of the ``workers`` are never leased to batch (job) files, so a
    ``/v1/predict`` request finds a worker free at once instead of waiting for a job's file to finish
    decoding; batch files still get at least one worker (``max(1, workers - reserved_online_workers)``).
    Online files may use every worker, and are served first whenever files wait.
    """

    workers: int = Field(default=2, ge=1, le=64)
    reserved_online_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Decode workers batch (job) files never take, kept free for online requests.",
    )
    memory_limit_bytes: int = Field(default=3 * 1024**3, gt=0, description="RLIMIT_AS of each decode worker.")
    file_timeout_s: float = Field(default=600.0, gt=0, description="Wall-clock budget to decode one file.")


class JobSettings(BaseModel):
    """Bulk jobs: how files are uploaded, claimed, retried and kept."""

    workers: bool = Field(default=True, description="Run job workers inside the service.")
    files_in_flight: int = Field(
        default=2, ge=1, le=64, description="Files one service process works on at once across all jobs."
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A claimed file returns to the queue this long after its last heartbeat.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Tries of one file (decoder lost, decode timeout) before it fails.",
    )
    retry_backoff_s: float = Field(default=2.0, gt=0, description="First retry delay; doubles per attempt.")
    max_files_per_request: int = Field(
        default=10_000, gt=0, description="Files in one upload request; larger batches use staged uploads."
    )
    max_files_per_job: int = Field(default=100_000, gt=0)
    max_request_bytes: int = Field(
        default=64 * 1024**3, gt=0, description="Whole body of one job upload request."
    )
    retention_hours: float = Field(
        default=168.0, gt=0, description="Uploads of finished jobs are deleted after this; results stay."
    )
    poll_s: float = Field(default=1.0, gt=0, description="How often an idle worker looks for work.")
    maintenance_s: float = Field(
        default=30.0, gt=0, description="How often a worker settles lost files and deletes expired uploads."
    )
    quicklook_max_side: int = Field(
        default=2048, ge=0, le=4096, description="Longest side of each file's map quicklook; 0: none."
    )


class AuthSettings(BaseModel):
    """Who may call the API: ``off`` (everyone is tenant ``default``; loopback only) or ``api-key``.

    Keys live in the job database and are managed with ``palm-serve keys``; ``/healthz`` and
    ``/readyz`` stay open, ``/metrics`` too unless ``protect_metrics`` asks for a key with ``admin``.
    """

    mode: Literal["off", "api-key"] = Field(
        default="off", description="off: no keys (only on a loopback address); api-key: every call needs one."
    )
    protect_metrics: bool = Field(default=False, description="/metrics needs a key with the admin scope.")


class TenantLimitSettings(BaseModel):
    """One tenant's budget; ``None`` keeps the default of :class:`TenantSettings`."""

    max_active_jobs: int | None = Field(default=None, gt=0)
    max_files_per_job: int | None = Field(default=None, gt=0)
    max_storage_bytes: int | None = Field(default=None, gt=0)


class TenantSettings(BaseModel):
    """What each tenant may hold at once; ``limits`` overrides them per tenant (JSON)."""

    max_active_jobs: int = Field(default=20, gt=0, description="Jobs queued or running at once; more is 429.")
    max_storage_bytes: int = Field(
        default=1024**4, gt=0, description="Uploads kept plus results of the tenant's jobs; more is 413."
    )
    limits: dict[str, TenantLimitSettings] = Field(
        default_factory=dict,
        description='Per-tenant overrides, e.g. {"acme": {"max_active_jobs": 100}}; files per job default '
        "to jobs.max_files_per_job.",
    )


class WebhookSettings(BaseModel):
    """Job webhooks: Standard Webhooks signatures, an outbox delivered with retries, an SSRF guard."""

    secrets: SecretStr | None = Field(
        default=None,
        description="Server signing secrets, whsec_<base64>, separated by spaces or commas; each signs "
        "(several while one is rotated). A job's webhook_secret replaces them for that job.",
    )
    retry_schedule: str = Field(
        default="5,300,1800,7200,18000,36000,36000",
        description="Seconds before each retry, comma-separated; after the last the delivery fails.",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Per attempt: connect, send and response.")
    max_response_bytes: int = Field(default=64 * 1024, ge=0, description="Read of a response body at most.")
    allow_private: bool = Field(
        default=False, description="Permit loopback and private targets (local use and tests)."
    )
    progress_interval_s: float = Field(
        default=30.0, gt=0, description="job.progress events at most this often."
    )
    public_url: str | None = Field(
        default=None, description="Base of results_url and geojson_url in events; unset: paths only."
    )
    dispatcher: bool = Field(default=True, description="Deliver webhooks from this process.")
    concurrency: int = Field(default=8, ge=1, le=256, description="Deliveries in flight per process.")
    poll_s: float = Field(default=1.0, gt=0, description="How often the dispatcher looks for due deliveries.")
    lease_s: float = Field(
        default=60.0, gt=0, description="A delivery in flight is retried by another process after this."
    )

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise ValueError(f"retry_schedule takes comma-separated seconds, got {value!r}") from None
        if any(delay < 0 for delay in delays):
            raise ValueError("retry_schedule delays must not be negative")
        return ",".join(f"{delay:g}" for delay in delays)

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            for secret in value.get_secret_value().replace(",", " ").split():
                if not secret.startswith("whsec_") or len(secret) < 30:
                    raise ValueError("webhook secrets are whsec_ followed by at least 24 bytes in base64")
        return value

    @property
    def delays(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.retry_schedule.split(",") if part)

    def signing_secrets(self) -> list[str]:
        return self.secrets.get_secret_value().replace(",", " ").split() if self.secrets else []


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="PALM_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(
        default_factory=lambda: user_dir("XDG_DATA_HOME", ".local/share"),
        description="All state: uploads, database, results, the embedded Triton's files.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job database; unset: SQLite at <data_dir>/palm.db. "
        "postgresql+psycopg://user:pass@host/db for PostgreSQL.",
    )
    triton: TritonSettings = TritonSettings()
    http: HttpSettings = HttpSettings()
    jobs: JobSettings = JobSettings()
    limits: LimitSettings = LimitSettings()
    tiling: TilingSettings = TilingSettings()
    decode: DecodeSettings = DecodeSettings()
    auth: AuthSettings = AuthSettings()
    tenants: TenantSettings = TenantSettings()
    webhook: WebhookSettings = WebhookSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The default sources, with ``PALM_TRITON_URL`` below every ``PALM_*`` variable."""
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TritonUrlAliasSource(settings_cls),
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.webhook.lease_s <= self.webhook.timeout_s:
            raise ValueError("webhook.lease_s must be longer than webhook.timeout_s")
        paced = self.limits.busy_upload_bytes_per_s
        slowest = 2 * self.limits.max_concurrent_large_uploads * self.http.body_min_rate_bytes
        if paced and paced < slowest:
            # A paced wait counts against the body's minimum rate: honest uploads would time out.
            raise ValueError(
                f"limits.busy_upload_bytes_per_s must be 0 or at least {slowest} (twice "
                "limits.max_concurrent_large_uploads x http.body_min_rate_bytes)"
            )
        return self


def user_dir(variable: str, fallback: str) -> Path:
    """``$<variable>/palm-serve``, or ``~/<fallback>/palm-serve`` (the XDG base directories)."""
    base = os.environ.get(variable) or str(Path.home() / fallback)
    return Path(base) / "palm-serve"


class TritonUrlAliasSource(PydanticBaseSettingsSource):
    """``PALM_TRITON_URL`` as ``triton.url``; an empty value counts as unset."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get(TRITON_URL_ALIAS)
        return {"triton": {"url": url}} if url else {}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use (never at import time)."""
    return Settings()

"""The tables of the job database (SQLAlchemy Core); ``migrations/`` creates and evolves them.

::

    jobs 1──n files 1──n detections
      1──n job_events            (Server-Sent Events, replayable from any event id)
      1──n webhook_deliveries 1──n webhook_attempts   (the webhook outbox)
    api_keys                     (hashed secrets, a tenant and scopes each)

A job's counters (files done, tiles, detections) are kept on its row and updated in the same
transaction as the file that changes them, so reading a job's progress is one row.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Timestamp = sa.DateTime(timezone=True)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.String(8), nullable=False, server_default="normal"),
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_secret", sa.Text),
    sa.Column("webhook_events", sa.JSON),
    sa.Column("webhook_disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("webhook_progress_at", Timestamp),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("request_sha256", sa.String(64)),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("model_sha256", sa.String(64)),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("queued_at", Timestamp),
    sa.Column("started_at", Timestamp),
    sa.Column("finished_at", Timestamp),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("pass_value", sa.Float, nullable=False, server_default="0"),
    sa.Column("files_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("files_done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("files_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tiles_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("tiles_done", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("tiles_skipped", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("detections", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bytes_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("results_sha256", sa.String(64)),
    sa.Column("results_bytes", sa.BigInteger),
    sa.Column("geojson_sha256", sa.String(64)),
    sa.Column("geojson_bytes", sa.BigInteger),
    sa.Column("annotations", sa.BigInteger),
    sa.Column("assembler", sa.String(128)),
    sa.Column("assembler_expires_at", Timestamp),
    sa.Column("uploads_purged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.UniqueConstraint("tenant", "idempotency_key"),
    sa.Index("ix_jobs_tenant_created", "tenant", "created_at"),
    sa.Index("ix_jobs_status", "status"),
)

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("name", sa.String(1024), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64)),
    sa.Column("storage_key", sa.String(512)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_token", sa.String(32)),
    sa.Column("lease_expires_at", Timestamp),
    sa.Column("available_at", Timestamp, nullable=False),
    sa.Column("error_type", sa.String(64)),
    sa.Column("error_status", sa.Integer),
    sa.Column("error_detail", sa.Text),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("crs", sa.Text),
    sa.Column("transform", sa.JSON),
    sa.Column("warnings", sa.JSON),
    sa.Column("gsd_m", sa.Float),
    sa.Column("gsd_source", sa.String(16)),
    sa.Column("inference_gsd_m", sa.Float),
    sa.Column("resample_factor", sa.Float),
    sa.Column("out_of_domain", sa.JSON),
    sa.Column("tiles_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tiles_done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tiles_skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("detections", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", Timestamp),
    sa.Column("finished_at", Timestamp),
    sa.UniqueConstraint("job_id", "position"),
    sa.UniqueConstraint("job_id", "name"),
    sa.Index("ix_files_claim", "status", "available_at"),
)

detections = sa.Table(
    "detections",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("file_id", sa.Integer, sa.ForeignKey("files.id", ondelete="CASCADE"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("category_id", sa.Integer, nullable=False),
    sa.Column("x", sa.Float, nullable=False),
    sa.Column("y", sa.Float, nullable=False),
    sa.Column("w", sa.Float, nullable=False),
    sa.Column("h", sa.Float, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("geometry", sa.Text),
    sa.UniqueConstraint("file_id", "seq"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("scopes", sa.String(200), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp),
    sa.Column("last_used_at", Timestamp),
    sa.Index("ix_api_keys_tenant", "tenant"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("available_at", Timestamp, nullable=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_token", sa.String(32)),
    sa.Column("lease_expires_at", Timestamp),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
    sa.Index("ix_webhook_deliveries_claim", "status", "available_at"),
    sa.Index("ix_webhook_deliveries_job", "job_id", "created_at"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column(
        "delivery_id",
        sa.String(40),
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("outcome", sa.String(24), nullable=False),
    sa.Column("error", sa.Text),
)

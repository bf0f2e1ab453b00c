"""How a job looks to its user: the resource, its progress and its files (pure functions of rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.db.engine import aware
from gateway.errors import TYPE_BASE
from gateway.jobs.models import JobStatus
from gateway.pipeline import geo


def iso(value: datetime | None) -> str | None:
    stamp = aware(value)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z") if stamp is not None else None


def progress(job: dict[str, Any], running_done: int, running_total: int, now: datetime) -> dict[str, Any]:
    """``files_*``, ``tiles_*``, ``detections``, ``percent``, ``eta_seconds``, ``tiles_per_second``.

    Tiles of files still running count as they are reported; a file's share of the job is its share of
    the files, split by its tiles while it runs.
    """
    status = JobStatus(job["status"])
    files_total = int(job["files_total"])
    settled = int(job["files_done"]) + int(job["files_failed"])
    tiles_done = int(job["tiles_done"]) + running_done
    fraction = 0.0
    if files_total:
        running_share = running_done / running_total if running_total else 0.0
        fraction = min(1.0, (settled + running_share) / files_total)
    if status in (JobStatus.succeeded, JobStatus.failed):
        fraction = 1.0
    started = aware(job["started_at"])
    ended = aware(job["finished_at"])
    elapsed = ((ended or now) - started).total_seconds() if started is not None else 0.0
    rate = tiles_done / elapsed if elapsed > 0 else 0.0
    eta = None
    if status == JobStatus.running and 0 < fraction < 1 and elapsed > 0:
        eta = round(elapsed * (1 - fraction) / fraction, 1)
    return {
        "files_total": files_total,
        "files_done": int(job["files_done"]),
        "files_failed": int(job["files_failed"]),
        "tiles_total": int(job["tiles_total"]) + running_total,
        "tiles_done": tiles_done,
        "tiles_skipped": int(job["tiles_skipped"]),
        "detections": int(job["detections"]),
        "percent": round(100 * fraction, 1),
        "eta_seconds": eta,
        "tiles_per_second": round(rate, 2),
    }


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {
        "self": base,
        "files": f"{base}/files",
        "errors": f"{base}/errors",
        "results": f"{base}/results",
        "geojson": f"{base}/results.geojson",
        "events": f"{base}/events",
        "webhooks": f"{base}/webhooks",
    }


def file_error(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "file": row["name"],
        "type": TYPE_BASE + str(row["error_type"]),
        "status": row["error_status"],
        "detail": row["error_detail"],
    }


def job_resource(
    job: dict[str, Any], progress_: dict[str, Any], errors: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``GET /v1/jobs/{id}`` body."""
    return {
        "id": job["id"],
        "name": job["name"],
        "status": job["status"],
        "priority": job["priority"],
        "created_at": iso(job["created_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "model": {"name": job["model_name"], "version": job["model_version"], "sha256": job["model_sha256"]},
        "parameters": job["parameters"],
        "progress": progress_,
        "errors": [file_error(e) for e in errors],
        "results": {
            "ready": job["results_sha256"] is not None,
            "sha256": job["results_sha256"],
            "bytes": job["results_bytes"],
            "geojson_sha256": job["geojson_sha256"],
            "annotations": job["annotations"],
        },
        "webhook": webhook(job),
        "links": links(job["id"]),
    }


def event_data(job: dict[str, Any], progress_: dict[str, Any], base: str) -> dict[str, Any]:
    """``data`` of a job's webhook events; result links are ``base`` + path (paths alone when empty)."""
    paths = links(job["id"])
    return {
        "job_id": job["id"],
        "status": job["status"],
        "progress": progress_,
        "errors_count": int(job["files_failed"]),
        "results_url": base + paths["results"],
        "geojson_url": base + paths["geojson"],
        "results_sha256": job["results_sha256"],
        "annotations": job["annotations"],
    }


def webhook(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job's webhook as users see it: never its secret."""
    if not job["webhook_url"]:
        return None
    return {
        "url": job["webhook_url"],
        "events": job["webhook_events"] or [],
        "signed_with": "job secret" if job["webhook_secret"] else "server secrets",
        "disabled": bool(job["webhook_disabled"]),
    }


def file_resource(row: dict[str, Any], *, quicklook: bool = False) -> dict[str, Any]:
    """One entry of ``GET /v1/jobs/{id}/files``; ``quicklook``: whether the file's quicklook is stored.

    ``footprint`` is the image's four corners in WGS 84 (top-left, top-right, bottom-right,
    bottom-left), ``None`` for a file without georeferencing or not read yet.
    """
    footprint = None
    if row["width"] and row["height"]:
        footprint = geo.footprint(row["crs"], row["transform"], int(row["width"]), int(row["height"]))
    ql = f"/v1/jobs/{row['job_id']}/files/{row['position']}/quicklook" if quicklook else None
    return {
        "position": row["position"],
        "name": row["name"],
        "size": row["size"],
        "sha256": row["sha256"],
        "status": row["status"],
        "attempts": row["attempts"],
        "width": row["width"],
        "height": row["height"],
        "tiles": row["tiles_total"],
        "tiles_done": row["tiles_done"],
        "tiles_skipped": row["tiles_skipped"],
        "detections": row["detections"],
        "warnings": row["warnings"] or [],
        "gsd_m": row["gsd_m"],
        "gsd_source": row["gsd_source"],
        "inference_gsd_m": row["inference_gsd_m"],
        "resample_factor": row["resample_factor"],
        "out_of_domain": row["out_of_domain"],
        "error": file_error(row) if row["error_type"] and row["status"] == "failed" else None,
        "footprint": footprint,
        "links": {"quicklook": ql},
    }

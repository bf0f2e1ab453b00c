"""A finished job's COCO and GeoJSON, streamed from the database to storage.

Both documents are written by streaming (a job of a million annotations is assembled in bounded
memory), atomically (a temporary file, fsync, rename: a reader sees the old state or the whole new
file), and they are functions of the job alone: image ids are the files' upload positions, annotation
ids follow (position, detection order), and ``info.date_created`` is the job's creation time. A job
assembled again after a crash therefore produces the same bytes; their sha256 is committed with the
job's final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.db.engine import Database, aware
from gateway.errors import GatewayError
from gateway.jobs.models import Assembly
from gateway.jobs.store import JobStore, LeaseLost
from gateway.pipeline.atomic import atomic_write
from gateway.pipeline.domain import DomainCheck
from gateway.pipeline.render import (
    DetectionRecord,
    ImageRecord,
    batch_records,
    coco_info,
    reported_categories,
    write_coco,
    write_geojson,
)
from gateway.pipeline.result import ModelInfo, TilingInfo
from gateway.storage import Storage

logger = logging.getLogger(__name__)

COCO_KEY = "jobs/{job_id}/results/coco.json"
GEOJSON_KEY = "jobs/{job_id}/results/results.geojson"
QUICKLOOK_KEY = "jobs/{job_id}/quicklooks/{position}.png"
"""A file's quicklook (RGBA PNG), drawn under its footprint on the results map."""


class QuicklookNotFound(GatewayError):
    status = 404
    slug = "quicklook-not-found"
    title = "No quicklook for this file"


class ResultWriter:
    """Writes the results of jobs handed over by :meth:`JobStore.claim_assembly`."""

    def __init__(
        self, store: JobStore, db: Database, storage: Storage, model: ModelInfo, lease_s: float
    ) -> None:
        self.store = store
        self.db = db
        self.storage = storage
        self.model = model
        self.lease_s = lease_s

    async def assemble(self, assembly: Assembly, owner: str) -> dict[str, Any] | None:
        """Write both documents and commit the job's final status; the job's row then, or ``None``
        when another worker took the job over."""
        renew = asyncio.create_task(self._renew(assembly, owner))
        try:
            coco, geojson, annotations = await self.db.run(self._write, assembly)
            job = await self.db.run(
                self.store.finish_assembly,
                assembly,
                owner,
                coco=coco,
                geojson=geojson,
                annotations=annotations,
            )
            logger.info("job %s: results written (%d annotations)", assembly.job_id, annotations)
            return job
        except LeaseLost:
            logger.warning("job %s: another worker took over its results", assembly.job_id)
            return None
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew

    async def _renew(self, assembly: Assembly, owner: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.db.run(self.store.renew_assembly, assembly, owner, self.lease_s)

    def _write(self, assembly: Assembly) -> tuple[tuple[str, int], tuple[str, int], int]:
        job = self.store.job_row(assembly.job_id)
        parameters = job["parameters"]
        tiling = TilingInfo(
            tile_size=int(parameters["tile_size"]),
            overlap=int(parameters["overlap"]),
            nms_iou=float(parameters["nms_iou"]),
            score_threshold=float(parameters["score_threshold"]),
        )
        model = ModelInfo(
            name=job["model_name"],
            version=job["model_version"],
            sha256=job["model_sha256"],
            triton_version=self.model.triton_version,
            categories=self.model.categories,
            contract=self.model.contract,
        )
        created = aware(job["created_at"])
        assert created is not None
        info = coco_info(model, tiling, job_id=assembly.job_id, created=created)
        counter = _Counter()
        coco_path = self.storage.result_path(COCO_KEY.format(job_id=assembly.job_id))
        for stale in coco_path.parent.glob(".*.tmp"):  # left by an assembler that died; ours now
            stale.unlink(missing_ok=True)
        with atomic_write(coco_path) as out:
            write_coco(
                out,
                info=info,
                categories=reported_categories(model, self.store.category_ids(assembly.job_id)),
                images=self._images(assembly.job_id),
                detections=batch_records(counter.count(self._detections(assembly.job_id))),
            )
        coco = (out.sha256, out.size)
        geojson_path = self.storage.result_path(GEOJSON_KEY.format(job_id=assembly.job_id))
        with atomic_write(geojson_path) as geo_out:
            write_geojson(
                geo_out,
                model=model,
                images=self._images(assembly.job_id),
                detections=batch_records(self._detections(assembly.job_id)),
            )
        return coco, (geo_out.sha256, geo_out.size), counter.n

    def _images(self, job_id: str) -> Iterator[ImageRecord]:
        for row in self.store.images(job_id):
            yield ImageRecord(
                id=row.position,
                file_name=row.name,
                width=row.width,
                height=row.height,
                sha256=row.sha256,
                crs=row.crs,
                transform=tuple(row.transform) if row.transform is not None else None,
                warnings=tuple(row.warnings or ()),
                gsd_m=row.gsd_m,
                gsd_source=row.gsd_source,
                inference_gsd_m=row.inference_gsd_m,
                resample_factor=1.0 if row.resample_factor is None else row.resample_factor,
                out_of_domain=DomainCheck.from_json(row.out_of_domain) if row.out_of_domain else None,
            )

    def _detections(self, job_id: str) -> Iterator[DetectionRecord]:
        for row in self.store.detection_rows(job_id):
            yield DetectionRecord(
                image_id=row.position,
                category_id=row.category_id,
                bbox=(row.x, row.y, row.w, row.h),
                score=row.score,
                geometry=_geometry(row.geometry),
            )


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def count(self, items: Iterator[DetectionRecord]) -> Iterator[DetectionRecord]:
        for item in items:
            self.n += 1
            yield item


def _geometry(text: str | None) -> dict[str, Any] | None:
    return orjson.loads(text) if text else None

"""Job results at scale: COCO and GeoJSON of 1,000,000 detections over 1,000 images, streamed to disk.

The input comes from a seeded generator, one image's detections at a time (bounded on the input side
too), as the job engine reads them back from its store. Each case runs in its own process, so that each
peak RSS (``ru_maxrss``) is its own:

- ``input``, ``input+geo``: the generator alone, without and with polygons (what producing the input
  costs, before any writing);
- ``coco``: :func:`write_coco` into :func:`atomic_write`, from one column batch per image;
- ``coco-rows``: the same from one :class:`DetectionRecord` per detection, gathered by
  :func:`batch_records` (the form of one database row per detection);
- ``coco-dicts``: the same document streamed image by image, but each image's annotations as a list of
  dicts encoded by ``orjson.dumps`` (what formatting from columns saves);
- ``geojson``: :func:`write_geojson` into :func:`atomic_write`, each detection with its polygon;
- ``in-memory``: the whole COCO document built in memory (a dict per annotation) and encoded with one
  ``orjson.dumps``, the baseline; it must give the same bytes as ``coco``.

Target: under 500 MiB peak RSS for the 1,000,000-detection COCO.

Run: ``python -m loadtest.bench_results [--images 1000] [--per-image 1000] [--dir DIR] [--skip-in-memory]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from export.synth import PALM_CATEGORIES
from gateway.pipeline.atomic import AtomicFile, atomic_write
from gateway.pipeline.contract import ModelContract
from gateway.pipeline.merge import Detections
from gateway.pipeline.render import (
    DetectionBatch,
    DetectionRecord,
    ImageRecord,
    batch_records,
    coco_categories,
    coco_info,
    detection_batch,
    image_record,
    write_coco,
    write_geojson,
)
from gateway.pipeline.result import ImageMeta, ImageResult, ModelInfo, TilingInfo

MODEL = ModelInfo(
    "palm",
    "1.1.0",
    "ab" * 32,
    categories=PALM_CATEGORIES,
    contract=ModelContract(512, 2048, "images", "detections"),
)
TILING = TilingInfo(512, 128, 0.5, 0.3)
CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SIDE = 20_000
CASES = ("input", "input+geo", "coco", "coco-rows", "coco-dicts", "geojson", "in-memory")
INFO = coco_info(MODEL, TILING, job_id="bench", created=CREATED)


def images(count: int) -> Iterator[ImageMeta]:
    for position in range(1, count + 1):
        yield ImageMeta(
            file_name=f"scene-{position:05d}.tif",
            width=SIDE,
            height=SIDE,
            sha256=hashlib.sha256(str(position).encode()).hexdigest(),
            crs="EPSG:32633",
            transform=(0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0),
        )


def results(count: int, per_image: int, geometry: bool) -> Iterator[ImageResult]:
    """One image's merged detections at a time, seeded, with EPSG:4326 polygons when ``geometry``."""
    rng = np.random.default_rng(20240501)
    for image in images(count):
        corner = rng.uniform(0, SIDE - 100, (per_image, 2))
        size = rng.uniform(8, 90, (per_image, 2))
        boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
        scores = rng.uniform(0.3, 1.0, per_image).astype(np.float32)
        classes = rng.integers(1, 3, per_image).astype(np.int32)
        polygons: list[dict[str, Any] | None] = []
        if geometry:
            lon = 10.0 + boxes[:, [0, 2, 2, 0, 0]].astype(np.float64) * 3e-6
            lat = 36.0 - boxes[:, [1, 1, 3, 3, 1]].astype(np.float64) * 3e-6
            rings = np.round(np.stack([lon, lat], axis=2), 8).tolist()
            polygons = [{"type": "Polygon", "coordinates": [ring]} for ring in rings]
        yield ImageResult(image, Detections(boxes, scores, classes), polygons)


def records(count: int, per_image: int) -> Iterator[DetectionRecord]:
    for position, result in enumerate(results(count, per_image, geometry=False), 1):
        batch = detection_batch(position, result)
        for category_id, bbox, score in zip(
            batch.category_ids.tolist(), batch.bboxes.tolist(), batch.scores.tolist(), strict=True
        ):
            x, y, w, h = bbox
            yield DetectionRecord(position, category_id, (x, y, w, h), score, None)


def image_records(count: int) -> list[ImageRecord]:
    return [image_record(position, image) for position, image in enumerate(images(count), 1)]


def annotation_dicts(image_id: int, first: int, result: ImageResult) -> list[dict[str, Any]]:
    """One image's COCO annotations as dicts, numbered from ``first``."""
    boxes = result.detections.boxes.astype(np.float64)
    xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), 2)
    scores = np.round(result.detections.scores.astype(np.float64), 4).tolist()
    return [
        {
            "id": first + k,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": round(bbox[2] * bbox[3], 2),
            "iscrowd": 0,
            "score": score,
            "segmentation": [],
        }
        for k, (bbox, score, category_id) in enumerate(
            zip(xywh.tolist(), scores, result.detections.class_ids.tolist(), strict=True)
        )
    ]


def image_dict(image_id: int, image: ImageMeta) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": image.file_name,
        "width": image.width,
        "height": image.height,
        "sha256": image.sha256,
        "crs": image.crs,
        "transform": list(image.transform) if image.transform is not None else None,
    }


def dict_streamed_coco(out: AtomicFile, count: int, per_image: int) -> None:
    """The document streamed image by image, each image's annotations a list of dicts."""
    head = {"info": INFO, "licenses": [], "categories": coco_categories(MODEL.categories)}
    image_list = [image_dict(i, image) for i, image in enumerate(images(count), 1)]
    out.write(orjson.dumps(head)[:-1] + b',"images":' + orjson.dumps(image_list) + b',"annotations":[')
    first = 1
    for image_id, result in enumerate(results(count, per_image, geometry=False), 1):
        annotations = annotation_dicts(image_id, first, result)
        if annotations:
            out.write((b"," if first > 1 else b"") + orjson.dumps(annotations)[1:-1])
        first += len(annotations)
    out.write(b"]}")


def in_memory_coco(count: int, per_image: int) -> bytes:
    """The whole document as one dict, an annotation dict per detection, encoded at once."""
    image_dicts: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for result in results(count, per_image, geometry=False):
        image_id = len(image_dicts) + 1
        image_dicts.append(image_dict(image_id, result.image))
        annotations.extend(annotation_dicts(image_id, len(annotations) + 1, result))
    return orjson.dumps(
        {
            "info": INFO,
            "licenses": [],
            "categories": coco_categories(MODEL.categories),
            "images": image_dicts,
            "annotations": annotations,
        }
    )


def run_case(case: str, count: int, per_image: int, directory: Path) -> dict[str, Any]:
    """One case in this process: seconds, bytes written and their sha256."""
    batches: Iterator[DetectionBatch]
    started = time.perf_counter()
    if case.startswith("input"):
        for _ in results(count, per_image, geometry=case == "input+geo"):
            pass
        return {"seconds": time.perf_counter() - started, "bytes": 0, "sha256": None}
    if case == "in-memory":
        content = in_memory_coco(count, per_image)
        with atomic_write(directory / "in-memory.coco.json") as out:
            out.write(content)
    elif case == "coco-dicts":
        with atomic_write(directory / "coco-dicts.coco.json") as out:
            dict_streamed_coco(out, count, per_image)
    elif case == "geojson":
        batches = (detection_batch(i, r) for i, r in enumerate(results(count, per_image, geometry=True), 1))
        with atomic_write(directory / "geojson.geojson") as out:
            write_geojson(out, model=MODEL, images=image_records(count), detections=batches)
    else:
        if case == "coco":
            batches = (
                detection_batch(i, r) for i, r in enumerate(results(count, per_image, geometry=False), 1)
            )
        else:
            batches = batch_records(records(count, per_image))
        with atomic_write(directory / f"{case}.coco.json") as out:
            write_coco(
                out, info=INFO, categories=MODEL.categories, images=image_records(count), detections=batches
            )
    return {"seconds": time.perf_counter() - started, "bytes": out.size, "sha256": out.sha256}


def child(args: argparse.Namespace) -> None:
    figures = run_case(args.case, args.images, args.per_image, Path(args.dir))
    figures["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-image", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temporary directory)")
    parser.add_argument("--skip-in-memory", action="store_true", help="leave out the in-memory baseline")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        child(args)
        return
    total = args.images * args.per_image
    with tempfile.TemporaryDirectory(prefix="bench-results-") as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        print(f"{total:,} detections over {args.images:,} images, files in {directory}")
        print(f"{'case':<10} {'seconds':>8} {'MB':>8} {'detections/s':>13} {'peak RSS':>10}")
        digests: dict[str, str] = {}
        for case in CASES:
            if case == "in-memory" and args.skip_in_memory:
                continue
            command = [
                sys.executable, "-m", "loadtest.bench_results", "--case", case, "--dir", str(directory),
                "--images", str(args.images), "--per-image", str(args.per_image),
            ]  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                print(f"{case:<10} did not finish (exit {completed.returncode}): {completed.stderr[-300:]}")
                continue
            figures = json.loads(completed.stdout)
            seconds, written = figures["seconds"], figures["bytes"]
            rate = f"{'':>13}" if case.startswith("input") else f"{total / seconds:13,.0f}"
            print(
                f"{case:<10} {seconds:8.2f} {written / 1e6:8.1f} {rate} "
                f"{figures['peak_rss_kib'] / 1024:7.0f} MiB"
            )
            if figures["sha256"]:
                digests[case] = figures["sha256"]
            for leftover in directory.glob(f"{case}.*"):
                leftover.unlink()
        if "in-memory" in digests:
            same = len({digests[case] for case in ("in-memory", "coco", "coco-rows", "coco-dicts")}) == 1
            print(f"every COCO case identical to the in-memory document: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()

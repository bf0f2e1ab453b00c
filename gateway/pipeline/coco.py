"""Results of one image and their COCO / JSON rendering (pure; no I/O).

The COCO document is the same shape for one image (``/v1/predict?format=coco``) and for a bulk job of
thousands: ``info`` records the model and the tiling/merge parameters that produced it, ``images``
carry size, sha256 and georeferencing, ``annotations`` carry ``score`` so the file loads both with
``pycocotools.coco.COCO`` and, as a result list, with ``COCO.loadRes``.

Boxes follow the COCO convention: ``[x, y, width, height]`` in pixels of the original image, ``x, y`` the
top-left corner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from gateway.pipeline.merge import Detections

CATEGORIES: Mapping[int, str] = {1: "palm_tree", 2: "building"}
SUPERCATEGORIES: Mapping[int, str] = {1: "vegetation", 2: "structure"}

GeoJSONGeometry = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Which model produced a result."""

    name: str
    version: str
    sha256: str | None


@dataclass(frozen=True, slots=True)
class TilingInfo:
    """How an image was cut and merged; recorded so results are reproducible."""

    tile_size: int
    overlap: int
    nms_iou: float
    score_threshold: float


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """The image as the user sent it."""

    file_name: str
    width: int
    height: int
    sha256: str | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImageResult:
    """Merged detections of one image with their EPSG:4326 geometries (``None`` without a CRS)."""

    image: ImageMeta
    detections: Detections
    geometries: Sequence[GeoJSONGeometry | None]
    tiles_total: int = 0
    tiles_skipped: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage: ``open``, ``first_result`` (open to the first batch's detections), ``tiles``
    (open to the last), ``merge``, ``georeference``."""


def category_name(category_id: int) -> str:
    name = CATEGORIES.get(category_id)
    return name if name is not None else f"class_{category_id}"


def coco_bbox(box: Sequence[float]) -> list[float]:
    """``x1, y1, x2, y2`` to COCO ``[x, y, w, h]``, rounded to 1/100 px."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def _columns(det: Detections) -> tuple[list[list[float]], list[float], list[int]]:
    """COCO boxes, scores and category ids as plain lists, converted in one vectorised step."""
    boxes = det.boxes.astype(np.float64)
    xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), 2)
    return xywh.tolist(), np.round(det.scores.astype(np.float64), 4).tolist(), det.class_ids.tolist()


def _names(classes: list[int]) -> dict[int, str]:
    """Category name of each distinct id, looked up once per image rather than once per detection."""
    return {category_id: category_name(category_id) for category_id in set(classes)}


def _padded(geometries: Sequence[GeoJSONGeometry | None], n: int) -> list[GeoJSONGeometry | None]:
    return list(geometries) + [None] * (n - len(geometries))


def detection_records(result: ImageResult) -> list[dict[str, Any]]:
    """The ``detections`` list of the plain JSON format."""
    bboxes, scores, classes = _columns(result.detections)
    geometries = _padded(result.geometries, len(bboxes))
    names = _names(classes)
    return [
        {
            "category_id": category_id,
            "category": names[category_id],
            "score": score,
            "bbox": bbox,
            "geometry": geometry,
        }
        for bbox, score, category_id, geometry in zip(bboxes, scores, classes, geometries, strict=False)
    ]


def to_json(result: ImageResult, model: ModelInfo) -> dict[str, Any]:
    """The default ``/v1/predict`` body."""
    image = result.image
    return {
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
        "image": {
            "file_name": image.file_name,
            "width": image.width,
            "height": image.height,
            "crs": image.crs,
            "transform": list(image.transform) if image.transform is not None else None,
        },
        "detections": detection_records(result),
        "tiles": {"total": result.tiles_total, "skipped": result.tiles_skipped},
        "warnings": list(image.warnings),
    }


def coco_categories() -> list[dict[str, Any]]:
    return [
        {"id": cid, "name": name, "supercategory": SUPERCATEGORIES[cid]} for cid, name in CATEGORIES.items()
    ]


def coco_info(
    model: ModelInfo, tiling: TilingInfo, description: str = "Palm Serve detections"
) -> dict[str, Any]:
    return {
        "description": description,
        "version": model.version,
        "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
        "tiling": {
            "tile_size": tiling.tile_size,
            "overlap": tiling.overlap,
            "merge": "class-aware greedy NMS in image pixels, whole boxes before seam-truncated ones",
            "nms_iou": tiling.nms_iou,
            "score_threshold": tiling.score_threshold,
        },
    }


class CocoBuilder:
    """Accumulates images and annotations into one COCO dataset, assigning ids in arrival order.

    Bulk jobs add thousands of images one by one; the builder holds plain dicts only.
    """

    def __init__(self, model: ModelInfo, tiling: TilingInfo) -> None:
        self._info = coco_info(model, tiling)
        self._images: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []

    def add(self, result: ImageResult) -> int:
        """Append one image and its detections; returns the image id."""
        image_id = len(self._images) + 1
        image = result.image
        self._images.append(
            {
                "id": image_id,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
                "sha256": image.sha256,
                "crs": image.crs,
                "transform": list(image.transform) if image.transform is not None else None,
            }
        )
        bboxes, scores, classes = _columns(result.detections)
        first = len(self._annotations) + 1
        self._annotations.extend(
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
            for k, (bbox, score, category_id) in enumerate(zip(bboxes, scores, classes, strict=True))
        )
        return image_id

    def build(self) -> dict[str, Any]:
        return {
            "info": self._info,
            "licenses": [],
            "categories": coco_categories(),
            "images": self._images,
            "annotations": self._annotations,
        }


def to_coco(results: Iterable[ImageResult], model: ModelInfo, tiling: TilingInfo) -> dict[str, Any]:
    """A COCO dataset holding every given image."""
    builder = CocoBuilder(model, tiling)
    for result in results:
        builder.add(result)
    return builder.build()


def to_geojson(results: Iterable[ImageResult], model: ModelInfo) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection in EPSG:4326; features without a CRS carry ``geometry: null``."""
    features: list[dict[str, Any]] = []
    model_name = f"{model.name}/{model.version}"
    for result in results:
        # Built straight from the columns: going through detection_records() built every dict twice.
        bboxes, scores, classes = _columns(result.detections)
        geometries = _padded(result.geometries, len(bboxes))
        names = _names(classes)
        file_name = result.image.file_name
        features.extend(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "category_id": category_id,
                    "category": names[category_id],
                    "score": score,
                    "bbox_px": bbox,
                    "file_name": file_name,
                    "model": model_name,
                },
            }
            for bbox, score, category_id, geometry in zip(bboxes, scores, classes, geometries, strict=False)
        )
    return {"type": "FeatureCollection", "features": features}

"""Results rendered as the plain JSON, COCO or GeoJSON documents users download (pure; no I/O).

The COCO document is the same shape for one image (``/v1/predict?format=coco``) and for many:
``info`` records the model and the tiling/merge parameters that produced it, ``images`` carry size,
sha256 and georeferencing, ``annotations`` carry ``score`` so the file loads both with
``pycocotools.coco.COCO`` and, as a result list, with ``COCO.loadRes``.

Boxes follow the COCO convention: ``[x, y, width, height]`` in pixels of the original image, ``x, y`` the
top-left corner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import numpy as np
import orjson

from gateway.pipeline.merge import Detections
from gateway.pipeline.result import GeoJSONGeometry, ImageResult, ModelInfo, TilingInfo


class OutputFormat(StrEnum):
    """The documents a prediction can be rendered as."""

    json = "json"
    coco = "coco"
    geojson = "geojson"


MEDIA_TYPES: Mapping[OutputFormat, str] = {
    OutputFormat.json: "application/json",
    OutputFormat.coco: "application/json",
    OutputFormat.geojson: "application/geo+json",
}

FILE_SUFFIXES: Mapping[OutputFormat, str] = {
    OutputFormat.json: ".json",
    OutputFormat.coco: ".coco.json",
    OutputFormat.geojson: ".geojson",
}


def render(fmt: OutputFormat, results: Sequence[ImageResult], model: ModelInfo, tiling: TilingInfo) -> bytes:
    """The bytes of ``results`` in format ``fmt``, as the API and the command line deliver them.

    Raises:
        ValueError: ``fmt`` is ``json`` (one image per document) and ``results`` is not exactly one.
    """
    if fmt is OutputFormat.json:
        if len(results) != 1:
            raise ValueError(f"the json format holds one image, not {len(results)}")
        return orjson.dumps(to_json(results[0], model))
    if fmt is OutputFormat.coco:
        return orjson.dumps(to_coco(results, model, tiling))
    return orjson.dumps(to_geojson(results, model))


def _columns(det: Detections) -> tuple[list[list[float]], list[float], list[int]]:
    """COCO boxes, scores and category ids as plain lists, converted in one vectorised step."""
    boxes = det.boxes.astype(np.float64)
    xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), 2)
    return xywh.tolist(), np.round(det.scores.astype(np.float64), 4).tolist(), det.class_ids.tolist()


def _names(model: ModelInfo, classes: list[int]) -> dict[int, str]:
    """Category name of each distinct id in ``classes``."""
    return {category_id: model.category_name(category_id) for category_id in set(classes)}


def _padded(geometries: Sequence[GeoJSONGeometry | None], n: int) -> list[GeoJSONGeometry | None]:
    return list(geometries) + [None] * (n - len(geometries))


def model_record(model: ModelInfo) -> dict[str, Any]:
    """The ``model`` object every document carries."""
    return {
        "name": model.name,
        "version": model.version,
        "triton_version": model.triton_version,
        "sha256": model.sha256,
    }


def detection_records(result: ImageResult, model: ModelInfo) -> list[dict[str, Any]]:
    """The ``detections`` list of the plain JSON format."""
    bboxes, scores, classes = _columns(result.detections)
    geometries = _padded(result.geometries, len(bboxes))
    names = _names(model, classes)
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
        "model": model_record(model),
        "image": {
            "file_name": image.file_name,
            "width": image.width,
            "height": image.height,
            "crs": image.crs,
            "transform": list(image.transform) if image.transform is not None else None,
        },
        "detections": detection_records(result, model),
        "tiles": {"total": result.tiles_total, "skipped": result.tiles_skipped},
        "warnings": list(image.warnings),
    }


def coco_categories(model: ModelInfo) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in model.categories]


def coco_info(
    model: ModelInfo, tiling: TilingInfo, description: str = "Palm Serve detections"
) -> dict[str, Any]:
    return {
        "description": description,
        "version": model.version,
        "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_record(model),
        "tiling": {
            "tile_size": tiling.tile_size,
            "overlap": tiling.overlap,
            "merge": "class-aware greedy NMS in image pixels, whole boxes before seam-truncated ones",
            "nms_iou": tiling.nms_iou,
            "score_threshold": tiling.score_threshold,
        },
    }


class CocoBuilder:
    """Accumulates images and annotations into one COCO dataset, assigning ids in arrival order."""

    def __init__(self, model: ModelInfo, tiling: TilingInfo) -> None:
        self._model = model
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
            "categories": coco_categories(self._model),
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
    """An RFC 7946 FeatureCollection in EPSG:4326; features without a CRS carry ``geometry: null``.

    Two foreign members (RFC 7946 section 6.1) go with the features: ``model``, and ``warnings``, what
    the reader said about each file (``{"file_name", "message"}``), such as why it has no geometry.
    """
    features: list[dict[str, Any]] = []
    warnings: list[dict[str, str]] = []
    model_name = f"{model.name}/{model.version}"
    for result in results:
        warnings.extend({"file_name": result.image.file_name, "message": w} for w in result.image.warnings)
        bboxes, scores, classes = _columns(result.detections)
        geometries = _padded(result.geometries, len(bboxes))
        names = _names(model, classes)
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
    return {
        "type": "FeatureCollection",
        "features": features,
        "model": model_record(model),
        "warnings": warnings,
    }

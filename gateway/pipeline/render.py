"""Results rendered as the plain JSON, COCO or GeoJSON documents users download.

Pure: the writers put bytes into a sink the caller hands them (a ``BytesIO`` for one image, the file
:func:`gateway.pipeline.atomic.atomic_write` yields for a job) and open nothing themselves.

One code path writes COCO and GeoJSON whoever asks: :func:`render` gives the bytes of one request's
images, :func:`write_coco` and :func:`write_geojson` stream any number of images from two iterables,
:class:`ImageRecord` per image and :class:`DetectionBatch` per run of one image's detections, with
memory bounded by the number of images (their ids, file names, warnings and resolution), never by the
number of detections. Nothing inside reads a clock: the same input gives the same bytes, so a resumed job
rebuilds its documents exactly.

The COCO document is the same shape for one image (``/v1/predict?format=coco``) and for many:
``info`` records the model and the tiling/merge parameters that produced it, ``images`` carry size,
sha256, georeferencing, resolution (:func:`resolution_record`), warnings and the out-of-domain check
(:func:`domain_record`), ``annotations`` carry ``score`` so the file loads both with
``pycocotools.coco.COCO`` and, as a result list, with ``COCO.loadRes``.

Boxes follow the COCO convention: ``[x, y, width, height]`` in pixels of the original image, ``x, y`` the
top-left corner, rounded to 0.01 px; scores are rounded to 1e-4 and ``area`` is
``round(width * height, 2)`` of the rounded box.
"""

from __future__ import annotations

import io
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from gateway.pipeline.domain import DomainCheck
from gateway.pipeline.merge import Detections
from gateway.pipeline.result import Category, GeoJSONGeometry, ImageMeta, ImageResult, ModelInfo, TilingInfo

ROWS_PER_CHUNK = 8192
"""Detections formatted at once; bounds the writers' working memory whatever the size of a batch."""


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


class BinarySink(Protocol):
    """Where the writers put their bytes: a binary file, a ``BytesIO``, an ``AtomicFile``."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of a document.

    Attributes:
        id: the image's id in the document; for a job, the file's 1-based position in upload order, so
            ids keep their gaps where files failed and do not depend on when each file finished.
        file_name: the name the user gave the file.
        width: width in pixels.
        height: height in pixels.
        sha256: hex digest of the file's bytes.
        crs: the file's coordinate reference system, ``None`` without one.
        transform: the file's affine pixel-to-CRS transform (GDAL order), ``None`` without one.
        warnings: what the reader said about the file (GeoJSON's ``warnings`` member).
        gsd_m: the file's ground sample distance in metres, ``None`` when unknown.
        gsd_source: where ``gsd_m`` comes from (``"file"`` or ``"caller"``).
        inference_gsd_m: the ground sample distance the model saw.
        resample_factor: source pixels per model pixel along each axis (1.0: read as it is).
        out_of_domain: the file's out-of-domain check, ``None`` when it was not scored.
    """

    id: int
    file_name: str
    width: int
    height: int
    sha256: str | None
    crs: str | None
    transform: tuple[float, ...] | None
    warnings: tuple[str, ...] = ()
    gsd_m: float | None = None
    gsd_source: str | None = None
    inference_gsd_m: float | None = None
    resample_factor: float = 1.0
    out_of_domain: DomainCheck | None = None


@dataclass(frozen=True, slots=True)
class DetectionRecord:
    """One detection, as a job stores it (one database row each).

    Attributes:
        image_id: the :attr:`ImageRecord.id` of its image.
        category_id: its class.
        bbox: ``x, y, width, height`` in pixels of the original image (unrounded).
        score: the model's confidence (unrounded).
        geometry: its EPSG:4326 polygon, ``None`` when the image has no CRS.
    """

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float
    geometry: GeoJSONGeometry | None


@dataclass(frozen=True, slots=True, eq=False)
class DetectionBatch:
    """Consecutive detections of one image as columns, the form the writers format at once.

    Attributes:
        image_id: the :attr:`ImageRecord.id` of their image.
        category_ids: ``(N,)`` integer classes.
        bboxes: ``(N, 4)`` ``x, y, width, height`` in pixels of the original image (unrounded).
        scores: ``(N,)`` confidences (unrounded).
        geometries: ``N`` EPSG:4326 polygons (``None`` for one without), or ``None`` when none has one.

    Raises:
        ValueError: the columns disagree on ``N``, or the category ids are not integers.
    """

    image_id: int
    category_ids: npt.NDArray[np.integer[Any]]
    bboxes: npt.NDArray[np.floating[Any]]
    scores: npt.NDArray[np.floating[Any]]
    geometries: Sequence[GeoJSONGeometry | None] | None = None

    def __post_init__(self) -> None:
        n = len(self)
        if self.category_ids.shape != (n,) or self.bboxes.shape != (n, 4):
            raise ValueError(
                f"a batch of {n} scores needs ({n},) category ids and ({n}, 4) boxes, got "
                f"{self.category_ids.shape} and {self.bboxes.shape}"
            )
        if self.category_ids.dtype.kind not in "iu":
            raise ValueError(f"category ids must be integers, got {self.category_ids.dtype}")
        if self.geometries is not None and len(self.geometries) != n:
            raise ValueError(f"a batch of {n} detections got {len(self.geometries)} geometries")

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def image_record(image_id: int, image: ImageMeta) -> ImageRecord:
    """The record of ``image`` under id ``image_id``."""
    return ImageRecord(
        id=image_id,
        file_name=image.file_name,
        width=image.width,
        height=image.height,
        sha256=image.sha256,
        crs=image.crs,
        transform=image.transform,
        warnings=image.warnings,
        gsd_m=image.gsd_m,
        gsd_source=image.gsd_source,
        inference_gsd_m=image.inference_gsd_m,
        resample_factor=image.resample_factor,
        out_of_domain=image.out_of_domain,
    )


def resolution_record(
    gsd_m: float | None, gsd_source: str | None, inference_gsd_m: float | None, resample_factor: float
) -> dict[str, Any]:
    """The resolution members of an image in every document: ``gsd_m`` (the file's ground sample
    distance, ``null`` when unknown), ``gsd_source`` (``"file"``, ``"caller"`` or ``null``),
    ``inference_gsd_m`` (what the model saw) and ``resample_factor`` (source pixels per model pixel
    along each axis; 1 when read as it is), GSDs in metres rounded to 0.1 mm."""
    return {
        "gsd_m": _round_or_none(gsd_m, 4),
        "gsd_source": gsd_source,
        "inference_gsd_m": _round_or_none(inference_gsd_m, 4),
        "resample_factor": round(resample_factor, 4),
    }


def _round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def domain_record(check: DomainCheck | None) -> dict[str, Any] | None:
    """An image's ``out_of_domain`` member in every document: ``score`` (the distance of its input
    statistics from the model's validation imagery, in standard deviations), ``threshold``, ``flagged``
    (``score > threshold``), the ``statistic`` that drove the score with its ``value`` and
    ``baseline_mean``, and the nearest validated ``variant`` (``colour`` or ``grey``); ``null`` when the
    model has no input baseline (see :mod:`gateway.pipeline.domain`)."""
    return None if check is None else check.to_json()


def detection_batch(image_id: int, result: ImageResult) -> DetectionBatch:
    """The detections of ``result`` as one batch of image ``image_id``; missing geometries are ``None``."""
    n = len(result.detections)
    geometries = list(result.geometries[:n])
    geometries += [None] * (n - len(geometries))
    return DetectionBatch(
        image_id=image_id,
        category_ids=result.detections.class_ids,
        bboxes=_xywh(result.detections),
        scores=result.detections.scores.astype(np.float64),
        geometries=None if geometries.count(None) == n else geometries,
    )


def batch_records(
    records: Iterable[DetectionRecord], max_rows: int = ROWS_PER_CHUNK
) -> Iterator[DetectionBatch]:
    """Consecutive ``records`` of one image gathered into batches of at most ``max_rows``.

    How records are split into batches does not change the documents: the writers give the same bytes
    for one batch per image, many, or records gathered here.
    """
    current: list[DetectionRecord] = []
    for record in records:
        if current and (record.image_id != current[0].image_id or len(current) == max_rows):
            yield _batch_of(current)
            current = []
        current.append(record)
    if current:
        yield _batch_of(current)


def _batch_of(records: list[DetectionRecord]) -> DetectionBatch:
    geometries = [r.geometry for r in records]
    return DetectionBatch(
        image_id=records[0].image_id,
        category_ids=np.array([r.category_id for r in records], np.int64),
        bboxes=np.array([r.bbox for r in records], np.float64).reshape(len(records), 4),
        scores=np.array([r.score for r in records], np.float64),
        geometries=None if geometries.count(None) == len(geometries) else geometries,
    )


def render(
    fmt: OutputFormat,
    results: Sequence[ImageResult],
    model: ModelInfo,
    tiling: TilingInfo,
    *,
    created: datetime,
) -> bytes:
    """The bytes of ``results`` in format ``fmt``, as the API and the command line deliver them.

    Images get ids ``1..len(results)`` in the order given.

    Args:
        fmt: the document to write.
        results: the images, in order.
        model: the model that produced them.
        tiling: how they were cut and merged (COCO's ``info.tiling``).
        created: when the document was made (COCO's ``info.date_created``); timezone-aware.

    Raises:
        ValueError: ``fmt`` is ``json`` (one image per document) and ``results`` is not exactly one.
    """
    if fmt is OutputFormat.json:
        if len(results) != 1:
            raise ValueError(f"the json format holds one image, not {len(results)}")
        return orjson.dumps(to_json(results[0], model))
    buffer = io.BytesIO()
    images = [image_record(i, result.image) for i, result in enumerate(results, 1)]
    detections = (detection_batch(i, result) for i, result in enumerate(results, 1))
    if fmt is OutputFormat.coco:
        info = coco_info(model, tiling, created=created)
        found = {int(i) for result in results for i in np.unique(result.detections.class_ids)}
        categories = reported_categories(model, found)
        write_coco(buffer, info=info, categories=categories, images=images, detections=detections)
    else:
        write_geojson(buffer, model=model, images=images, detections=detections)
    return buffer.getvalue()


def _xywh(det: Detections) -> npt.NDArray[np.float64]:
    """``x1, y1, x2, y2`` boxes as COCO's ``x, y, width, height``, in float64 (unrounded)."""
    boxes = det.boxes.astype(np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _columns(det: Detections) -> tuple[list[list[float]], list[float], list[int]]:
    """COCO boxes, scores and category ids as plain lists, converted in one vectorised step."""
    xywh = np.round(_xywh(det), 2)
    return xywh.tolist(), np.round(det.scores.astype(np.float64), 4).tolist(), det.class_ids.tolist()


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
    geometries = list(result.geometries) + [None] * (len(bboxes) - len(result.geometries))
    names = {category_id: model.category_name(category_id) for category_id in set(classes)}
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
            **resolution_record(image.gsd_m, image.gsd_source, image.inference_gsd_m, image.resample_factor),
            "out_of_domain": domain_record(image.out_of_domain),
        },
        "detections": detection_records(result, model),
        "tiles": {"total": result.tiles_total, "skipped": result.tiles_skipped},
        "warnings": list(image.warnings),
    }


def coco_categories(categories: Iterable[Category]) -> list[dict[str, Any]]:
    """COCO's ``categories`` list."""
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in categories]


def reported_categories(model: ModelInfo, found: Iterable[int]) -> tuple[Category, ...]:
    """The model's categories, then ``class_<id>`` for each id in ``found`` that they lack (a model
    without a card, or one that reports an id its card omits), so every annotation names a category."""
    known = {c.id for c in model.categories}
    extra = sorted({int(i) for i in found} - known)
    return model.categories + tuple(Category(i, model.category_name(i)) for i in extra)


def coco_info(
    model: ModelInfo, tiling: TilingInfo, *, job_id: str | None = None, created: datetime
) -> dict[str, Any]:
    """COCO's ``info`` object: the model, the tiling and merge parameters, when and for which job.

    Args:
        model: the model that produced the detections.
        tiling: how the images were cut and merged.
        job_id: the job the document belongs to (``info.job_id``); left out for ``/v1/predict``.
        created: ``info.date_created``: the request's time, or the job's ``created_at``, so a document
            rebuilt later carries the same date. Written in UTC to the second.

    Raises:
        ValueError: ``created`` has no timezone (its instant would depend on the machine's zone).
    """
    if created.utcoffset() is None:
        raise ValueError("created must be timezone-aware")
    info: dict[str, Any] = {
        "description": "Palm Serve detections",
        "version": model.version,
        "date_created": created.astimezone(UTC).isoformat(timespec="seconds"),
    }
    if job_id is not None:
        info["job_id"] = job_id
    info["model"] = model_record(model)
    info["tiling"] = {
        "tile_size": tiling.tile_size,
        "overlap": tiling.overlap,
        "merge": "class-aware greedy NMS in image pixels, whole boxes before seam-truncated ones",
        "nms_iou": tiling.nms_iou,
        "score_threshold": tiling.score_threshold,
    }
    return info


def write_coco(
    out: BinarySink,
    *,
    info: Mapping[str, Any],
    categories: Sequence[Category],
    images: Iterable[ImageRecord],
    detections: Iterable[DetectionBatch],
) -> None:
    """Stream one COCO dataset into ``out``: info, licenses, categories, images, annotations.

    ``images`` are written as they come, then each batch of ``detections``; annotation ids run
    ``1..N`` in the order given, which must be (image, detection order within the image), so the same
    input always numbers, and writes, the same.

    Args:
        out: where the bytes go.
        info: COCO's ``info`` object (see :func:`coco_info`).
        categories: the model's classes.
        images: the images, by increasing id.
        detections: the detections of those images, by non-decreasing image id.

    Raises:
        ValueError: image ids do not increase, or a batch names an image that is not in ``images`` or
            comes after a later image's batch.
    """
    head = {"info": dict(info), "licenses": [], "categories": coco_categories(categories)}
    out.write(orjson.dumps(head)[:-1] + b',"images":[')
    known: set[int] = set()
    pending: list[bytes] = []
    for image in _increasing(images):
        pending.append(b"," if known else b"")
        known.add(image.id)
        pending.append(
            orjson.dumps(
                {
                    "id": image.id,
                    "file_name": image.file_name,
                    "width": image.width,
                    "height": image.height,
                    "sha256": image.sha256,
                    "crs": image.crs,
                    "transform": image.transform,
                    **_image_resolution(image),
                    "warnings": image.warnings,
                    "out_of_domain": domain_record(image.out_of_domain),
                }
            )
        )
        if len(pending) >= 512:
            out.write(b"".join(pending))
            pending.clear()
    out.write(b"".join(pending) + b'],"annotations":[')
    first_id = 1
    for chunk in _chunks(detections, known):
        bboxes = np.round(chunk.bboxes.astype(np.float64), 2)
        n = len(chunk)
        text = _rows(
            [
                b',{"id":',
                _numbers(list(range(first_id, first_id + n))),
                b',"image_id":%d,"category_id":' % chunk.image_id,
                _numbers(chunk.category_ids.tolist()),
                b',"bbox":[',
                _boxes(bboxes),
                b'],"area":',
                _numbers(_round_like_python(bboxes[:, 2] * bboxes[:, 3], 2).tolist()),
                b',"iscrowd":0,"score":',
                _numbers(np.round(chunk.scores.astype(np.float64), 4).tolist()),
                b',"segmentation":[]}',
            ],
            n,
        )
        out.write(text[1:] if first_id == 1 else text)
        first_id += n
    out.write(b"]}")


def write_geojson(
    out: BinarySink,
    *,
    model: ModelInfo,
    images: Iterable[ImageRecord],
    detections: Iterable[DetectionBatch],
) -> None:
    """Stream an RFC 7946 FeatureCollection in EPSG:4326 into ``out``, one Feature per detection.

    A feature's ``geometry`` is ``null`` when its image has no CRS; its ``properties`` are
    ``category_id``, ``category``, ``score``, ``bbox_px`` (rounded like COCO's ``bbox``), ``file_name`` and
    ``model`` (``name/version``). Three foreign members (RFC 7946 section 6.1) come before the features:
    ``model``; ``warnings``, what the reader said about each file (``{"file_name", "message"}``),
    such as why it has no geometry; and ``images``, each file's name and resolution
    (:func:`resolution_record`). ``images`` are read in full first (for those three), then
    ``detections`` stream.

    Args:
        out: where the bytes go.
        model: the model that produced the detections.
        images: the images, by increasing id.
        detections: the detections of those images, by non-decreasing image id.

    Raises:
        ValueError: as :func:`write_coco`.
    """
    file_names: dict[int, bytes] = {}
    warnings: list[dict[str, str]] = []
    resolutions: list[dict[str, Any]] = []
    for image in _increasing(images):
        file_names[image.id] = orjson.dumps(image.file_name)
        warnings.extend({"file_name": image.file_name, "message": w} for w in image.warnings)
        resolutions.append({"file_name": image.file_name, **_image_resolution(image)})
    head = {
        "type": "FeatureCollection",
        "model": model_record(model),
        "warnings": warnings,
        "images": resolutions,
    }
    out.write(orjson.dumps(head)[:-1] + b',"features":[')
    model_name = orjson.dumps(f"{model.name}/{model.version}")
    names = {c.id: orjson.dumps(c.name) for c in model.categories}
    first = True
    for chunk in _chunks(detections, file_names.keys()):
        n = len(chunk)
        classes = chunk.category_ids.tolist()
        for category_id in set(classes) - names.keys():
            names[category_id] = orjson.dumps(model.category_name(category_id))
        geometries = [b"null"] * n if chunk.geometries is None else list(map(orjson.dumps, chunk.geometries))
        text = _rows(
            [
                b',{"type":"Feature","geometry":',
                geometries,
                b',"properties":{"category_id":',
                _numbers(classes),
                b',"category":',
                list(map(names.__getitem__, classes)),
                b',"score":',
                _numbers(np.round(chunk.scores.astype(np.float64), 4).tolist()),
                b',"bbox_px":[',
                _boxes(np.round(chunk.bboxes.astype(np.float64), 2)),
                b'],"file_name":' + file_names[chunk.image_id] + b',"model":' + model_name + b"}}",
            ],
            n,
        )
        out.write(text[1:] if first else text)
        first = False
    out.write(b"]}")


def _image_resolution(image: ImageRecord) -> dict[str, Any]:
    return resolution_record(image.gsd_m, image.gsd_source, image.inference_gsd_m, image.resample_factor)


def _increasing(images: Iterable[ImageRecord]) -> Iterator[ImageRecord]:
    previous = 0
    for image in images:
        if image.id <= previous:
            raise ValueError(f"image ids must increase from 1: {image.id} after {previous}")
        previous = image.id
        yield image


def _chunks(batches: Iterable[DetectionBatch], images: Container[int]) -> Iterator[DetectionBatch]:
    """Each non-empty batch in slices of at most :data:`ROWS_PER_CHUNK`, checked against the images."""
    previous = 0
    for batch in batches:
        if batch.image_id not in images:
            raise ValueError(f"detections of image {batch.image_id}, which is not among the images")
        if batch.image_id < previous:
            raise ValueError(f"detections of image {batch.image_id} after those of image {previous}")
        previous = batch.image_id
        for start in range(0, len(batch), ROWS_PER_CHUNK):
            stop = start + ROWS_PER_CHUNK
            yield DetectionBatch(
                batch.image_id,
                batch.category_ids[start:stop],
                batch.bboxes[start:stop],
                batch.scores[start:stop],
                None if batch.geometries is None else batch.geometries[start:stop],
            )


# Rows are formatted column by column: orjson encodes each column in one call and the JSON text of the
# rows is interleaved from the columns' pieces, with no dict per detection; numbers come out exactly as
# orjson writes them anywhere. Measured gain: docs/performance.md, "Job results".


def _numbers(values: list[int] | list[float]) -> list[bytes]:
    """The JSON text of each number in ``values`` (at least one)."""
    return orjson.dumps(values)[1:-1].split(b",")


def _boxes(boxes: npt.NDArray[np.floating[Any]]) -> list[bytes]:
    """The JSON text of each ``(4,)`` row of ``boxes`` (at least one), without its brackets."""
    return orjson.dumps(boxes.tolist())[2:-2].split(b"],[")


def _rows(pieces: Sequence[bytes | list[bytes]], n: int) -> bytes:
    """``n`` rows, row ``i`` the concatenation of each piece: a constant, or a column's ``i``-th text."""
    width = len(pieces)
    parts: list[bytes] = [b""] * (width * n)
    for offset, piece in enumerate(pieces):
        parts[offset::width] = [piece] * n if isinstance(piece, bytes) else piece
    return b"".join(parts)


def _round_like_python(values: npt.NDArray[np.floating[Any]], digits: int) -> npt.NDArray[np.float64]:
    """``round(v, digits)`` of each value as Python rounds (the exact binary value, ties to even).

    ``np.round`` scales, rounds and unscales, which can land on the other side of a decimal tie, as
    ``w * h`` of 2-decimal sides often is; those few values are rounded by Python, the rest by numpy,
    which agrees with Python wherever ``values * 10**digits`` is not within rounding error of a tie.
    """
    scaled = values * 10.0**digits
    rounded: npt.NDArray[np.float64] = np.rint(scaled) / 10.0**digits
    near_tie = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) <= 1e-9 * np.maximum(1.0, np.abs(scaled))
    for i in np.flatnonzero(near_tie).tolist():
        rounded[i] = round(float(values[i]), digits)
    return rounded

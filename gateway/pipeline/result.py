"""Value types of a prediction: which model, how the image was cut, what was found (pure; no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.pipeline.contract import ModelContract
from gateway.pipeline.domain import DomainBaseline, DomainCheck
from gateway.pipeline.inputs import InputSummary
from gateway.pipeline.merge import Detections
from gateway.pipeline.resolution import GsdRange

GeoJSONGeometry = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Category:
    """One class the model detects, as COCO names it."""

    id: int
    name: str
    supercategory: str = "object"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Which model produced a result, and the classes it reports.

    Attributes:
        name: the model's name on Triton.
        version: the model's own release (its card's ``version``, e.g. ``1.1.0``); Triton's version
            directory when the model has no card.
        sha256: the digest of the weights' file.
        triton_version: the version directory Triton serves (``1``).
        categories: the classes, as the card lists them; empty without a card (ids are then
            reported as ``class_<id>``).
        contract: the tensors the model takes and returns (tile size, ``K``, names).
        resolution: the ground sample distances the model was trained for (its card's ``resolution``);
            ``None`` when the card states none, and then no file is resampled or refused for its GSD.
        domain: the card's input baseline and out-of-domain threshold (:mod:`gateway.pipeline.domain`);
            ``None`` when the card records no baseline (no file is scored then).
    """

    name: str
    version: str
    sha256: str | None
    triton_version: str = "1"
    categories: tuple[Category, ...] = ()
    contract: ModelContract = field(kw_only=True)
    resolution: GsdRange | None = None
    domain: DomainBaseline | None = None

    def category_name(self, category_id: int) -> str:
        """The name of ``category_id``; ``class_<id>`` for an id the model's table lacks."""
        for category in self.categories:
            if category.id == category_id:
                return category.name
        return f"class_{category_id}"


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
    gsd_m: float | None = None
    """Ground sample distance at the image's centre in metres (from its georeferencing, or the caller's
    ``gsd=`` for a file without one); ``None`` when unknown."""
    gsd_source: str | None = None
    """Where ``gsd_m`` comes from: ``"file"`` or ``"caller"``; ``None`` when unknown."""
    inference_gsd_m: float | None = None
    """The ground sample distance the model saw: ``gsd_m`` unless the file was resampled."""
    resample_factor: float = 1.0
    """Source pixels per model pixel along each axis (:mod:`gateway.pipeline.resolution`); 1.0 when the
    file was read at its own resolution."""
    out_of_domain: DomainCheck | None = None
    """How far the image's input statistics lie from the model's validation imagery; ``None`` when the
    model has no baseline or no pixel was valid. Above its threshold, ``warnings`` says so too."""


@dataclass(frozen=True, slots=True)
class ImageResult:
    """Merged detections of one image with their EPSG:4326 geometries (``None`` without a CRS)."""

    image: ImageMeta
    detections: Detections
    geometries: Sequence[GeoJSONGeometry | None]
    tiles_total: int = 0
    tiles_skipped: int = 0
    inputs: InputSummary | None = None
    """Statistics of the tiles the model was given (:mod:`gateway.pipeline.inputs`)."""
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage: ``open``, ``first_result`` (open to the first batch's detections), ``tiles``
    (open to the last), ``merge``, ``georeference``."""
    quicklook_png: bytes | None = None
    """The whole image as an RGBA PNG, when the caller asked for one and it could be rendered."""

"""Which ground sample distance (GSD) a file is read at: pure arithmetic over plain values, no I/O.

A detector is trained for objects of a certain size in pixels, i.e. for pixels of a certain size on
the ground. The model card states that range (:class:`GsdRange`: ``lo`` to ``hi`` metres, the GSD
``t`` finer imagery is resampled to, and the factor ``k`` beyond which coarser imagery is refused).
For a file of GSD ``g`` (from its georeferencing, or stated by the caller when the file has none),
:func:`plan_resolution` decides, each boundary with a relative tolerance of :data:`TOLERANCE`:

==========================  ========================================  =================================
``g``                       ``resample=auto`` (default)               ``resample=off``
==========================  ========================================  =================================
unknown                     read as it is, warning                    read as it is, warning
``g < lo``                  resampled to ``t`` (``f = t / g``)        read as it is, warning
``lo <= g <= hi``           read as it is                             read as it is
``hi < g <= k * hi``        read as it is, warning                    read as it is, warning
``g > k * hi``              refused: :class:`ResolutionOutOfRange`    read as it is, warning
==========================  ========================================  =================================

Coarse imagery is never upsampled: interpolation adds no detail the model could use.

Resampling by ``f`` turns a ``W x H`` image into ``W' x H'`` with ``W' = max(1, round(W / f))``
(:func:`scaled_size`), so the per-axis scales ``sx = W / W'`` and ``sy = H / H'`` differ from ``f`` by
less than half a source pixel over the whole image and the model's pixel grid covers the image
exactly. Model pixel ``(i, j)`` is the average of the source area ``[i sx, (i + 1) sx) x
[j sy, (j + 1) sy)`` (:func:`source_area`), and a box ``(x1, y1, x2, y2)`` in model pixels lies at
``(x1 sx, y1 sy, x2 sx, y2 sy)`` in source pixels (:func:`to_source_boxes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.errors import InvalidParameter, ResolutionOutOfRange

TOLERANCE: Final = 0.01
"""Relative slack at every boundary of the range: a UTM grid's scale factor (0.9996 to 1.001) and the
rounding of a file's transform must not move a file across one."""
COARSER_FACTOR: Final = 2.0
"""Default ``k``: files more than this many times coarser than the range's top are refused."""
MAX_STATED_GSD_M: Final = 100_000.0
"""Largest GSD a caller may state, in metres (a whole-Earth image at 400 px is about 100 km/px)."""


class ResampleMode(StrEnum):
    """What the caller allows (``resample=`` on the API, ``--allow-any-resolution`` on the CLI)."""

    AUTO = "auto"
    """Resample finer imagery to the model's GSD, refuse far coarser imagery."""
    OFF = "off"
    """Read every file as it is, with a warning when its GSD is outside the model's range."""


class GsdSource(StrEnum):
    """Where the GSD a file was judged by comes from."""

    FILE = "file"
    """The file's georeferencing (CRS and transform, or its fitted GCPs)."""
    CALLER = "caller"
    """The caller's ``gsd=`` for a file without a GSD of its own."""


@dataclass(frozen=True, slots=True)
class GsdRange:
    """The GSDs a model was trained for, from its card's ``resolution`` section.

    Attributes:
        min_m: the finest GSD trained for, metres per pixel.
        max_m: the coarsest GSD trained for.
        resample_to_m: the GSD finer imagery is resampled to (within the range).
        max_coarser_factor: files coarser than ``max_m`` times this are refused.

    Raises:
        ValueError: the values are not positive and finite, ``resample_to_m`` is outside the range, or
            the factor is below 1.
    """

    min_m: float
    max_m: float
    resample_to_m: float
    max_coarser_factor: float = COARSER_FACTOR

    def __post_init__(self) -> None:
        values = (self.min_m, self.max_m, self.resample_to_m, self.max_coarser_factor)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"a GSD range needs positive finite values, got {values}")
        if not self.min_m <= self.resample_to_m <= self.max_m:
            raise ValueError(f"resample_to_m {self.resample_to_m} is outside [{self.min_m}, {self.max_m}]")
        if self.max_coarser_factor < 1:
            raise ValueError(f"max_coarser_factor must be at least 1, got {self.max_coarser_factor}")

    @property
    def refuse_above_m(self) -> float:
        """Files coarser than this are refused unless the caller turns resampling off."""
        return self.max_m * self.max_coarser_factor

    def describe(self) -> str:
        """``"0.3-0.6 m"``."""
        return f"{metres(self.min_m)}-{metres(self.max_m)} m"

    def to_card(self) -> dict[str, Any]:
        """The card's ``resolution`` section (see :meth:`from_card`)."""
        return {
            "gsd_m": {"min": self.min_m, "max": self.max_m},
            "resample_to_m": self.resample_to_m,
            "max_coarser_factor": self.max_coarser_factor,
        }

    @classmethod
    def from_card(cls, section: dict[str, Any]) -> GsdRange:
        """Read a card's ``resolution`` section: ``{"gsd_m": {"min", "max"}, "resample_to_m",
        "max_coarser_factor"}``; the last two default to ``min`` and :data:`COARSER_FACTOR`.

        Raises:
            KeyError, TypeError, ValueError: the section is malformed.
        """
        low = float(section["gsd_m"]["min"])
        high = float(section["gsd_m"]["max"])
        return cls(
            min_m=low,
            max_m=high,
            resample_to_m=float(section.get("resample_to_m", low)),
            max_coarser_factor=float(section.get("max_coarser_factor", COARSER_FACTOR)),
        )


@dataclass(frozen=True, slots=True)
class ResolutionRequest:
    """What a prediction asks of the reader about resolution (part of the reading options).

    Attributes:
        model: the served model's range; ``None`` when its card states none (nothing is checked).
        mode: whether finer files are resampled and far coarser ones refused.
        stated_gsd_m: the caller's GSD for files without one of their own.
    """

    model: GsdRange | None
    mode: ResampleMode = ResampleMode.AUTO
    stated_gsd_m: float | None = None

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON values (the decode workers' wire format)."""
        return {
            "model": None if self.model is None else self.model.to_card(),
            "mode": self.mode.value,
            "stated_gsd_m": self.stated_gsd_m,
        }

    @classmethod
    def from_wire(cls, values: dict[str, Any]) -> ResolutionRequest:
        """The inverse of :meth:`to_wire`."""
        model = values.get("model")
        stated = values.get("stated_gsd_m")
        return cls(
            model=None if model is None else GsdRange.from_card(model),
            mode=ResampleMode(values.get("mode", ResampleMode.AUTO)),
            stated_gsd_m=None if stated is None else float(stated),
        )


@dataclass(frozen=True, slots=True)
class ResolutionPlan:
    """How one file is read, decided by :func:`plan_resolution`.

    Attributes:
        gsd_m: the GSD the file was judged by; ``None`` when unknown.
        gsd_source: where ``gsd_m`` comes from; ``None`` when unknown.
        factor: source pixels per model pixel along each axis (nominal; 1.0 when read as it is).
        inference_gsd_m: the GSD the model sees (``gsd_m * factor``); ``None`` when unknown.
        warnings: what the user should know.
    """

    gsd_m: float | None
    gsd_source: GsdSource | None
    factor: float = 1.0
    inference_gsd_m: float | None = None
    warnings: tuple[str, ...] = ()


def plan_resolution(file_gsd_m: float | None, request: ResolutionRequest | None) -> ResolutionPlan:
    """Decide how a file of GSD ``file_gsd_m`` is read (the table in the module docstring).

    Args:
        file_gsd_m: the GSD measured from the file's georeferencing; ``None`` without one.
        request: the model's range and the caller's choices; ``None`` reads every file as it is.

    Raises:
        ResolutionOutOfRange: the GSD is more than the model's factor coarser than its range and the
            caller did not turn resampling off.
    """
    notes: list[str] = []
    gsd, source = file_gsd_m, GsdSource.FILE if file_gsd_m is not None else None
    stated = None if request is None else request.stated_gsd_m
    if stated is not None:
        if gsd is None:
            gsd, source = stated, GsdSource.CALLER
        elif abs(stated - gsd) > 0.1 * gsd:
            notes.append(
                f"gsd={metres(stated)} was given, but the file's georeferencing says {metres(gsd)} m; "
                "the file's value was used."
            )
    model = None if request is None else request.model
    if model is None:
        return ResolutionPlan(gsd, source, 1.0, gsd, tuple(notes))
    if gsd is None:
        notes.append(
            f"The file's ground sample distance is unknown (no usable georeferencing); the model was "
            f"trained for {model.describe()} pixels and misses or invents objects at other scales. "
            "State it with gsd= (metres per pixel) to have the file checked and resampled."
        )
        return ResolutionPlan(None, None, 1.0, None, tuple(notes))
    off = request is not None and request.mode is ResampleMode.OFF
    if gsd < model.min_m * (1 - TOLERANCE):
        if off:
            notes.append(
                f"The file's ground sample distance ({metres(gsd)} m) is finer than the model's "
                f"{model.describe()} and resample=off: it was read as it is, so objects look larger "
                "than the model was trained on; expect missed detections."
            )
            return ResolutionPlan(gsd, source, 1.0, gsd, tuple(notes))
        factor = model.resample_to_m / gsd
        return ResolutionPlan(gsd, source, factor, model.resample_to_m, tuple(notes))
    if gsd <= model.max_m * (1 + TOLERANCE):
        return ResolutionPlan(gsd, source, 1.0, gsd, tuple(notes))
    if gsd > model.refuse_above_m * (1 + TOLERANCE):
        if not off:
            raise ResolutionOutOfRange(
                f"The file's ground sample distance is {metres(gsd)} m "
                f"({'from its georeferencing' if source is GsdSource.FILE else 'as stated by gsd='}), "
                f"more than {metres(model.max_coarser_factor)}x coarser than the {model.describe()} the "
                f"model was trained for (the limit is {metres(model.refuse_above_m)} m): at that scale "
                "its objects are a pixel or less. Send imagery of "
                f"{metres(model.refuse_above_m)} m or finer, or pass resample=off "
                "(palm-serve predict --allow-any-resolution) to run it anyway.",
                gsd_m=gsd,
                gsd_source=str(source),
                model_gsd_m={"min": model.min_m, "max": model.max_m},
                max_gsd_m=model.refuse_above_m,
            )
        notes.append(
            f"The file's ground sample distance ({metres(gsd)} m) is more than "
            f"{metres(model.max_coarser_factor)}x coarser than the model's {model.describe()}; it was "
            "read anyway (resample=off), and detections at this scale are not meaningful."
        )
        return ResolutionPlan(gsd, source, 1.0, gsd, tuple(notes))
    notes.append(
        f"The file's ground sample distance ({metres(gsd)} m) is coarser than the model's "
        f"{model.describe()}: objects are smaller than the model was trained on; expect missed "
        "detections and lower scores."
    )
    return ResolutionPlan(gsd, source, 1.0, gsd, tuple(notes))


def check_stated_gsd(value: float | None) -> float | None:
    """``value`` if it is a usable GSD in metres per pixel (or ``None``).

    Raises:
        InvalidParameter: NaN, infinite, not positive, or above :data:`MAX_STATED_GSD_M`.
    """
    if value is None:
        return None
    if not math.isfinite(value) or not 0 < value <= MAX_STATED_GSD_M:
        raise InvalidParameter(
            f"gsd must be the ground sample distance in metres per pixel, above 0 and at most "
            f"{MAX_STATED_GSD_M:,.0f}, got {value!r}",
            parameter="gsd",
        )
    return value


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """The ``(W', H')`` an image of ``width x height`` is read at when resampled by ``factor``."""
    if factor == 1.0:
        return width, height
    return max(1, round(width / factor)), max(1, round(height / factor))


@dataclass(frozen=True, slots=True)
class SourceArea:
    """A rectangle of source pixels with fractional edges: columns ``[col_off, col_off + width)``, rows
    ``[row_off, row_off + height)``."""

    col_off: float
    row_off: float
    width: float
    height: float


def source_area(
    col_off: int, row_off: int, cols: int, rows: int, source: tuple[int, int], read: tuple[int, int]
) -> SourceArea:
    """The source pixels behind model pixels ``[col_off, col_off + cols) x [row_off, row_off + rows)``.

    Args:
        col_off, row_off, cols, rows: a window of the resampled image.
        source: the image's ``(width, height)``.
        read: its resampled ``(W', H')`` (:func:`scaled_size`).

    Edges are computed as ``i * W / W'`` from integers, so the last model pixel ends exactly on the
    image's edge.
    """
    (width, height), (read_w, read_h) = source, read
    x0, x1 = col_off * width / read_w, (col_off + cols) * width / read_w
    y0, y1 = row_off * height / read_h, (row_off + rows) * height / read_h
    return SourceArea(x0, y0, x1 - x0, y1 - y0)


def to_source_boxes(
    boxes: npt.NDArray[np.float32], source: tuple[int, int], read: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """``(N, 4)`` ``x1, y1, x2, y2`` boxes in the resampled image's pixels, in source pixels."""
    (width, height), (read_w, read_h) = source, read
    if (width, height) == (read_w, read_h):
        return boxes
    scale = np.array([width / read_w, height / read_h] * 2, np.float64)
    return (boxes.astype(np.float64) * scale).astype(np.float32)


def metres(value: float) -> str:
    """A GSD for a message: three significant digits below 100 (``0.05``, ``28.5``), whole metres above."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"

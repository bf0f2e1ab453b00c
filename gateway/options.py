"""What a caller may choose per prediction, parsed and checked the same way for every entry point.

The HTTP routes and ``palm-serve predict`` hand the raw values to :meth:`PredictOptions.parse`, so a value
refused by one is refused by the other with the same message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gateway.errors import InvalidParameter
from gateway.pipeline.resolution import ResampleMode, check_stated_gsd

_ASCII_NUMBER = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True, slots=True)
class PredictOptions:
    """Per-request choices.

    Attributes:
        score_threshold: drop detections scoring below this (0 to 1).
        bands: 1-based source bands for red, green, blue, or one band read as grey; ``None`` applies the
            reading policy.
        max_pixels: refuse images with more pixels than this; ``None`` for no limit.
        resample: ``auto`` resamples imagery finer than the model's GSD range and refuses imagery far
            coarser; ``off`` reads every file as it is, with a warning when it is outside the range
            (:mod:`gateway.pipeline.resolution`).
        gsd_m: the caller's ground sample distance (metres per pixel) for files without one of their
            own.
    """

    score_threshold: float
    bands: tuple[int, ...] | None = None
    max_pixels: int | None = None
    resample: ResampleMode = ResampleMode.AUTO
    gsd_m: float | None = None

    @classmethod
    def parse(
        cls,
        *,
        score_threshold: float | None,
        bands: str | None,
        default_score_threshold: float,
        max_pixels: int | None,
        resample: str | None = None,
        gsd: float | None = None,
    ) -> PredictOptions:
        """Options from the values a user typed.

        Raises:
            InvalidParameter: a value is out of range or malformed; the detail names it.
        """
        threshold = default_score_threshold if score_threshold is None else score_threshold
        return cls(
            score_threshold=check_score_threshold(threshold),
            bands=parse_bands(bands),
            max_pixels=max_pixels,
            resample=parse_resample(resample),
            gsd_m=check_stated_gsd(gsd),
        )


def check_score_threshold(value: float) -> float:
    """``value`` if it is a number from 0 to 1.

    Raises:
        InvalidParameter: NaN, infinite, or outside ``[0, 1]``.
    """
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidParameter(
            f"score_threshold must be a number from 0 to 1, got {value!r}", parameter="score_threshold"
        )
    return value


def parse_resample(raw: str | None) -> ResampleMode:
    """``"auto"`` (the default, also for ``None``) or ``"off"``.

    Raises:
        InvalidParameter: any other value.
    """
    if raw is None:
        return ResampleMode.AUTO
    try:
        return ResampleMode(raw.strip().lower())
    except ValueError:
        raise InvalidParameter(f"resample must be auto or off, got {raw!r}", parameter="resample") from None


def parse_bands(raw: str | None) -> tuple[int, ...] | None:
    """``"3,2,1"`` → ``(3, 2, 1)``: 1-based source bands for red, green, blue (or one, read as grey).

    Only ASCII digits count (``int()`` alone would read ``1_0`` as 10 and accept other scripts' digits).

    Raises:
        InvalidParameter: not 1 or 3 comma-separated band numbers starting at 1.
    """
    if raw is None or not raw.strip():
        return None
    parts = [part.strip() for part in raw.split(",")]
    if not all(_ASCII_NUMBER.fullmatch(part) for part in parts):
        raise InvalidParameter(
            f"bands must be comma-separated band numbers like 3,2,1, got {raw!r}", parameter="bands"
        )
    bands = tuple(int(part) for part in parts)
    if len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise InvalidParameter(
            f"bands takes 1 or 3 band numbers starting at 1, got {raw!r}", parameter="bands"
        )
    return bands

"""Per-request options are parsed and checked the same way for the API and the command line."""

from __future__ import annotations

import math

import pytest

from gateway.errors import InvalidParameter
from gateway.options import PredictOptions, parse_bands
from gateway.pipeline.resolution import ResampleMode


def parse(score_threshold: float | None = None, bands: str | None = None) -> PredictOptions:
    return PredictOptions.parse(
        score_threshold=score_threshold, bands=bands, default_score_threshold=0.3, max_pixels=None
    )


@pytest.mark.parametrize("value", [5.0, -1.0, math.nan, math.inf, 1.0000001])
def test_thresholds_outside_0_to_1_are_refused_by_name(value: float) -> None:
    with pytest.raises(InvalidParameter, match="score_threshold must be a number from 0 to 1") as refused:
        parse(score_threshold=value)
    assert refused.value.extensions == {"parameter": "score_threshold"}


def test_the_default_threshold_applies_when_none_is_given() -> None:
    assert parse().score_threshold == 0.3
    assert parse(score_threshold=0.0).score_threshold == 0.0
    assert parse(score_threshold=1.0).score_threshold == 1.0


@pytest.mark.parametrize(("raw", "bands"), [("3,2,1", (3, 2, 1)), (" 4 ", (4,)), ("", None), (None, None)])
def test_bands_are_read(raw: str | None, bands: tuple[int, ...] | None) -> None:
    assert parse_bands(raw) == bands


@pytest.mark.parametrize(
    "raw", ["1_0", "\u0663,\u0662,\u0661", "3,2", "0,1,2", "a,b,c", "1,2,3,4", "+1", "1e1"]
)
def test_bands_take_one_or_three_ascii_numbers(raw: str) -> None:
    with pytest.raises(InvalidParameter, match="bands"):
        parse(bands=raw)


@pytest.mark.parametrize(
    ("raw", "mode"), [(None, ResampleMode.AUTO), ("auto", ResampleMode.AUTO), ("OFF", ResampleMode.OFF)]
)
def test_resample_is_auto_or_off(raw: str | None, mode: ResampleMode) -> None:
    options = PredictOptions.parse(
        score_threshold=None, bands=None, default_score_threshold=0.3, max_pixels=None, resample=raw, gsd=0.1
    )
    assert (options.resample, options.gsd_m) == (mode, 0.1)


def test_resample_and_gsd_are_refused_by_name() -> None:
    with pytest.raises(InvalidParameter, match="resample must be auto or off, got 'never'") as refused:
        PredictOptions.parse(
            score_threshold=None, bands=None, default_score_threshold=0.3, max_pixels=None, resample="never"
        )
    assert refused.value.extensions == {"parameter": "resample"}
    with pytest.raises(InvalidParameter, match="gsd must be") as refused:
        PredictOptions.parse(
            score_threshold=None, bands=None, default_score_threshold=0.3, max_pixels=None, gsd=-1.0
        )
    assert refused.value.extensions == {"parameter": "gsd"}

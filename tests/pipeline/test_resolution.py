"""The resolution rule and its arithmetic (pure; the reading itself is in tests/pipeline/test_raster.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.decode.protocol import options_from_wire, options_to_wire
from gateway.errors import InvalidParameter, ResolutionOutOfRange
from gateway.pipeline.raster import ReadOptions
from gateway.pipeline.resolution import (
    GsdRange,
    GsdSource,
    ResampleMode,
    ResolutionRequest,
    check_stated_gsd,
    plan_resolution,
    scaled_size,
    source_area,
    to_source_boxes,
)

PALM = GsdRange(0.3, 0.6, resample_to_m=0.3)
AUTO = ResolutionRequest(PALM)
OFF = ResolutionRequest(PALM, ResampleMode.OFF)


@pytest.mark.parametrize(
    ("gsd", "factor", "inference", "warning"),
    [
        (0.05, 6.0, 0.3, None),  # drone imagery: resampled to the finest GSD trained for
        (0.1, 3.0, 0.3, None),
        (0.25, 1.2, 0.3, None),
        (0.2985, 1.0, 0.2985, None),  # a UTM grid's scale factor: inside the range, read as it is
        (0.3, 1.0, 0.3, None),
        (0.45, 1.0, 0.45, None),
        (0.6004, 1.0, 0.6004, None),
        (0.9, 1.0, 0.9, "coarser than the model's 0.3-0.6 m"),
        (1.2, 1.0, 1.2, "coarser than the model's 0.3-0.6 m"),  # the limit itself runs, with a warning
    ],
)
def test_the_rule_by_gsd(gsd: float, factor: float, inference: float, warning: str | None) -> None:
    plan = plan_resolution(gsd, AUTO)
    assert plan.gsd_m == gsd
    assert plan.gsd_source is GsdSource.FILE
    assert plan.factor == pytest.approx(factor)
    assert plan.inference_gsd_m == pytest.approx(inference)
    if warning is None:
        assert plan.warnings == ()
    else:
        (message,) = plan.warnings
        assert warning in message


@pytest.mark.parametrize(("gsd", "named"), [(1.25, "1.25 m"), (30.0, "30 m"), (300.0, "300 m")])
def test_far_coarser_files_are_refused_naming_both_gsds(gsd: float, named: str) -> None:
    with pytest.raises(ResolutionOutOfRange) as caught:
        plan_resolution(gsd, AUTO)
    error = caught.value
    assert error.status == 422
    assert error.slug == "resolution-out-of-range"
    assert named in error.detail
    assert "0.3-0.6 m" in error.detail
    assert "resample=off" in error.detail
    assert error.extensions == {
        "gsd_m": gsd,
        "gsd_source": "file",
        "model_gsd_m": {"min": 0.3, "max": 0.6},
        "max_gsd_m": 1.2,
    }


@pytest.mark.parametrize(
    ("gsd", "warning"),
    [(0.05, "finer than the model's 0.3-0.6 m and resample=off"), (300.0, "read anyway (resample=off)")],
)
def test_resample_off_reads_every_file_as_it_is_with_a_warning(gsd: float, warning: str) -> None:
    plan = plan_resolution(gsd, OFF)
    assert (plan.factor, plan.inference_gsd_m) == (1.0, gsd)
    (message,) = plan.warnings
    assert warning in message


def test_an_unknown_gsd_warns_and_a_stated_one_drives_the_same_rule() -> None:
    unknown = plan_resolution(None, AUTO)
    assert (unknown.gsd_m, unknown.gsd_source, unknown.factor, unknown.inference_gsd_m) == (
        None,
        None,
        1.0,
        None,
    )
    (message,) = unknown.warnings
    assert "unknown" in message
    assert "gsd=" in message

    stated = plan_resolution(None, ResolutionRequest(PALM, stated_gsd_m=0.1))
    assert (stated.gsd_m, stated.gsd_source, stated.inference_gsd_m) == (0.1, GsdSource.CALLER, 0.3)
    assert stated.factor == pytest.approx(3.0)
    assert stated.warnings == ()
    with pytest.raises(ResolutionOutOfRange, match="as stated by gsd="):
        plan_resolution(None, ResolutionRequest(PALM, stated_gsd_m=30.0))


def test_a_files_own_gsd_wins_over_a_stated_one_and_a_disagreement_is_said() -> None:
    plan = plan_resolution(0.45, ResolutionRequest(PALM, stated_gsd_m=0.1))
    assert (plan.gsd_m, plan.gsd_source, plan.factor) == (0.45, GsdSource.FILE, 1.0)
    (message,) = plan.warnings
    assert "gsd=0.1 was given" in message
    assert plan_resolution(0.45, ResolutionRequest(PALM, stated_gsd_m=0.44)).warnings == ()


def test_without_a_model_range_nothing_is_resampled_or_refused() -> None:
    assert plan_resolution(300.0, None).factor == 1.0
    plan = plan_resolution(None, ResolutionRequest(None, stated_gsd_m=0.05))
    assert (plan.gsd_m, plan.gsd_source, plan.factor, plan.warnings) == (0.05, GsdSource.CALLER, 1.0, ())


@pytest.mark.parametrize(
    ("size", "factor", "expected"),
    [((3000, 2000), 3.0, (1000, 667)), ((3000, 2000), 1.0, (3000, 2000)), ((5, 2), 6.0, (1, 1))],
)
def test_scaled_size(size: tuple[int, int], factor: float, expected: tuple[int, int]) -> None:
    assert scaled_size(*size, factor) == expected


@pytest.mark.parametrize(
    ("width", "height", "factor"), [(3000, 2000, 3.0), (20_000, 7_777, 9.0), (997, 13, 1.7)]
)
def test_resampled_windows_cover_the_image_exactly(width: int, height: int, factor: float) -> None:
    read = scaled_size(width, height, factor)
    whole = source_area(0, 0, read[0], read[1], (width, height), read)
    assert (whole.col_off, whole.row_off, whole.width, whole.height) == (0.0, 0.0, width, height)
    # Neighbouring windows share their edge exactly: no source pixel is skipped or read twice.
    left = source_area(0, 0, 100, 5, (width, height), read)
    right = source_area(100, 0, read[0] - 100, 5, (width, height), read)
    assert left.col_off + left.width == right.col_off
    assert right.col_off + right.width == width
    assert left.width == pytest.approx(100 * width / read[0])


def test_boxes_go_back_to_source_pixels() -> None:
    boxes = np.array([[10, 20, 30, 40], [0, 0, 1000, 667]], np.float32)
    back = to_source_boxes(boxes, (3000, 2000), (1000, 667))
    assert back[0].tolist() == pytest.approx([30, 20 * 2000 / 667, 90, 40 * 2000 / 667])
    assert back[1].tolist() == pytest.approx([0, 0, 3000, 2000])
    assert to_source_boxes(boxes, (640, 480), (640, 480)) is boxes


def test_the_card_section_round_trips_and_is_checked() -> None:
    card = PALM.to_card()
    assert card == {"gsd_m": {"min": 0.3, "max": 0.6}, "resample_to_m": 0.3, "max_coarser_factor": 2.0}
    assert GsdRange.from_card(card) == PALM
    assert GsdRange.from_card({"gsd_m": {"min": 0.5, "max": 1.0}}) == GsdRange(0.5, 1.0, 0.5, 2.0)
    assert PALM.refuse_above_m == 1.2
    for bad in [(0.6, 0.3, 0.3), (0.3, 0.6, 0.7), (0.0, 0.6, 0.3), (0.3, math.inf, 0.3)]:
        with pytest.raises(ValueError, match=r"GSD range|resample_to_m"):
            GsdRange(*bad)
    with pytest.raises(ValueError, match="factor"):
        GsdRange(0.3, 0.6, 0.3, max_coarser_factor=0.5)


def test_the_request_crosses_to_the_decode_workers_intact() -> None:
    options = ReadOptions(bands=(3, 2, 1), resolution=ResolutionRequest(PALM, ResampleMode.OFF, 0.07))
    assert options_from_wire(options_to_wire(options)) == options
    assert options_from_wire(options_to_wire(ReadOptions())) == ReadOptions()


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf, 200_000.0])
def test_a_stated_gsd_must_be_a_positive_distance(value: float) -> None:
    with pytest.raises(InvalidParameter, match="gsd must be the ground sample distance"):
        check_stated_gsd(value)
    assert check_stated_gsd(0.05) == 0.05

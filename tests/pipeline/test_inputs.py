"""Input statistics of what the model is shown (the drift monitor's raw material)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.pipeline.inputs import InputStatistics, InputSummary


def tile(r: int, g: int, b: int) -> np.ndarray:
    pixels = np.empty((3, 512, 512), np.uint8)
    pixels[0], pixels[1], pixels[2] = r, g, b
    return pixels


def test_grey_and_colour_tiles_differ_in_colourfulness_only_where_valid() -> None:
    grey = InputStatistics()
    grey.expect(512, 512)
    grey.add(tile(90, 90, 90), None, 512, 512)
    summary = grey.summary()
    assert summary is not None
    assert summary.mean == (90.0, 90.0, 90.0)
    assert summary.spread == (0.0, 0.0, 0.0)
    assert summary.colourfulness == 0.0
    assert summary.valid_fraction == 1.0

    colour = InputStatistics()
    colour.expect(512, 512)
    valid = np.zeros((512, 512), np.bool_)
    valid[:256] = True
    colour.add(tile(100, 60, 20), valid, 512, 512)
    summary = colour.summary()
    assert summary is not None
    assert summary.colourfulness == pytest.approx((40 + 40 + 80) / 3, abs=1e-3)
    assert summary.valid_fraction == pytest.approx(0.5)


def test_masked_tiles_and_padding_count_as_they_should() -> None:
    stats = InputStatistics()
    stats.expect(512, 512)  # a tile that was never cut: every pixel masked
    stats.expect(100, 80)  # a small image's only tile: its padding is not sampled
    stats.add(tile(10, 20, 30), None, 100, 80)
    summary = stats.summary()
    assert summary is not None
    assert summary.mean == (10.0, 20.0, 30.0)
    assert summary.valid_fraction == pytest.approx((25 * 20) / (128 * 128 + 25 * 20), abs=1e-4)
    assert InputStatistics().summary() is None
    assert InputSummary.from_wire(summary.to_wire()) == summary

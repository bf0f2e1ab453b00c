"""Tile geometry: coverage, overlap, inward snapping, padding."""

from __future__ import annotations

import itertools

import pytest

from gateway.pipeline.tiling import axis_offsets, choose_overlap, tile_count, tile_grid


@pytest.mark.parametrize("length", [1, 255, 256, 300, 511, 512, 513, 900, 2048, 4099, 20_000])
@pytest.mark.parametrize(("tile", "overlap"), [(512, 0), (512, 64), (512, 128), (256, 64), (320, 80)])
def test_axis_covers_every_pixel_with_at_least_the_overlap(length: int, tile: int, overlap: int) -> None:
    offsets = axis_offsets(length, tile, overlap)
    assert offsets[0] == 0
    assert offsets == sorted(set(offsets))
    if length <= tile:
        assert offsets == [0]
        return
    assert offsets[-1] == length - tile, "last tile snaps inward to the image edge"
    for a, b in itertools.pairwise(offsets):
        assert tile - (b - a) >= overlap, "neighbours share at least the overlap"
    covered = set()
    for o in offsets:
        covered.update(range(o, o + tile))
    assert covered == set(range(length))


def test_tile_count_matches_formula() -> None:
    # 2048 px, stride 384: 1 + ceil((2048 - 512) / 384) = 5 per axis.
    assert tile_count(2048, 2048, 512, 128) == 25
    assert len(tile_grid(2048, 2048, 512, 128)) == 25
    assert tile_count(20_000, 20_000, 512, 128) == 52 * 52
    # 600 x 500 px in 256 px tiles, stride 192: 1 + ceil(344 / 192) = 3 and 1 + ceil(244 / 192) = 3.
    assert tile_count(600, 500, 256, 64) == 9


def test_every_spec_carries_the_model_tile_side() -> None:
    assert {spec.size for spec in tile_grid(600, 500, 256, 64)} == {256}
    (small,) = tile_grid(100, 80, 320, 80)
    assert (small.size, small.width, small.height) == (320, 100, 80)


@pytest.mark.parametrize(
    ("tile", "configured", "expected"), [(512, None, 128), (256, None, 64), (256, 0, 0), (256, 128, 128)]
)
def test_the_overlap_is_a_quarter_of_the_tile_unless_configured(
    tile: int, configured: int | None, expected: int
) -> None:
    assert choose_overlap(tile, configured) == expected


@pytest.mark.parametrize(("tile", "configured"), [(256, 129), (512, 300), (256, -1)])
def test_an_overlap_above_half_the_tile_is_refused_naming_the_tile(tile: int, configured: int) -> None:
    with pytest.raises(ValueError, match=f"{tile} px tile"):
        choose_overlap(tile, configured)


def test_small_image_is_one_padded_tile() -> None:
    (spec,) = tile_grid(300, 200, 512, 128)
    assert (spec.x, spec.y, spec.width, spec.height) == (0, 0, 300, 200)
    assert not (spec.interior_left)
    assert not (spec.interior_right)
    assert not (spec.interior_top)
    assert not (spec.interior_bottom)


def test_seams_are_flagged_only_inside_the_image() -> None:
    grid = tile_grid(1000, 600, 512, 128)
    corners = {(s.row, s.col): s for s in grid}
    first = corners[(0, 0)]
    assert first.interior_right
    assert first.interior_bottom
    assert not first.interior_left
    assert not first.interior_top
    last = grid[-1]
    assert last.interior_left
    assert last.interior_top
    assert not last.interior_right
    assert not last.interior_bottom
    assert last.x + last.width == 1000
    assert last.y + last.height == 600


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(0, 512, 128), (100, 512, 512), (100, 512, -1), (100, 0, 0)]
)
def test_bad_geometry_is_refused(length: int, tile: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        axis_offsets(length, tile, overlap)

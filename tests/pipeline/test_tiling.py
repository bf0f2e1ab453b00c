"""Tile geometry: coverage, overlap, inward snapping, padding."""

from __future__ import annotations

import itertools

import pytest

from gateway.pipeline.tiling import axis_offsets, tile_count, tile_grid


@pytest.mark.parametrize("length", [1, 300, 511, 512, 513, 900, 2048, 4099, 20_000])
@pytest.mark.parametrize("overlap", [0, 64, 128])
def test_axis_covers_every_pixel_with_at_least_the_overlap(length: int, overlap: int) -> None:
    offsets = axis_offsets(length, 512, overlap)
    assert offsets[0] == 0
    assert offsets == sorted(set(offsets))
    if length <= 512:
        assert offsets == [0]
        return
    assert offsets[-1] == length - 512, "last tile snaps inward to the image edge"
    for a, b in itertools.pairwise(offsets):
        assert 512 - (b - a) >= overlap, "neighbours share at least the overlap"
    covered = set()
    for o in offsets:
        covered.update(range(o, o + 512))
    assert covered == set(range(length))


def test_tile_count_matches_formula() -> None:
    # 2048 px, stride 384: 1 + ceil((2048 - 512) / 384) = 5 per axis.
    assert tile_count(2048, 2048) == 25
    assert len(tile_grid(2048, 2048)) == 25
    assert tile_count(20_000, 20_000, overlap=128) == 52 * 52


def test_small_image_is_one_padded_tile() -> None:
    (spec,) = tile_grid(300, 200)
    assert (spec.x, spec.y, spec.width, spec.height) == (0, 0, 300, 200)
    assert not (spec.interior_left)
    assert not (spec.interior_right)
    assert not (spec.interior_top)
    assert not (spec.interior_bottom)


def test_seams_are_flagged_only_inside_the_image() -> None:
    grid = tile_grid(1000, 600)
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


@pytest.mark.parametrize(("length", "overlap"), [(0, 128), (100, 512), (100, -1)])
def test_bad_geometry_is_refused(length: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        axis_offsets(length, 512, overlap)

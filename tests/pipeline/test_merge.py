"""Seam merge: padding and masks, truncated fragments, class-aware NMS."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.pipeline.merge import Candidates, Detections, merge_candidates, merge_tiles, tile_candidates
from gateway.pipeline.tiling import tile_grid

K = 2048


def rows(*dets: tuple[float, float, float, float, float, int]) -> np.ndarray:
    out = np.zeros((K, 6), np.float32)
    for i, d in enumerate(dets):
        out[i] = d
    return out


def test_padding_rows_and_low_scores_are_dropped() -> None:
    (spec,) = tile_grid(512, 512, 512, 128)
    cand = tile_candidates(rows((10, 10, 30, 30, 0.9, 1), (50, 50, 70, 70, 0.2, 2)), spec, 0.3)
    assert len(cand.detections) == 1
    assert cand.detections.class_ids.tolist() == [1]


def test_boxes_centred_in_padding_or_masked_pixels_are_dropped() -> None:
    (spec,) = tile_grid(300, 300, 512, 128)
    valid = np.zeros((512, 512), bool)
    valid[:300, :300] = True
    valid[:, :100] = False  # nodata strip
    raw = rows(
        (290, 10, 330, 40, 0.9, 1),  # centre x=310: padding
        (20, 20, 60, 60, 0.9, 1),  # centre x=40: nodata
        (150, 150, 190, 190, 0.9, 2),  # valid
        (280, 280, 320, 320, 0.8, 1),  # centre 300: padding edge
    )
    cand = tile_candidates(raw, spec, 0.3, valid)
    assert cand.detections.boxes.tolist() == [[150, 150, 190, 190]]


def test_duplicate_across_a_seam_is_kept_once_in_image_coordinates() -> None:
    grid = tile_grid(900, 512, 512, 128)  # tiles at x=0, 384, 388
    a, b = grid[0], grid[1]
    # One palm at image x 400..440: whole in both tiles.
    merged = merge_tiles(
        [
            (a, rows((400, 100, 440, 140, 0.9, 1)), None),
            (b, rows((16, 100, 56, 140, 0.8, 1)), None),
        ],
        score_threshold=0.3,
    )
    assert len(merged) == 1
    assert merged.boxes[0].tolist() == [400, 100, 440, 140]
    assert merged.scores.tolist() == [np.float32(0.9)]


def test_truncated_fragment_loses_to_the_whole_copy_even_with_a_higher_score() -> None:
    grid = tile_grid(1500, 512, 512, 128)
    a, b = grid[0], grid[1]  # a covers 0..512, b covers 384..896
    # Building at image x 480..600 (120 px): tile a sees it cut at its right seam (480..512).
    fragment = rows((480, 200, 512, 260, 0.95, 2))
    whole = rows((480 - 384, 200, 600 - 384, 260, 0.7, 2))
    merged = merge_tiles([(a, fragment, None), (b, whole, None)], score_threshold=0.3)
    assert merged.boxes.tolist() == [[480, 200, 600, 260]]


def test_different_classes_never_suppress_each_other() -> None:
    (spec,) = tile_grid(512, 512, 512, 128)
    merged = merge_tiles(
        [(spec, rows((100, 100, 200, 200, 0.9, 2), (105, 105, 195, 195, 0.8, 1)), None)],
        score_threshold=0.3,
    )
    assert sorted(merged.class_ids.tolist()) == [1, 2]


def test_touching_neighbours_in_a_plantation_survive() -> None:
    (spec,) = tile_grid(512, 512, 512, 128)
    dets = [(x, 100, x + 30, 130, 0.9 - x / 10_000, 1) for x in range(0, 480, 25)]  # 5 px overlap
    merged = merge_tiles([(spec, rows(*dets), None)], score_threshold=0.3)
    assert len(merged) == len(dets)
    assert np.all(np.diff(merged.scores) <= 0), "score-sorted"


def test_merge_is_linear_enough_for_a_large_scene() -> None:
    rng = np.random.default_rng(0)
    grid = tile_grid(8192, 8192, 512, 128)
    parts = []
    for spec in grid:
        xy = rng.uniform(0, 480, size=(200, 2)).astype(np.float32)
        raw = np.zeros((K, 6), np.float32)
        raw[:200, 0:2] = xy
        raw[:200, 2:4] = xy + 20
        raw[:200, 4] = rng.uniform(0.3, 1, 200)
        raw[:200, 5] = 1
        parts.append(tile_candidates(raw, spec, 0.3))
    merged = merge_candidates(parts)
    assert 0 < len(merged) <= 200 * len(grid)


def naive_greedy(cands: Candidates, iou: float = 0.5, fragment_ios: float = 0.6) -> set[tuple[float, ...]]:
    """The textbook O(n^2) greedy the merge must reproduce: whole boxes first, then by score."""
    det = cands.detections
    order = np.lexsort((-det.scores, cands.truncated))
    kept: list[int] = []
    for i in order:
        b = det.boxes[i]
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        suppressed = False
        for k in kept:
            if det.class_ids[k] != det.class_ids[i]:
                continue
            o = det.boxes[k]
            inter = max(0.0, min(b[2], o[2]) - max(b[0], o[0])) * max(0.0, min(b[3], o[3]) - max(b[1], o[1]))
            union = area_b + (o[2] - o[0]) * (o[3] - o[1]) - inter
            if inter > iou * union or (cands.truncated[i] and inter > fragment_ios * area_b):
                suppressed = True
                break
        if not suppressed:
            kept.append(int(i))
    return {(*det.boxes[k].tolist(), float(det.scores[k]), int(det.class_ids[k])) for k in kept}


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_merge_equals_the_textbook_greedy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 600
    xy = rng.uniform(0, 700, (n, 2)).astype(np.float32)
    size = rng.choice([8.0, 20.0, 60.0, 150.0], size=(n, 1)).astype(np.float32)
    jitter = rng.uniform(0.8, 1.2, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + size * jitter], axis=1)
    cands = Candidates(
        Detections(boxes, rng.uniform(0.3, 1, n).astype(np.float32), rng.integers(1, 3, n).astype(np.int32)),
        rng.random(n) < 0.3,
    )
    merged = merge_candidates([cands])
    got = {
        (*merged.boxes[k].tolist(), float(merged.scores[k]), int(merged.class_ids[k]))
        for k in range(len(merged))
    }
    assert got == naive_greedy(cands)

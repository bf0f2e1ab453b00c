"""Where boxes are merged: per-tile model output to one set of detections in image coordinates.

Rules, applied in this order (the evaluation CLI in ``export/`` uses these same functions):

1. **Per tile** (:func:`tile_candidates`): rows scoring below the threshold are dropped (the model pads
   its fixed ``K`` rows with zero scores); a box counts only if its centre pixel is valid, i.e. inside
   the image (not padding) and not masked by nodata/alpha; boxes are clipped to the tile's window and
   shifted to image coordinates. A box within ``edge_px`` of a seam (a tile edge shared with a
   neighbour) is flagged *truncated*: the object may continue in the next tile.
2. **Across seams** (:func:`merge_candidates`): greedy class-aware NMS in image coordinates, visiting
   whole boxes before truncated ones and each group by descending score. A box is suppressed when its
   IoU with a kept box of the same class exceeds ``iou``, or, for a truncated box, when more than
   ``fragment_ios`` of its own area lies inside a kept box of the same class (it is a fragment of an
   object that a neighbouring tile saw whole). Tiles overlap by more than the largest object, so every
   object has a whole copy somewhere.

Only same-class boxes sharing a cell of a uniform ``cell``-pixel grid are compared, all at once with
numpy, and the greedy order is resolved over the few boxes that conflict, so merging a 20,000 px
scene with a hundred thousand boxes stays linear in the number of boxes and takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.pipeline.tiling import TileSpec

DEFAULT_IOU = 0.5
DEFAULT_FRAGMENT_IOS = 0.6
EDGE_PX = 2.0

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Detections:
    """Boxes in image pixels: ``boxes`` is ``(N, 4)`` as ``x1, y1, x2, y2``; score-sorted after a merge."""

    boxes: FloatArray
    scores: FloatArray
    class_ids: IntArray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))


@dataclass(frozen=True, slots=True)
class Candidates:
    """Detections from one tile, in image pixels, with their seam-truncation flags."""

    detections: Detections
    truncated: BoolArray


def tile_candidates(
    raw: npt.NDArray[np.floating],
    spec: TileSpec,
    score_threshold: float,
    valid: npt.NDArray[np.bool_] | None = None,
    edge_px: float = EDGE_PX,
) -> Candidates:
    """Turn one tile's model output ``(K, 6)`` into image-space candidates (rule 1).

    Args:
        raw: rows of ``x1, y1, x2, y2, score, class_id`` in tile pixels, as the model returns them.
        spec: the tile's window in the image.
        score_threshold: rows scoring below this are dropped.
        valid: optional ``(tile, tile)`` mask of valid pixels (False for nodata/alpha/padding).
        edge_px: distance to a seam under which a box counts as truncated.
    """
    raw = np.asarray(raw, dtype=np.float32)
    keep = raw[:, 4] >= max(float(score_threshold), float(np.finfo(np.float32).tiny))
    rows = raw[keep]
    cx = (rows[:, 0] + rows[:, 2]) * 0.5
    cy = (rows[:, 1] + rows[:, 3]) * 0.5
    inside = (cx >= 0) & (cy >= 0) & (cx < spec.width) & (cy < spec.height)
    rows, cx, cy = rows[inside], cx[inside], cy[inside]
    if valid is not None and rows.shape[0]:
        ix = np.clip(cx.astype(np.int64), 0, valid.shape[1] - 1)
        iy = np.clip(cy.astype(np.int64), 0, valid.shape[0] - 1)
        rows = rows[valid[iy, ix]]
    boxes = np.empty((rows.shape[0], 4), np.float32)
    boxes[:, 0] = np.clip(rows[:, 0], 0, spec.width)
    boxes[:, 1] = np.clip(rows[:, 1], 0, spec.height)
    boxes[:, 2] = np.clip(rows[:, 2], 0, spec.width)
    boxes[:, 3] = np.clip(rows[:, 3], 0, spec.height)
    truncated = np.zeros(rows.shape[0], np.bool_)
    if spec.interior_left:
        truncated |= boxes[:, 0] <= edge_px
    if spec.interior_top:
        truncated |= boxes[:, 1] <= edge_px
    if spec.interior_right:
        truncated |= boxes[:, 2] >= spec.width - edge_px
    if spec.interior_bottom:
        truncated |= boxes[:, 3] >= spec.height - edge_px
    boxes += np.array([spec.x, spec.y, spec.x, spec.y], np.float32)
    return Candidates(
        Detections(boxes, rows[:, 4].copy(), rows[:, 5].astype(np.int32)),
        truncated,
    )


def merge_candidates(
    tiles: Iterable[Candidates],
    iou: float = DEFAULT_IOU,
    fragment_ios: float = DEFAULT_FRAGMENT_IOS,
    cell: int = 64,
) -> Detections:
    """Merge candidates from all tiles of one image (rule 2); the result is score-sorted."""
    parts = list(tiles)
    if not parts:
        return Detections.empty()
    boxes = np.concatenate([p.detections.boxes for p in parts]).astype(np.float32, copy=False)
    scores = np.concatenate([p.detections.scores for p in parts])
    classes = np.concatenate([p.detections.class_ids for p in parts])
    truncated = np.concatenate([p.truncated for p in parts])
    if boxes.shape[0] == 0:
        return Detections.empty()
    order = np.lexsort((-scores, truncated))
    keep = _greedy_suppress(boxes, classes, truncated, order, iou, fragment_ios, cell)
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return Detections(boxes[kept], scores[kept], classes[kept])


def _greedy_suppress(
    boxes: FloatArray,
    classes: IntArray,
    truncated: BoolArray,
    order: npt.NDArray[np.int64],
    iou: float,
    fragment_ios: float,
    cell: int,
) -> BoolArray:
    """Greedy NMS with the result of visiting boxes in ``order``, computed on conflicting pairs only.

    Only same-class boxes that share a ``cell``-pixel grid cell can overlap; for those pairs the
    suppression test runs vectorised, oriented from the earlier box in ``order`` to the later one. A box
    is then dropped exactly when one of the earlier boxes that would suppress it is itself kept, which
    is resolved in visiting order over the (few) boxes that have such an edge.
    """
    n = boxes.shape[0]
    keep = np.ones(n, np.bool_)
    first, second = _pairs_sharing_a_cell(boxes, classes, cell)
    if first.size == 0:
        return keep
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    swap = rank[first] > rank[second]
    a = np.where(swap, second, first)
    b = np.where(swap, first, second)
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    iw = np.minimum(boxes[a, 2], boxes[b, 2]) - np.maximum(boxes[a, 0], boxes[b, 0])
    ih = np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    union = np.maximum(areas[a] + areas[b] - inter, 1e-9)
    fragment = truncated[b] & (inter > fragment_ios * np.maximum(areas[b], 1e-9))
    edge = (inter > iou * union) | fragment
    a, b = a[edge], b[edge]
    if a.size == 0:
        return keep
    by_target = np.argsort(rank[b], kind="stable")
    a, b = a[by_target], b[by_target]
    bounds = np.flatnonzero(np.diff(b)) + 1
    for sources, target in zip(np.split(a, bounds), b[np.r_[0, bounds]], strict=True):
        if keep[sources].any():
            keep[target] = False
    return keep


def _pairs_sharing_a_cell(
    boxes: FloatArray, classes: IntArray, cell: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Unique index pairs ``(i, j)``, ``i < j``, of same-class boxes that touch a common grid cell."""
    lo = np.floor(np.maximum(boxes[:, :2], 0) / cell).astype(np.int64)
    hi = np.floor(np.maximum(boxes[:, 2:], 0) / cell).astype(np.int64)
    span = hi - lo + 1
    count = span[:, 0] * span[:, 1]
    member = np.repeat(np.arange(boxes.shape[0]), count)
    local = np.arange(member.size) - np.repeat(np.cumsum(count) - count, count)
    gx = lo[member, 0] + local % span[member, 0]
    gy = lo[member, 1] + local // span[member, 0]
    key = (classes[member].astype(np.int64) << 42) | (gy << 21) | gx
    sort = np.argsort(key, kind="stable")
    member, key = member[sort], key[sort]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    sizes = np.diff(np.r_[starts, key.size])
    group_end = np.repeat(starts + sizes, sizes)
    later = group_end - np.arange(key.size) - 1  # members after each one in its cell
    total = int(later.sum())
    if total == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    left = np.repeat(np.arange(key.size), later)
    right = left + 1 + np.arange(total) - np.repeat(np.cumsum(later) - later, later)
    i, j = member[left], member[right]
    pair = np.unique(np.minimum(i, j) * boxes.shape[0] + np.maximum(i, j))
    return pair // boxes.shape[0], pair % boxes.shape[0]


def merge_tiles(
    outputs: Iterable[tuple[TileSpec, npt.NDArray[np.floating], npt.NDArray[np.bool_] | None]],
    score_threshold: float,
    iou: float = DEFAULT_IOU,
    fragment_ios: float = DEFAULT_FRAGMENT_IOS,
) -> Detections:
    """Rules 1 and 2 in one call: ``(spec, raw, valid)`` per tile to merged image detections."""
    return merge_candidates(
        (tile_candidates(raw, spec, score_threshold, valid) for spec, raw, valid in outputs),
        iou=iou,
        fragment_ios=fragment_ios,
    )

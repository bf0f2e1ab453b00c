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

Candidate lookup uses a uniform grid of ``cell`` pixels so merging a 20,000 px scene stays linear in
the number of boxes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
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
    cell: int = 256,
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
    kept = np.asarray(keep, dtype=np.int64)
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return Detections(boxes[kept], scores[kept], classes[kept])


def _greedy_suppress(
    boxes: FloatArray,
    classes: IntArray,
    truncated: BoolArray,
    order: Sequence[int] | npt.NDArray[np.int64],
    iou: float,
    fragment_ios: float,
    cell: int,
) -> list[int]:
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    cells = (boxes // cell).astype(np.int64)
    grid: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    keep: list[int] = []
    for i in (int(k) for k in order):
        cx0, cy0, cx1, cy1 = cells[i]
        cls = int(classes[i])
        near: set[int] = set()
        for gy in range(cy0, cy1 + 1):
            for gx in range(cx0, cx1 + 1):
                near.update(grid.get((cls, gx, gy), ()))
        if near and _suppressed(i, np.fromiter(near, np.int64), boxes, areas, truncated, iou, fragment_ios):
            continue
        keep.append(i)
        for gy in range(cy0, cy1 + 1):
            for gx in range(cx0, cx1 + 1):
                grid[(cls, gx, gy)].append(i)
    return keep


def _suppressed(
    i: int,
    others: npt.NDArray[np.int64],
    boxes: FloatArray,
    areas: FloatArray,
    truncated: BoolArray,
    iou: float,
    fragment_ios: float,
) -> bool:
    b = boxes[i]
    o = boxes[others]
    iw = np.minimum(b[2], o[:, 2]) - np.maximum(b[0], o[:, 0])
    ih = np.minimum(b[3], o[:, 3]) - np.maximum(b[1], o[:, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    union = areas[i] + areas[others] - inter
    if np.any(inter > iou * np.maximum(union, 1e-9)):
        return True
    return bool(truncated[i]) and bool(np.any(inter > fragment_ios * max(float(areas[i]), 1e-9)))


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

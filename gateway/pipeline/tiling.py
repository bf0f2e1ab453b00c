"""Where a tile is cut: pure geometry over image sizes, no I/O.

The model sees fixed ``tile x tile`` squares. Along one axis of length ``L`` with tile ``T`` and overlap
``O`` (stride ``S = T - O``):

* ``L <= T``: one tile at 0; the model input is padded past ``L`` and the padding is masked.
* ``L > T``: ``n = 1 + ceil((L - T) / S)`` tiles at ``0, S, 2S, ...``; the last one is *snapped inward*
  to ``L - T`` so that every tile has the model's shape and no tile reads past the image. The snapped
  tile overlaps its neighbour by at least ``O`` pixels, never less, so any object up to ``O`` pixels
  wide lies whole inside at least one tile.

The 2-D grid is the product of both axes, in row-major order.

``T`` is the served model's tile side (:attr:`~gateway.pipeline.contract.ModelContract.tile_size`);
nothing here assumes one. ``O`` defaults to ``T / 4`` (:func:`default_overlap`: 128 px at 512, 64 px at
256), so the largest object seen whole scales with the tile; ``PALM_TILING__OVERLAP`` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def default_overlap(tile: int) -> int:
    """The overlap used unless configured: a quarter of the tile side."""
    return tile // 4


def choose_overlap(tile: int, configured: int | None) -> int:
    """The overlap to cut ``tile`` px tiles with: ``configured``, or :func:`default_overlap`.

    Raises:
        ValueError: ``configured`` is negative or above half the tile (a tile would then share more
            with its neighbours than it adds).
    """
    overlap = default_overlap(tile) if configured is None else configured
    if not 0 <= overlap * 2 <= tile:
        raise ValueError(
            f"PALM_TILING__OVERLAP={overlap} must be between 0 and half the model's {tile} px tile "
            f"({tile // 2}); unset, it is a quarter of the tile ({default_overlap(tile)})"
        )
    return overlap


@dataclass(frozen=True, slots=True)
class TileSpec:
    """One model input: the image window ``[x, x + width) x [y, y + height)``.

    The window sits at the top-left of the model's square input of side ``size``; ``width``/``height``
    are below ``size`` only when the image itself is smaller than a tile (the rest is padding).
    ``interior_*`` flags say which window edges are seams shared with a neighbouring tile rather than the
    image border; a box touching a seam may be a truncated object.
    """

    index: int
    row: int
    col: int
    x: int
    y: int
    width: int
    height: int
    interior_left: bool
    interior_top: bool
    interior_right: bool
    interior_bottom: bool
    size: int


def axis_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis (see the module docstring for the formula).

    Raises:
        ValueError: if ``length`` or ``tile`` is not positive, or the overlap is not in ``[0, tile)``.
    """
    if length <= 0:
        raise ValueError(f"axis length must be positive, got {length}")
    if tile <= 0:
        raise ValueError(f"tile side must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = 1 + math.ceil((length - tile) / stride)
    return [min(i * stride, length - tile) for i in range(count)]


def tile_count(width: int, height: int, tile: int, overlap: int) -> int:
    """How many tiles :func:`tile_grid` yields, without building them."""
    return len(axis_offsets(width, tile, overlap)) * len(axis_offsets(height, tile, overlap))


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[TileSpec]:
    """All ``tile x tile`` tiles covering a ``width x height`` image, row-major."""
    xs = axis_offsets(width, tile, overlap)
    ys = axis_offsets(height, tile, overlap)
    specs: list[TileSpec] = []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            w = min(tile, width - x)
            h = min(tile, height - y)
            specs.append(
                TileSpec(
                    index=len(specs),
                    row=r,
                    col=c,
                    x=x,
                    y=y,
                    width=w,
                    height=h,
                    interior_left=c > 0,
                    interior_top=r > 0,
                    interior_right=c < len(xs) - 1,
                    interior_bottom=r < len(ys) - 1,
                    size=tile,
                )
            )
    return specs


def balanced_batch(tiles: int, limit: int) -> int:
    """The batch size that splits ``tiles`` into the fewest batches of near-equal size.

    ``ceil(tiles / ceil(tiles / limit))``: 25 tiles at a limit of 8 go as 7+7+7+4 rather than 8+8+8+1,
    the same number of calls, and no call pays a whole batch's fixed cost for one tile.
    """
    if tiles <= 0:
        return max(1, limit)
    batches = math.ceil(tiles / limit)
    return math.ceil(tiles / batches)

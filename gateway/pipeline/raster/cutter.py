"""Where tiles are cut: a rolling buffer of decoded rows, pure numpy.

Reading is block-aligned and streaming: :class:`TileCutter` reads horizontal bands of rows whose height
is a multiple of the file's block (tile or strip) height, converts them to uint8 RGB once, and keeps a
rolling buffer of at most ``tile + 2 x band height`` rows, so each block is decoded once even though
neighbouring tiles overlap, and memory is about ``4 x width x (tile + 2 x band height)`` bytes whatever
the image height. The tile side is the model's (each :class:`~gateway.pipeline.tiling.TileSpec` carries
it as ``size``). Striped files are read strip by strip, without re-encoding. Tiles with no valid pixel
are skipped and counted in :attr:`TileCutter.skipped`, never yielded.

The cutter reads through a :class:`BlockSource` (the reader, in production), so nothing here opens a
file or imports rasterio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from gateway.pipeline.raster.policy import BandPlan, BoolArray, Samples, UInt8Array, Window, by_band
from gateway.pipeline.tiling import TileSpec

CONVERT_CHUNK_BYTES: Final = 32 * 1024**2
"""Largest source-dtype array read at once before conversion to uint8."""
ROWS_PER_READ: Final = 256
"""Target height of one read: a multiple of the block height close to this."""
TALL_BLOCK_ROWS: Final = 512
"""Rows per read for blocks taller than two of these (read in several steps from GDAL's cache)."""


@dataclass(frozen=True, slots=True)
class Tile:
    """One model input.

    Attributes:
        spec: the image window this tile covers.
        pixels: ``(3, S, S)`` uint8 RGB, channel-first (``S`` = ``spec.size``); invalid pixels and
            padding are 0.
        valid: ``(S, S)`` bool, False for padding/nodata/alpha/masked pixels; ``None`` when every
            pixel is valid.
    """

    spec: TileSpec
    pixels: UInt8Array
    valid: BoolArray | None


class BlockSource(Protocol):
    """What :class:`TileCutter` reads: windows of source bands, and the file's stored mask."""

    def read(
        self, bands: Sequence[int], window: Window, out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        """Samples of the 1-based ``bands`` in ``window``, ``(len(bands), height, width)``.

        Args:
            bands: 1-based band numbers.
            window: the pixels to read.
            out: an array of that shape to read into (and return) instead of a new one.
        """
        ...

    def read_mask(self, band: int, window: Window) -> npt.NDArray[Any]:
        """The stored mask of ``band`` in ``window``, ``(height, width)``, 0 where invalid."""
        ...


def read_step(block_height: int) -> int:
    """Rows per read: a multiple of the block height near :data:`ROWS_PER_READ`, or
    :data:`TALL_BLOCK_ROWS` for blocks taller than two of those (then read in several steps from GDAL's
    cache)."""
    if block_height > 2 * TALL_BLOCK_ROWS:
        return TALL_BLOCK_ROWS
    return block_height * max(1, ROWS_PER_READ // block_height)


class TileCutter:
    """Cuts tiles out of an image through a rolling row buffer (see the module docstring).

    A ring: image row ``r`` lives at buffer row ``r % capacity``, so dropping rows that no later tile
    needs costs nothing (no memmove); a tile whose rows wrap around the ring is copied in two parts.

    Args:
        source: where windows of the image are read.
        plan: how source samples become uint8 RGB and validity.
        width: the image's pixels per row.
        height: the image's rows.
        specs: the tiles to cut (at least one, all of one ``size``), from
            :func:`~gateway.pipeline.tiling.tile_grid`.

    Raises:
        ValueError: ``specs`` is empty, mixes tile sizes, or holds a window outside the image or larger
            than its tile.
    """

    def __init__(
        self, source: BlockSource, plan: BandPlan, width: int, height: int, specs: Sequence[TileSpec]
    ) -> None:
        if not specs:
            raise ValueError("no tiles to cut")
        sizes = {spec.size for spec in specs}
        if len(sizes) != 1:
            raise ValueError(f"tiles of one image share one size, got sizes {sorted(sizes)}")
        (self._size,) = sizes
        for spec in specs:
            inside = (
                spec.x >= 0
                and spec.y >= 0
                and spec.x + spec.width <= width
                and spec.y + spec.height <= height
            )
            if not (inside and 0 < spec.width <= spec.size and 0 < spec.height <= spec.size):
                raise ValueError(f"tile window outside the image or larger than a tile: {spec}")
        self.skipped = 0
        """Tiles skipped so far by :meth:`tiles` because none of their pixels is valid."""
        self._source = source
        self._plan = plan
        layout = self._layout = plan.layout
        self._height = height
        self._specs = sorted(specs, key=lambda s: (s.y, s.x, s.index))
        block_h, block_w = layout.block_shape
        # Reads span the union of the requested columns, widened to block edges.
        x0 = min(s.x for s in self._specs)
        x1 = max(s.x + s.width for s in self._specs)
        self._x0 = (x0 // block_w) * block_w if block_w <= width else 0
        self._x1 = min(width, math.ceil(x1 / block_w) * block_w)
        self._step = read_step(block_h)
        tallest = max(s.height for s in self._specs)
        # Rows held: from the start of the read band holding a tile's top to the end of the one holding
        # its bottom, i.e. fewer than tallest + 2 x step; a multiple of step keeps every read unwrapped.
        self._capacity = min(height, math.ceil((tallest + 2 * self._step) / self._step) * self._step)
        buffer_width = self._x1 - self._x0
        self._pixels = np.zeros((layout.channels, self._capacity, buffer_width), np.uint8)
        self._valid: BoolArray | None = (
            np.ones((self._capacity, buffer_width), np.bool_) if layout.can_mask else None
        )
        self._top = 0  # first image row held
        self._bottom = 0  # one past the last image row held
        per_column = self._step * len(layout.read_bands) * layout.dtype.itemsize
        columns = max(block_w, (CONVERT_CHUNK_BYTES // max(per_column, 1)) // block_w * block_w)
        self._chunk_cols = buffer_width if layout.direct else min(buffer_width, columns)
        self._direct_bands = layout.band_map[: layout.channels]

    def tiles(self) -> Iterator[Tile]:
        """The tiles, in row-major order of their windows; call once.

        Tiles without any valid pixel are skipped and counted in :attr:`skipped`. What the source
        raises for a window it cannot read propagates.
        """
        for spec in self._specs:
            self._hold(spec.y, spec.y + spec.height)
            tile = self._cut(spec)
            if tile is None:
                self.skipped += 1
            else:
                yield tile

    def _hold(self, y0: int, y1: int) -> None:
        """Make the buffer hold image rows ``[y0, y1)``, dropping rows above ``y0``'s read band."""
        start = (y0 // self._step) * self._step
        if start >= self._bottom:
            self._top = self._bottom = start
        else:
            self._top = max(self._top, start)
        while self._bottom < y1:
            end = min(self._height, self._bottom + self._step)
            self._fill(self._bottom, end)
            self._bottom = end
        assert self._bottom - self._top <= self._capacity

    def _ring(self, y: int, height: int) -> list[tuple[slice, slice]]:
        """``(tile rows, buffer rows)`` pairs covering image rows ``[y, y + height)``."""
        r = y % self._capacity
        first = min(height, self._capacity - r)
        parts = [(slice(0, first), slice(r, r + first))]
        if first < height:
            parts.append((slice(first, height), slice(0, height - first)))
        return parts

    def _fill(self, y0: int, y1: int) -> None:
        """Decode image rows ``[y0, y1)`` into the buffer (block-aligned, column chunk by chunk)."""
        layout, source = self._layout, self._source
        ((_, rows),) = self._ring(y0, y1 - y0)  # reads start on multiples of step: never wrapped
        for c0 in range(self._x0, self._x1, self._chunk_cols):
            c1 = min(self._x1, c0 + self._chunk_cols)
            window = Window(c0, y0, c1 - c0, y1 - y0)
            out = self._pixels[:, rows, c0 - self._x0 : c1 - self._x0]
            if layout.direct:
                source.read(self._direct_bands, window, out=out)
                samples: Samples = {b: out[layout.band_map.index(b)] for b in layout.colour_bands}
                if layout.alpha_band is not None:
                    samples[layout.alpha_band] = source.read((layout.alpha_band,), window)[0]
            else:
                samples = by_band(source.read(layout.read_bands, window), layout.read_bands)
                self._plan.convert(samples, out)
            if self._valid is None:
                continue
            mask = source.read_mask(layout.colour_bands[0], window) if layout.internal_mask else None
            valid = layout.validity(samples, mask)
            target = self._valid[rows, c0 - self._x0 : c1 - self._x0]
            if valid is None:
                target[...] = True
            else:
                target[...] = valid
                out[:, ~valid] = 0

    def _cut(self, spec: TileSpec) -> Tile | None:
        cols = slice(spec.x - self._x0, spec.x - self._x0 + spec.width)
        parts = self._ring(spec.y, spec.height)
        side = self._size
        padded = spec.width < side or spec.height < side
        valid: BoolArray | None = None
        if self._valid is not None or padded:
            valid = np.zeros((side, side), np.bool_)
            for tile_rows, buffer_rows in parts:
                valid[tile_rows, : spec.width] = (
                    True if self._valid is None else self._valid[buffer_rows, cols]
                )
            window_valid = valid[: spec.height, : spec.width]
            if not window_valid.any():
                return None
            if not padded and window_valid.all():
                valid = None
        pixels = np.zeros((3, side, side), np.uint8) if padded else np.empty((3, side, side), np.uint8)
        for tile_rows, buffer_rows in parts:
            pixels[:, tile_rows, : spec.width] = self._pixels[:, buffer_rows, cols]
        return Tile(spec, pixels, valid)

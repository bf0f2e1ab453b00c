"""A quicklook: the whole image, decimated to at most ``max_side`` pixels a side, as an RGBA PNG.

The pixels go through the file's :class:`~gateway.pipeline.raster.policy.BandPlan`, as tiles do (same
bands, scaling and validity), read at a decimated shape: GDAL serves it from an internal overview where
the file has one, by nearest neighbour otherwise, so a quicklook never decodes the image at full size
into memory. Alpha is 255 where a pixel is valid and 0 where it is not (nodata, alpha 0, masked).

The PNG is written here with zlib (one ``IDAT``, the *Up* filter on every row): the decode workers need
no imaging library for it. Deflate runs with zlib's run-length strategy: a job paints one quicklook per
file in the decode worker that cuts its tiles, and on imagery this is several times faster than
zlib's default level 6 for files no larger (docs/performance.md, Bulk jobs). A quicklook of ``rows`` x
``cols`` is at most :func:`png_max_bytes` long.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from gateway.pipeline.raster.policy import BandPlan, UInt8Array, Window, by_band
from gateway.pipeline.tiling import TileSpec

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
MAX_SIDE: Final = 4096
"""The largest quicklook side a decode worker renders, whatever it is asked."""


class ShapedSource(Protocol):
    """What a quicklook reads: windows of bands and the stored mask, resampled to a shape."""

    def read(
        self,
        bands: Sequence[int],
        window: Window,
        out: npt.NDArray[Any] | None = None,
        *,
        shape: tuple[int, int] | None = None,
    ) -> npt.NDArray[Any]: ...

    def read_mask(
        self, band: int, window: Window, *, shape: tuple[int, int] | None = None
    ) -> npt.NDArray[Any]: ...


def capped_side(max_side: int) -> int:
    """The longest side a decode worker renders when asked for ``max_side``: 1 to :data:`MAX_SIDE`."""
    return min(max(1, max_side), MAX_SIDE)


def quicklook_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(rows, cols)`` of the quicklook of a ``width`` x ``height`` image: the longest side is
    ``min(max_side, longest side)``, the other keeps the aspect ratio (at least one pixel)."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def render(source: ShapedSource, plan: BandPlan, width: int, height: int, max_side: int) -> UInt8Array:
    """The quicklook as ``uint8 [rows, cols, 4]`` RGBA (see the module docstring).

    Raises:
        CorruptRaster: a block cannot be decoded.
        UnsupportedRaster: the codec of a block is not available.
    """
    rows, cols = quicklook_shape(width, height, max_side)
    layout = plan.layout
    window = Window(0, 0, width, height)
    samples = by_band(source.read(layout.read_bands, window, shape=(rows, cols)), layout.read_bands)
    colour = np.empty((layout.channels, rows, cols), np.uint8)
    if layout.direct:
        for channel in range(layout.channels):
            colour[channel] = samples[layout.band_map[channel]]
    else:
        plan.convert(samples, colour)
    valid = None
    if layout.can_mask:
        mask = None
        if layout.internal_mask:
            mask = source.read_mask(layout.colour_bands[0], window, shape=(rows, cols))
        valid = layout.validity(samples, mask)
    rgba = np.empty((rows, cols, 4), np.uint8)
    rgba[..., :3] = np.moveaxis(colour, 0, -1)  # grey (one channel) broadcasts to R, G and B
    rgba[..., 3] = 255 if valid is None else np.where(valid, 255, 0)
    if valid is not None:
        rgba[~valid, :3] = 0
    return rgba


def encode_png(rgba: UInt8Array) -> bytes:
    """``uint8 [rows, cols, 4]`` as an 8-bit RGBA PNG."""
    rows, cols, bands = rgba.shape
    if bands != 4:
        raise ValueError(f"expected RGBA pixels, got {bands} bands")
    writer = PngWriter(rows, cols)
    writer.add(rgba)
    return writer.finish()


class PngWriter:
    """An RGBA PNG of ``rows`` x ``cols`` compressed as its rows arrive, top to bottom.

    Raises:
        ValueError: from :meth:`add`, rows past the image's last; from :meth:`finish`, rows missing.
    """

    def __init__(self, rows: int, cols: int) -> None:
        self.rows = rows
        self.cols = cols
        self.written = 0
        self._zlib = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        self._above = np.zeros(cols * 4, np.uint8)
        self._data: list[bytes] = []

    def add(self, rgba: UInt8Array) -> None:
        """Compress the next ``uint8 [n, cols, 4]`` rows."""
        n = rgba.shape[0]
        if self.written + n > self.rows or rgba.shape[1:] != (self.cols, 4):
            raise ValueError(f"rows of shape {rgba.shape} do not fit a {self.rows}x{self.cols} PNG")
        if not n:
            return
        lines = np.ascontiguousarray(rgba).reshape(n, self.cols * 4)
        filtered = np.empty((n, self.cols * 4 + 1), np.uint8)
        filtered[:, 0] = 2  # Up: each byte minus the one above it (modulo 256); the first row minus zeros
        filtered[:, 1:] = lines
        filtered[0, 1:] -= self._above
        filtered[1:, 1:] -= lines[:-1]
        self._above = lines[-1].copy()
        self._data.append(self._zlib.compress(filtered.data))
        self.written += n

    def finish(self) -> bytes:
        """The whole PNG."""
        if self.written != self.rows:
            raise ValueError(f"{self.written} of {self.rows} rows were written")
        header = struct.pack(">IIBBBBB", self.cols, self.rows, 8, 6, 0, 0, 0)
        self._data.append(self._zlib.flush())
        return b"".join(
            (
                PNG_SIGNATURE,
                _chunk(b"IHDR", header),
                _chunk(b"IDAT", b"".join(self._data)),
                _chunk(b"IEND", b""),
            )
        )


class TileCanvas:
    """A quicklook painted from the tiles of a stream, so the file is read once for both.

    Each quicklook pixel takes the read pixel nearest its centre, from whichever tile holds it, with
    the tile's colours and validity (the same picture :func:`render` gives, but sampled from the image
    at its read size). Tiles must come in row-major order of their windows, as
    :meth:`RasterReader.tiles <gateway.pipeline.raster.reader.RasterReader.tiles>` yields them; rows
    above the current tile row are compressed as soon as they are final, so the PNG is nearly done when
    the last tile is. Pixels no tile covers (fully masked tiles are never yielded) stay transparent.

    Args:
        width, height: the image's size, which sets the quicklook's shape (:func:`quicklook_shape`).
        read_width, read_height: the size the tiles' windows are in (the image resampled, or itself).
        max_side: the quicklook's longest side.
    """

    def __init__(self, width: int, height: int, read_width: int, read_height: int, max_side: int) -> None:
        rows, cols = quicklook_shape(width, height, max_side)
        self.rows, self.cols = rows, cols
        self._src_rows = _nearest(rows, read_height)
        self._src_cols = _nearest(cols, read_width)
        self._rgba = np.zeros((rows, cols, 4), np.uint8)
        self._png = PngWriter(rows, cols)
        self._y = 0

    def add(self, spec: TileSpec, pixels: UInt8Array, valid: npt.NDArray[np.bool_] | None) -> None:
        """Paint one tile: ``pixels`` ``uint8 [3, S, S]``, ``valid`` ``bool [S, S]`` or ``None``.

        Raises:
            ValueError: the tile starts above one painted before (not row-major).
        """
        if spec.y < self._y:
            raise ValueError(f"tile at row {spec.y} after one at row {self._y}: tiles must be row-major")
        if spec.y > self._y:
            self._y = spec.y
            self._compress(int(np.searchsorted(self._src_rows, spec.y)))
        r0, r1 = np.searchsorted(self._src_rows, (spec.y, spec.y + spec.height))
        c0, c1 = np.searchsorted(self._src_cols, (spec.x, spec.x + spec.width))
        if r0 == r1 or c0 == c1:
            return
        ys = self._src_rows[r0:r1] - spec.y
        xs = self._src_cols[c0:c1] - spec.x
        block = self._rgba[r0:r1, c0:c1]
        block[..., :3] = np.moveaxis(pixels.take(ys, axis=1).take(xs, axis=2), 0, -1)
        if valid is None:
            block[..., 3] = 255
        else:
            block[..., 3] = np.where(valid.take(ys, axis=0).take(xs, axis=1), 255, 0)  # colour is 0 there

    def png(self) -> bytes:
        """The quicklook as an RGBA PNG; call once, after the last tile."""
        self._compress(self.rows)
        return self._png.finish()

    def _compress(self, upto: int) -> None:
        if upto > self._png.written:
            self._png.add(self._rgba[self._png.written : upto])


def _nearest(out: int, size: int) -> npt.NDArray[np.intp]:
    """For each of ``out`` samples across ``size`` pixels, the pixel nearest the sample's centre."""
    centres = (np.arange(out) + 0.5) * (size / out)
    return np.minimum(centres.astype(np.intp), size - 1)


def png_max_bytes(rows: int, cols: int) -> int:
    """An upper bound on the length of :func:`encode_png`'s output for ``rows`` x ``cols`` pixels
    (zlib's worst case on incompressible data, plus the chunks around it)."""
    raw = rows * (cols * 4 + 1)
    return raw + math.ceil(raw / 1000) + 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

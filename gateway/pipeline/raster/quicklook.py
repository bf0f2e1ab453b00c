"""A quicklook: the whole image, decimated to at most ``max_side`` pixels a side, as an RGBA PNG.

The pixels go through the file's :class:`~gateway.pipeline.raster.policy.BandPlan`, as tiles do (same
bands, scaling and validity), read at a decimated shape: GDAL serves it from an internal overview where
the file has one, by nearest neighbour otherwise, so a quicklook never decodes the image at full size
into memory. Alpha is 255 where a pixel is valid and 0 where it is not (nodata, alpha 0, masked).

The PNG is written here with zlib (one ``IDAT``, the *Up* filter on every row): the decode workers need
no imaging library for it. A quicklook of ``rows`` x ``cols`` is at most :func:`png_max_bytes` long.
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
    lines = np.ascontiguousarray(rgba).reshape(rows, cols * 4)
    filtered = np.empty((rows, cols * 4 + 1), np.uint8)
    filtered[:, 0] = 2  # Up: each byte minus the one above it (modulo 256); the first row minus zeros
    filtered[:, 1:] = lines
    filtered[1:, 1:] -= lines[:-1]
    header = struct.pack(">IIBBBBB", cols, rows, 8, 6, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def png_max_bytes(rows: int, cols: int) -> int:
    """An upper bound on the length of :func:`encode_png`'s output for ``rows`` x ``cols`` pixels
    (zlib's worst case on incompressible data, plus the chunks around it)."""
    raw = rows * (cols * 4 + 1)
    return raw + math.ceil(raw / 1000) + 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

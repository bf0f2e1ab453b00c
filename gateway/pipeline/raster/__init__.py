"""Where an uploaded raster becomes model tiles: uint8 RGB, channel-first, plus a mask of valid pixels.

Everything a user uploads passes through :func:`open_raster`, which returns a :class:`RasterReader`:
its :attr:`~RasterReader.info` says what was opened and how it is read, its
:meth:`~RasterReader.tiles` yields :class:`Tile` objects. The reading policy is documented in
``docs/raster-policy.md``; each module documents its part:

* :mod:`.sniff`: the format from the first bytes, never the name (no GDAL involved).
* :mod:`.reader`: the only module that imports rasterio: the hardened GDAL environment, size budgets
  before any decode, GDAL errors translated to :class:`~gateway.errors.GatewayError` subclasses,
  georeferencing, and reads of pixel windows and masks.
* :mod:`.policy`: pure code over plain values: budgets, which bands become RGB, scaling (the
  percentile stretch and where it is sampled) and which pixels are valid.
* :mod:`.cutter`: the rolling row buffer that decodes each block once and cuts overlapping tiles from
  it, pure numpy, reading through a small :class:`BlockSource` protocol.

Imports point inward: ``reader`` uses the other three, ``cutter`` uses ``policy``, and ``policy`` and
``sniff`` use neither.
"""

from gateway.pipeline.raster.cutter import CONVERT_CHUNK_BYTES, ROWS_PER_READ, BlockSource, Tile, TileCutter
from gateway.pipeline.raster.policy import (
    MAX_BLOCK_BYTES,
    STRETCH_HIGH_PERCENTILE,
    STRETCH_LOW_PERCENTILE,
    STRETCH_OVERVIEW_MIN_SIDE,
    STRETCH_SAMPLE_PIXELS,
    BandPlan,
    Colour,
    GeorefSource,
    MaskSource,
    RasterInfo,
    ReadOptions,
    Scaling,
    Window,
)
from gateway.pipeline.raster.reader import BASE_CACHE_BYTES, GDAL_ENV, RasterReader, open_raster
from gateway.pipeline.raster.sniff import Driver, describe_bytes, drivers_for_name, sniff_driver

__all__ = [
    "BASE_CACHE_BYTES",
    "CONVERT_CHUNK_BYTES",
    "GDAL_ENV",
    "MAX_BLOCK_BYTES",
    "ROWS_PER_READ",
    "STRETCH_HIGH_PERCENTILE",
    "STRETCH_LOW_PERCENTILE",
    "STRETCH_OVERVIEW_MIN_SIDE",
    "STRETCH_SAMPLE_PIXELS",
    "BandPlan",
    "BlockSource",
    "Colour",
    "Driver",
    "GeorefSource",
    "MaskSource",
    "RasterInfo",
    "RasterReader",
    "ReadOptions",
    "Scaling",
    "Tile",
    "TileCutter",
    "Window",
    "describe_bytes",
    "drivers_for_name",
    "open_raster",
    "sniff_driver",
]

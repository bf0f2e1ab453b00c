"""Where a raster is opened: the only module that touches image files.

Everything a user uploads passes through :func:`open_raster`, which returns a :class:`RasterReader`
yielding model-ready :class:`Tile` objects (uint8 RGB, channel-first, plus a mask of valid pixels).

Safety, in the order it is applied:

1. **Format from the bytes, not the name.** The first bytes decide the one GDAL driver allowed to open
   the file: TIFF/BigTIFF → ``GTiff``, PNG → ``PNG``, JPEG → ``JPEG``. Anything else (VRT XML, HTML, an
   empty file, ...) is refused with :class:`UnsupportedMediaType` naming what it looks like, so a VRT
   named ``.tif`` can never make GDAL read another file.
2. **Hardened GDAL environment** (:data:`GDAL_ENV`): no sidecar probing, no ``.aux.xml`` writes, no
   network, a bounded block cache; see the comments on each option.
3. **Budgets right after open, before any decode**: width, height, bands and decoded bytes
   (:class:`~gateway.settings.LimitSettings`) and the caller's pixel limit (:attr:`ReadOptions.max_pixels`)
   raise :class:`RasterTooLarge`. Opening reads only the TIFF directory, so a 262-byte file claiming
   65,535 bands or a sparse one claiming 100,000 x 100,000 pixels is refused in milliseconds.
4. **Every rasterio/GDAL error is translated** to :class:`CorruptRaster`, :class:`UnsupportedRaster` or
   :class:`UnsupportedMediaType` (``raise ... from exc``) with the GDAL reason, minus the server path.

Reading policy (also in ``docs/raster-policy.md``):

* **Bands.** Red/green/blue by colour interpretation where the file declares them (in any band order);
  otherwise 1 band → grey replicated to RGB; a palette band → palette expanded (entries with alpha 0 are
  masked); 2 bands → band 1 as grey (band 2 is the alpha if so declared, else ignored with a warning);
  3 bands → bands 1, 2, 3; 4+ bands → the first three non-alpha bands, with a warning.
  ``bands=(r, g, b)`` (1-based) or ``bands=(k,)`` (grey) overrides the choice. GDAL itself turns CMYK
  and YCbCr into RGB. A band layout is never an error; only a band number outside the file is
  (:class:`InvalidParameter`).
* **Sample type.** ``uint8`` is used as is (1/2/4-bit data is scaled to 0-255). Every other type is
  stretched per band from its 2nd to its 98th percentile onto 0-255 (``round(255 * (v - p2) / (p98 -
  p2))``, clipped). The percentiles are computed once per file, before the first tile, from all pixels
  of images up to :data:`STRETCH_SAMPLE_PIXELS`, else from the most detailed internal overview within
  that many pixels (and at least 256 px a side), else from whole blocks chosen by a seeded random draw
  up to that many pixels; so every tile of a file shares one scale, and the same file always gives the
  same pixels. Only valid pixels count. Scale/offset metadata does not
  matter (a percentile stretch is invariant to it).
* **Validity.** A pixel is invalid when every selected colour band equals its nodata value, when a
  float sample is NaN or infinite, when the alpha band is 0, when the internal (dataset) mask is 0, when
  its palette entry has alpha 0, or when it is padding past the image edge. Invalid pixels are 0 in the
  tile and ``False`` in :attr:`Tile.valid`. Tiles with no valid pixel are skipped and counted in
  :attr:`RasterReader.skipped`, never yielded.
* **Georeferencing.** ``crs`` is ``"EPSG:n"`` (or another ``AUTH:CODE``) when the CRS has an authority
  code, else WKT; ``transform`` is ``[a, b, c, d, e, f]`` in rasterio's affine order, ``None`` without
  georeferencing. Rotated and sheared transforms are kept as they are. A file georeferenced only by GCPs
  gets the affine transform fitted to its GCPs, with a warning; without a CRS the result is pixel-only,
  with a warning, never an error. Sidecar files (``.aux.xml``, ``.msk``, world files) are never read.

Reading is block-aligned and streaming: :meth:`RasterReader.tiles` reads horizontal bands of rows whose
height is a multiple of the file's block (tile or strip) height, converts them to uint8 RGB once, and
keeps a rolling buffer of at most ``tile + 2 x band height`` rows, so each block is decoded once even
though neighbouring tiles overlap, and memory is about ``4 x width x (512 + 2 x band height)`` bytes
whatever the image height. Striped files are read strip by strip, without re-encoding. A block larger
than :data:`MAX_BLOCK_BYTES` (e.g. a whole compressed image in one strip) is refused with
:class:`UnsupportedRaster`, since decoding it would need that much memory at once.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio._err import CPLE_BaseError
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.transform import from_gcps
from rasterio.windows import Window

from gateway.errors import (
    CorruptRaster,
    GatewayError,
    InvalidParameter,
    RasterTooLarge,
    UnsupportedMediaType,
    UnsupportedRaster,
)
from gateway.pipeline.tiling import TILE_SIZE, TileSpec
from gateway.settings import LimitSettings

logger = logging.getLogger(__name__)

UInt8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
Samples = dict[int, npt.NDArray[Any]]
"""Source samples of one window, by 1-based band number."""

BASE_CACHE_BYTES: Final = 64 * 1024**2

GDAL_ENV: Final[dict[str, str | int]] = {
    # Never list the upload's directory: GDAL would otherwise look for sidecars (.aux.xml, .msk, .ovr,
    # world files) next to the file, i.e. read files the user did not send, and pay a readdir per open.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # No Persistent Auxiliary Metadata: GDAL would read <file>.aux.xml and write one back (statistics,
    # histograms) next to the upload on close.
    "GDAL_PAM_ENABLED": "NO",
    # Georeferencing from the file's own tags only; never from .tab/.wld/.tfw/.aux.xml sidecars.
    "GDAL_GEOREF_SOURCES": "INTERNAL",
    # Interpret the CRS from the GeoTIFF keys as written, even when they override an EPSG code; the
    # default (EPSG lookup vs. keys) changed between GDAL versions and warns differently.
    "GTIFF_SRS_SOURCE": "GEOKEYS",
    # No network, even if some path ever reached /vsicurl/: no extension is allowed, no retries, and a
    # one-second connect budget. PROJ must not download transformation grids either.
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".palm-serve-network-disabled",
    "GDAL_HTTP_MAX_RETRY": "0",
    "GDAL_HTTP_CONNECTTIMEOUT": "1",
    "GDAL_HTTP_TIMEOUT": "1",
    "PROJ_NETWORK": "OFF",
    # A small block cache (bytes): each block is read once (see _TileCutter), so the cache only serves
    # GDAL's own block handling. Files whose blocks are taller than one read get a cache that holds a
    # block (RasterReader raises it), so such a block is still decoded once.
    "GDAL_CACHEMAX": BASE_CACHE_BYTES,
    # One decoding thread per reader: parallelism comes from the decode worker pool, and extra GDAL
    # threads would each reserve address space under the workers' RLIMIT_AS.
    "GDAL_NUM_THREADS": "1",
    # Damaged blocks are errors, not silently zero-filled or garbled tiles.
    "GTIFF_IGNORE_READ_ERRORS": "NO",
    "GDAL_ERROR_ON_LIBJPEG_WARNING": "YES",
}
"""GDAL configuration options active for every open and read (see the comment on each)."""

STRETCH_LOW_PERCENTILE: Final = 2.0
STRETCH_HIGH_PERCENTILE: Final = 98.0
STRETCH_SAMPLE_PIXELS: Final = 4_000_000
"""Upper bound on the pixels sampled (per band) to compute the percentile stretch."""
STRETCH_OVERVIEW_MIN_SIDE: Final = 256
MAX_BLOCK_BYTES: Final = 128 * 1024**2
"""Largest single block (tile or strip, all bands) we agree to decode."""
CONVERT_CHUNK_BYTES: Final = 32 * 1024**2
"""Largest source-dtype array read at once before conversion to uint8."""
ROWS_PER_READ: Final = 256
"""Target height of one read: a multiple of the block height close to this."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SNIFF_BYTES = 512

Driver = Literal["GTiff", "PNG", "JPEG"]
_FORMAT_NAMES = {"GTiff": "a TIFF", "PNG": "a PNG", "JPEG": "a JPEG"}


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """Per-request reading choices.

    Attributes:
        bands: 1-based source bands for red, green, blue (``(3, 2, 1)``), or one band read as grey
            (``(4,)``); ``None`` applies the default policy (see the module docstring).
        max_pixels: refuse images with more pixels than this (:class:`RasterTooLarge`); ``None`` for no
            limit beyond :class:`~gateway.settings.LimitSettings`.
        drivers: the formats this upload may be (``("GTiff",)`` for a file named ``.tif``, see
            :func:`drivers_for_name`); ``None`` accepts GeoTIFF, PNG and JPEG by content.
    """

    bands: tuple[int, ...] | None = None
    max_pixels: int | None = None
    drivers: tuple[str, ...] | None = None


def drivers_for_name(file_name: str | None) -> tuple[str, ...] | None:
    """The drivers a file *named* ``file_name`` may be opened with: its extension's format, if any.

    ``scene.tif`` must hold a TIFF (a PNG, VRT or HTML page named ``.tif`` is refused); a name without
    a raster extension leaves the choice to the content.
    """
    suffix = Path(file_name or "").suffix.lower()
    return {
        ".tif": ("GTiff",),
        ".tiff": ("GTiff",),
        ".png": ("PNG",),
        ".jpg": ("JPEG",),
        ".jpeg": ("JPEG",),
    }.get(suffix)


@dataclass(frozen=True, slots=True)
class RasterInfo:
    """What was opened and how it will be read; plain values only (it crosses process boundaries).

    Attributes:
        driver: the GDAL driver that opened the file (``GTiff``, ``PNG`` or ``JPEG``).
        width: pixels per row.
        height: rows.
        count: bands in the file.
        dtype: sample type of the file (``uint8``, ``uint16``, ``float32``, ...).
        crs: ``"EPSG:32633"``-style (any ``AUTH:CODE``) when the CRS has an authority code, else WKT;
            ``None`` without a CRS.
        transform: ``(a, b, c, d, e, f)`` in rasterio's affine order (pixel corner to CRS coordinates);
            ``None`` when the file has no georeferencing.
        georef: where ``crs``/``transform`` come from: ``"transform"``, ``"gcps"`` (affine fitted to
            ground control points) or ``"none"``.
        band_map: 1-based source bands that become red, green, blue (equal for grey).
        colour: how bands become RGB: ``"rgb"``, ``"grey"`` or ``"palette"``.
        alpha_band: 1-based band used as alpha, if any.
        masking: sources of invalid pixels: any of ``"nodata"``, ``"nan"``, ``"alpha"``, ``"mask"``,
            ``"palette-alpha"``.
        nodata: the nodata value of the first selected band, if any.
        scaling: ``"none"``, ``"nbits"`` (1/2/4-bit data scaled to 0-255) or ``"percentile"``.
        stretch: per output channel ``(low, high)`` source values mapped to 0 and 255 (percentile
            scaling only).
        scaling_source: where the stretch was computed (``"overview 1/8"``, ``"12 sampled blocks"``).
        block_shape: ``(rows, cols)`` of the file's blocks (tiles or strips).
        compression: the TIFF compression, if known.
        warnings: things the user should know about how the file was read.
    """

    driver: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float] | None
    georef: str
    band_map: tuple[int, int, int]
    colour: str
    alpha_band: int | None
    masking: tuple[str, ...]
    nodata: float | None
    scaling: str
    stretch: tuple[tuple[float, float], ...] | None
    scaling_source: str | None
    block_shape: tuple[int, int]
    compression: str | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Tile:
    """One model input.

    Attributes:
        spec: the image window this tile covers.
        pixels: ``(3, 512, 512)`` uint8 RGB, channel-first; invalid pixels and padding are 0.
        valid: ``(512, 512)`` bool, False for padding/nodata/alpha/masked pixels; ``None`` when every
            pixel is valid.
    """

    spec: TileSpec
    pixels: UInt8Array
    valid: BoolArray | None


def sniff_driver(head: bytes) -> Driver:
    """The one GDAL driver allowed to open a file starting with ``head`` (its first bytes).

    Raises:
        UnsupportedMediaType: not TIFF, PNG or JPEG; the detail names what the bytes look like.
        CorruptRaster: a TIFF header too short to hold a directory offset.
    """
    if head[:4] in _TIFF_MAGIC:
        if len(head) < 8:
            raise CorruptRaster("The file ends inside its TIFF header; it is truncated.")
        return "GTiff"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    raise UnsupportedMediaType(
        f"The file is {describe_bytes(head)}, not a GeoTIFF, PNG or JPEG image. "
        "Upload the image file itself.",
        looks_like=describe_bytes(head),
    )


def describe_bytes(head: bytes) -> str:
    """A short human description of a file's first bytes, for error messages."""
    if not head:
        return "empty (0 bytes)"
    if head[:4] in _TIFF_MAGIC:
        return "a TIFF image"
    if head.startswith(_PNG_MAGIC):
        return "a PNG image"
    if head.startswith(_JPEG_MAGIC):
        return "a JPEG image"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<vrtdataset") or (text.startswith(b"<?xml") and b"<vrtdataset" in text):
        return "a GDAL VRT (XML that references other files)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page (perhaps an error page saved instead of the image)"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "an XML document"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"GIF8", "a GIF image"),
        (b"BM", "a BMP image"),
        (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
        (b"\xffO\xffQ", "a JPEG 2000 codestream"),
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"\x89HDF", "an HDF5 file"),
        (b"CDF\x01", "a netCDF file"),
        (b"CDF\x02", "a netCDF file"),
        (b"NITF", "a NITF file"),
        (b"\x00\x00\x01\x00", "a Windows icon"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image (not supported; save it as PNG or GeoTIFF)"
    if head[4:8] == b"ftyp":
        return "an ISO media file (HEIC/AVIF/MP4)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised binary data (starting {head[:8].hex(' ')})"
    return "plain text"


def open_raster(path: Path, limits: LimitSettings, options: ReadOptions | None = None) -> RasterReader:
    """Open the raster at ``path`` for tiled reading, after checking its format and budgets.

    Use as a context manager (``with open_raster(...) as reader``) so the dataset is closed. A reader
    must be used from the thread that opened it.

    Args:
        path: a local regular file (never a URL or GDAL ``/vsi`` path).
        limits: width/height/band/decoded-byte budgets, checked before any pixel is decoded.
        options: band mapping and pixel limit.

    Returns:
        A reader whose :attr:`~RasterReader.info` describes the file and how it will be read.

    Raises:
        UnsupportedMediaType: the bytes are not TIFF, PNG or JPEG.
        CorruptRaster: the file cannot be parsed, or the pixels sampled for the stretch cannot be decoded.
        UnsupportedRaster: a valid file we cannot turn into RGB (complex samples, missing codec, a
            giant single block).
        RasterTooLarge: a budget is exceeded.
        InvalidParameter: ``options.bands`` names a band the file does not have.
        ValueError: ``path`` is not a local regular file (a programming error, not user input).
    """
    return RasterReader(path, limits, options or ReadOptions())


class RasterReader:
    """An open raster: :attr:`info`, then :meth:`tiles`. Create with :func:`open_raster`."""

    def __init__(self, path: Path, limits: LimitSettings, options: ReadOptions) -> None:
        local = Path(os.path.abspath(path))
        if str(local).startswith("/vsi") or not local.is_file():
            raise ValueError(f"not a local regular file: {path}")
        self._path = local
        self._limits = limits
        self._options = options
        self.skipped = 0
        """Tiles skipped by the last :meth:`tiles` call because none of their pixels is valid."""
        self._stack = ExitStack()
        try:
            with local.open("rb") as fh:
                head = fh.read(_SNIFF_BYTES)
            driver = sniff_driver(head)
            if options.drivers is not None and driver not in options.drivers:
                raise UnsupportedMediaType(
                    f"The file is named as {' or '.join(_FORMAT_NAMES.get(d, d) for d in options.drivers)} "
                    f"but its content is {describe_bytes(head)}; rename it or upload the right file.",
                    looks_like=describe_bytes(head),
                )
            self._stack.enter_context(rasterio.Env(**GDAL_ENV))
            self._src = self._open(driver)
            self._stack.callback(self._src.close)
            try:
                _check_budgets(self._src, limits, options)
                self._plan = _plan_bands(self._src, options)
                block_h, block_w = self._plan.block_shape
                if block_h > _read_step(block_h):  # one block spans several reads: keep it cached
                    block_bytes = block_h * block_w * len(self._plan.read_bands) * self._plan.dtype.itemsize
                    self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=BASE_CACHE_BYTES + block_bytes))
                self._plan.stretch = self._compute_stretch()
                self.info = self._describe(driver)
                logger.debug(
                    "opened %s %dx%dx%d %s as %s, scaling %s, masking %s",
                    driver,
                    self.info.width,
                    self.info.height,
                    self.info.count,
                    self.info.dtype,
                    self.info.colour,
                    self.info.scaling,
                    self.info.masking,
                )
            except (RasterioError, CPLE_BaseError) as exc:
                raise CorruptRaster(
                    f"The file's metadata cannot be read ({self._reason(exc)}); it may be damaged."
                ) from exc
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the dataset and leave the GDAL environment."""
        self._stack.close()

    def tiles(self, specs: Sequence[TileSpec]) -> Iterator[Tile]:
        """Cut the tiles ``specs`` (from :func:`~gateway.pipeline.tiling.tile_grid`) out of the image.

        Tiles come in row-major order of their windows (by ``y``, then ``x``), whatever the order of
        ``specs``; tiles without any valid pixel are skipped and counted in :attr:`skipped`.

        Raises:
            CorruptRaster: a block cannot be decoded (damaged or truncated data).
            UnsupportedRaster: the codec of a block is not available.
        """
        self.skipped = 0
        if not specs:
            return
        width, height = self.info.width, self.info.height
        for spec in specs:
            inside = (
                spec.x >= 0
                and spec.y >= 0
                and spec.x + spec.width <= width
                and spec.y + spec.height <= height
            )
            if not (inside and 0 < spec.width <= TILE_SIZE and 0 < spec.height <= TILE_SIZE):
                raise ValueError(f"tile window outside the image or larger than a tile: {spec}")
        yield from _TileCutter(self, specs).run()

    # -- internals ---------------------------------------------------------------------------------

    def _open(self, driver: Driver) -> Any:
        try:
            with warnings.catch_warnings():
                # Pixel-only files are a supported case (reported in RasterInfo), not a warning.
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(self._path, driver=driver)
        except (RasterioError, CPLE_BaseError) as exc:
            reason = self._reason(exc)
            if "missing codec" in reason.lower() or "not configured" in reason.lower():
                raise UnsupportedRaster(
                    f"The file uses a compression this server cannot decode ({reason}). "
                    "Re-save it with DEFLATE, LZW, ZSTD, WEBP or JPEG compression."
                ) from exc
            kind = {"GTiff": "TIFF", "PNG": "PNG", "JPEG": "JPEG"}[driver]
            raise CorruptRaster(
                f"The file starts like a {kind} but its structure cannot be read ({reason}); "
                "it may be truncated or damaged."
            ) from exc

    def _reason(self, exc: BaseException) -> str:
        """GDAL's message for ``exc`` (or its cause), without the server-side path."""
        parts = [str(exc)]
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) and str(cause) not in parts[0]:
            parts.append(str(cause))
        text = "; ".join(p for p in parts if p and "See previous exception" not in p) or parts[-1]
        for secret in (str(self._path), self._path.name):
            text = text.replace(secret, "<file>")
        return text.strip()[:300]

    def _read(self, bands: Sequence[int] | int, window: Window, **kwargs: Any) -> Any:
        try:
            return self._src.read(bands, window=window, **kwargs)
        except (RasterioError, CPLE_BaseError) as exc:
            raise self._decode_error(exc, window) from exc

    def _read_mask(self, band: int, window: Window, **kwargs: Any) -> Any:
        try:
            return self._src.read_masks(band, window=window, **kwargs)
        except (RasterioError, CPLE_BaseError) as exc:
            raise self._decode_error(exc, window) from exc

    def _decode_error(self, exc: BaseException, window: Window) -> GatewayError:
        reason = self._reason(exc)
        if "missing codec" in reason.lower():
            return UnsupportedRaster(f"A block uses a compression this server cannot decode ({reason}).")
        return CorruptRaster(
            f"Pixel data cannot be decoded near rows {int(window.row_off)}-"
            f"{int(window.row_off + window.height)} ({reason}); the file is damaged or truncated."
        )

    def _compute_stretch(self) -> tuple[tuple[float, float], ...] | None:
        plan = self._plan
        if plan.scaling != "percentile":
            return None
        samples, source = self._stretch_sample()
        plan.scaling_source = source
        ranges: list[tuple[float, float]] = []
        empty = [band for band in plan.colour_bands if samples[band].size == 0]
        if empty:
            plan.warnings.append(
                f"No valid pixel in the stretch sample of band(s) {','.join(map(str, empty))}; "
                f"the full {self._src.dtypes[0]} range is mapped to 0-255 there."
            )
        for band in plan.colour_bands:
            values = samples[band]
            if values.size == 0:
                low, high = _dtype_range(self._src.dtypes[0])
            else:
                low, high = (
                    float(v) for v in np.percentile(values, [STRETCH_LOW_PERCENTILE, STRETCH_HIGH_PERCENTILE])
                )
            if not high > low:
                high = low + 1.0 if abs(low) < 1e300 else low
            ranges.append((low, high))
        by_band = dict(zip(plan.colour_bands, ranges, strict=True))
        return tuple(by_band[b] for b in plan.band_map)

    def _stretch_sample(self) -> tuple[dict[int, npt.NDArray[np.float64]], str]:
        """Valid sample values per colour band, and where they came from."""
        src, plan = self._src, self._plan
        width, height = src.width, src.height
        collected: dict[int, list[npt.NDArray[np.float64]]] = {b: [] for b in plan.colour_bands}
        factors = [f for f in src.overviews(plan.colour_bands[0]) if f > 1]
        usable = [
            f
            for f in factors
            if math.ceil(width / f) * math.ceil(height / f) <= STRETCH_SAMPLE_PIXELS
            and min(math.ceil(width / f), math.ceil(height / f)) >= STRETCH_OVERVIEW_MIN_SIDE
        ]
        if width * height <= STRETCH_SAMPLE_PIXELS:
            windows = [Window(0, 0, width, height)]
            out_shape = None
            source = "all pixels"
        elif usable:
            factor = min(usable)
            windows = [Window(0, 0, width, height)]
            out_shape = (math.ceil(height / factor), math.ceil(width / factor))
            source = f"overview 1/{factor}"
        else:
            windows = _sample_windows(width, height, plan.block_shape)
            out_shape = None
            source = f"{len(windows)} sampled blocks"
        for window in windows:
            shape = out_shape or (int(window.height), int(window.width))
            raw = self._read(
                plan.read_bands,
                window,
                out_shape=(len(plan.read_bands), *shape),
                resampling=Resampling.nearest,
            )
            mask = None
            if plan.internal_mask:
                mask = self._read_mask(plan.colour_bands[0], window, out_shape=shape)
            samples = _by_band(raw, plan.read_bands)
            valid = plan.validity(samples, mask)
            for band in plan.colour_bands:
                values = samples[band]
                selected = values if valid is None else values[valid]
                collected[band].append(selected.astype(np.float64, copy=False).ravel())
        return {b: np.concatenate(v) if v else np.zeros(0) for b, v in collected.items()}, source

    def _describe(self, driver: Driver) -> RasterInfo:
        src, plan = self._src, self._plan
        notes = list(plan.warnings)
        crs, transform, georef = self._georeference(notes)
        pages = len(src.subdatasets) if driver == "GTiff" else 0
        if pages:
            notes.append(f"The TIFF holds {pages + 1} images; only the first is read.")
        compression = getattr(src.compression, "value", src.compression)
        return RasterInfo(
            driver=driver,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=str(src.dtypes[0]),
            crs=crs,
            transform=transform,
            georef=georef,
            band_map=plan.band_map,
            colour=plan.colour,
            alpha_band=plan.alpha_band,
            masking=plan.masking,
            nodata=plan.nodata_values[0] if plan.nodata_values else None,
            scaling=plan.scaling,
            stretch=plan.stretch,
            scaling_source=plan.scaling_source,
            block_shape=plan.block_shape,
            compression=str(compression) if compression is not None else None,
            warnings=tuple(notes),
        )

    def _georeference(
        self, notes: list[str]
    ) -> tuple[str | None, tuple[float, float, float, float, float, float] | None, str]:
        src = self._src
        try:
            crs_obj = src.crs
        except CRSError as exc:
            crs_obj = None
            notes.append(f"The CRS cannot be interpreted ({exc}); results are in pixel coordinates.")
        affine = src.transform
        georef = "transform"
        if affine.is_identity:
            try:
                gcps, gcp_crs = src.gcps
            except CRSError:
                gcps, gcp_crs = [], None
            if len(gcps) >= 3 and gcp_crs is not None:
                affine = from_gcps(gcps)
                crs_obj = gcp_crs
                georef = "gcps"
                notes.append(
                    f"Georeferenced by an affine fit to {len(gcps)} ground control points; "
                    "positions are approximate."
                )
            elif gcps:
                notes.append(
                    f"The file has {len(gcps)} ground control points but no usable CRS for them; "
                    "results are in pixel coordinates."
                )
                return None, None, "none"
            else:
                georef = "none"
        transform = None if affine.is_identity else _affine_tuple(affine)
        crs = _crs_string(crs_obj) if crs_obj else None
        if transform is not None and not all(math.isfinite(v) for v in transform):
            notes.append("The geotransform is not finite; results are in pixel coordinates.")
            transform, georef = None, "none"
        if crs is None:
            notes.append("The file has no CRS: detections are in pixel coordinates without geometry.")
        elif transform is None:
            notes.append("The file has a CRS but no geotransform: detections have no geometry.")
        else:
            from gateway.pipeline import geo  # geo is pure; import here to keep the layering obvious

            if not geo.can_georeference(crs, transform, src.width, src.height):
                notes.append(
                    "Pixel positions cannot be transformed from this CRS to WGS 84 longitude/latitude "
                    "(a non-Earth body or a degenerate transform); detections have no geometry."
                )
        return crs, transform, georef if transform is not None else "none"


def _affine_tuple(affine: Any) -> tuple[float, float, float, float, float, float]:
    return (
        float(affine.a),
        float(affine.b),
        float(affine.c),
        float(affine.d),
        float(affine.e),
        float(affine.f),
    )


def _crs_string(crs: Any) -> str:
    """``EPSG:n`` (or another ``AUTH:CODE`` PROJ can resolve) if the CRS has one, else WKT."""
    try:
        epsg = crs.to_epsg()
        if epsg is not None:
            return f"EPSG:{epsg}"
        authority = crs.to_authority()
        if authority is not None:
            return f"{authority[0]}:{authority[1]}"
    except CRSError:
        pass
    return str(crs.to_wkt())


def _dtype_range(dtype: str) -> tuple[float, float]:
    kind = np.dtype(dtype)
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _check_budgets(src: Any, limits: LimitSettings, options: ReadOptions) -> None:
    """Size budgets from the header alone; nothing is decoded before these pass."""
    width, height, count = int(src.width), int(src.height), int(src.count)
    if width > limits.max_width or height > limits.max_height:
        raise RasterTooLarge(
            f"The image is {width:,} x {height:,} pixels; the limits are {limits.max_width:,} wide and "
            f"{limits.max_height:,} high.",
            limit="dimensions",
            width=width,
            height=height,
        )
    if count > limits.max_bands:
        raise RasterTooLarge(
            f"The image has {count:,} bands; at most {limits.max_bands} are accepted.",
            limit="bands",
            bands=count,
        )
    dtype = str(src.dtypes[0])
    decoded = width * height * count * np.dtype(dtype).itemsize
    if decoded > limits.max_decoded_bytes:
        raise RasterTooLarge(
            f"Decoded, the image would take {decoded / 1024**3:,.1f} GiB ({width:,} x {height:,} x "
            f"{count} x {dtype}); the limit is {limits.max_decoded_bytes / 1024**3:,.1f} GiB.",
            limit="decoded_bytes",
            decoded_bytes=decoded,
        )
    pixels = width * height
    if options.max_pixels is not None and pixels > options.max_pixels:
        raise RasterTooLarge(
            f"The image has {pixels:,} pixels ({width:,} x {height:,}), above the {options.max_pixels:,} "
            "pixel limit of a direct request; run it with `palm-serve predict`, which has no pixel limit "
            "(bulk jobs will take it too).",
            limit="max_pixels",
            pixels=pixels,
            max_pixels=options.max_pixels,
        )


@dataclass(slots=True)
class _Plan:
    """How the source bands become uint8 RGB and a validity mask (mutable while opening only)."""

    colour: str  # rgb | grey | palette
    band_map: tuple[int, int, int]
    colour_bands: tuple[int, ...]  # unique source bands that carry colour, in first-use order
    read_bands: tuple[int, ...]  # colour bands + alpha, the bands read per window
    alpha_band: int | None
    internal_mask: bool
    nodata_values: tuple[float, ...]  # per colour band; empty without nodata
    dtype: np.dtype[Any]
    scaling: str  # none | nbits | percentile
    nbits: int
    block_shape: tuple[int, int]
    palette: UInt8Array | None = None  # (entries, 4) RGBA lookup table
    stretch: tuple[tuple[float, float], ...] | None = None
    scaling_source: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def direct(self) -> bool:
        """Source samples are the output samples: read straight into the tile buffer."""
        return self.scaling == "none" and self.colour in ("rgb", "grey")

    @property
    def channels(self) -> int:
        """Channels held in the row buffer (grey is broadcast to RGB only when a tile is cut)."""
        return 1 if self.colour == "grey" else 3

    @property
    def can_mask(self) -> bool:
        return bool(self.masking)

    @property
    def masking(self) -> tuple[str, ...]:
        sources = []
        if self.nodata_values:
            sources.append("nodata")
        if self.dtype.kind == "f":
            sources.append("nan")
        if self.alpha_band is not None:
            sources.append("alpha")
        if self.internal_mask:
            sources.append("mask")
        if self.palette is not None and bool((self.palette[:, 3] == 0).any()):
            sources.append("palette-alpha")
        return tuple(sources)

    def validity(self, samples: Samples, mask: npt.NDArray[Any] | None) -> BoolArray | None:
        """Valid pixels given the source ``samples`` of :attr:`read_bands`; ``None`` if all are valid."""
        valid: BoolArray | None = None

        def narrow(condition: BoolArray) -> None:
            nonlocal valid
            valid = condition if valid is None else valid & condition

        colour = [samples[b] for b in self.colour_bands]
        if self.nodata_values:
            is_nodata: BoolArray | None = None
            for values, nodata in zip(colour, self.nodata_values, strict=True):
                hit = np.isnan(values) if math.isnan(nodata) else values == nodata
                is_nodata = hit if is_nodata is None else is_nodata & hit
            assert is_nodata is not None
            narrow(~is_nodata)
        if self.dtype.kind == "f":
            for values in colour:
                narrow(np.isfinite(values))
        if self.alpha_band is not None:
            narrow(samples[self.alpha_band] > 0)
        if mask is not None:
            narrow(mask > 0)
        if self.palette is not None and "palette-alpha" in self.masking:
            narrow(self.palette[:, 3][_palette_index(colour[0], self.palette)] > 0)
        return valid

    def convert(self, samples: Samples, out: UInt8Array) -> None:
        """Write the source ``samples`` as uint8 into ``out`` (``(channels, h, w)``)."""
        if self.colour == "palette":
            assert self.palette is not None
            lut = np.ascontiguousarray(self.palette[:, :3].T)
            np.take(lut, _palette_index(samples[self.band_map[0]], self.palette), axis=1, out=out)
            return
        if self.scaling == "nbits":
            top = (1 << self.nbits) - 1
            for c in range(self.channels):
                values = samples[self.band_map[c]]
                out[c] = (np.minimum(values, top).astype(np.uint16) * 255 + top // 2) // top
            return
        assert self.stretch is not None
        for c in range(self.channels):
            low, high = self.stretch[c]
            _stretch_into(samples[self.band_map[c]], low, high, out[c])


def _by_band(stack: npt.NDArray[Any], bands: Sequence[int]) -> Samples:
    return {band: stack[i] for i, band in enumerate(bands)}


def _palette_index(values: npt.NDArray[Any], palette: UInt8Array) -> npt.NDArray[np.intp]:
    return np.asarray(np.minimum(values, palette.shape[0] - 1), dtype=np.intp)


def _stretch_into(values: npt.NDArray[Any], low: float, high: float, out: UInt8Array) -> None:
    work = np.float64 if values.dtype.itemsize > 4 or values.dtype.kind == "f" else np.float32
    scaled: npt.NDArray[np.floating[Any]] = values.astype(work)
    with np.errstate(all="ignore"):  # inf/NaN/overflow are handled just below
        scaled -= low
        scaled *= 255.0 / (high - low) if high > low else 0.0
        scaled += 0.5
    np.copyto(scaled, 0.0, where=~np.isfinite(scaled) & ~np.isposinf(scaled))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    out[...] = scaled.astype(np.uint8)


def _plan_bands(src: Any, options: ReadOptions) -> _Plan:
    """Choose source bands, colour conversion, masking and scaling for ``src`` (the policy)."""
    count = int(src.count)
    interp = tuple(src.colorinterp)
    dtypes = {str(d) for d in src.dtypes}
    dtype = np.dtype(str(src.dtypes[0]))
    if dtype.kind == "c" or any(np.dtype(d).kind == "c" for d in dtypes):
        raise UnsupportedRaster(
            f"The image has complex ({dtype}) samples, e.g. SAR phase data; convert it to amplitude first."
        )
    if len(dtypes) > 1:
        raise UnsupportedRaster(
            f"The bands have different sample types ({', '.join(sorted(dtypes))}); "
            "convert them to one type first."
        )
    if count < 1:
        raise UnsupportedRaster("The image has no bands.")
    notes: list[str] = []
    alpha = next((i + 1 for i, ci in enumerate(interp) if ci == ColorInterp.alpha), None)
    colour = "rgb"
    if options.bands is not None:
        bands = options.bands
        if len(bands) not in (1, 3) or any(not 1 <= b <= count for b in bands):
            raise InvalidParameter(
                f"bands={','.join(map(str, bands))} does not fit this image: give 1 or 3 band numbers "
                f"between 1 and {count}.",
                bands=list(bands),
                count=count,
            )
        if len(bands) == 1:
            band_map = (bands[0],) * 3
            colour = "palette" if interp[bands[0] - 1] == ColorInterp.palette else "grey"
        else:
            band_map = (bands[0], bands[1], bands[2])
        if alpha in band_map:
            alpha = None
    elif all(ci in interp for ci in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        band_map = (
            interp.index(ColorInterp.red) + 1,
            interp.index(ColorInterp.green) + 1,
            interp.index(ColorInterp.blue) + 1,
        )
    elif interp[0] == ColorInterp.palette:
        colour, band_map = "palette", (1, 1, 1)
    elif count <= 2:
        colour, band_map = "grey", (1, 1, 1)
        if count == 2 and alpha != 2:
            notes.append("2 bands without an alpha band: band 1 is read as grey, band 2 is ignored.")
    else:
        picks = [b for b in range(1, count + 1) if b != alpha][:3]
        if len(picks) < 3:
            colour, band_map = "grey", (picks[0],) * 3
        else:
            band_map = (picks[0], picks[1], picks[2])
        if count - (alpha is not None) > 3:
            names = ", ".join(ci.name for ci in interp[:8])
            notes.append(
                f"{count} bands ({names}) without red/green/blue colour interpretation: bands "
                f"{','.join(map(str, band_map))} are read as R,G,B; choose others with bands=."
            )
    colour_bands = tuple(dict.fromkeys(band_map))
    if colour == "grey" and interp[band_map[0] - 1] == ColorInterp.palette:
        colour = "palette"
    read_bands = colour_bands + ((alpha,) if alpha is not None and alpha not in colour_bands else ())

    palette: UInt8Array | None = None
    if colour == "palette":
        palette = _palette_table(src, band_map[0], dtype)
        if palette is None:
            colour = "grey"
            notes.append("The palette band has no usable colour table; it is read as grey.")
    flags = [set(src.mask_flag_enums[b - 1]) for b in colour_bands]
    internal_mask = any(MaskFlags.per_dataset in f and MaskFlags.alpha not in f for f in flags) or any(
        not f for f in flags
    )
    nodata_values: tuple[float, ...] = ()
    nodatavals = src.nodatavals
    if all(nodatavals[b - 1] is not None for b in colour_bands):
        nodata_values = tuple(float(nodatavals[b - 1]) for b in colour_bands)

    nbits = 8
    structure = src.tags(band_map[0], ns="IMAGE_STRUCTURE")
    if "NBITS" in structure:
        try:
            nbits = int(structure["NBITS"])
        except ValueError:
            nbits = 8
    if colour == "palette":
        scaling = "none"
    elif dtype == np.uint8:
        scaling = "nbits" if 1 <= nbits < 8 else "none"
    else:
        scaling = "percentile"
    block_h, block_w = (int(v) for v in src.block_shapes[0])
    block_bytes = block_h * block_w * len(read_bands) * dtype.itemsize
    if block_bytes > MAX_BLOCK_BYTES and block_h > 1:
        raise UnsupportedRaster(
            f"The image is stored in blocks of {block_w:,} x {block_h:,} pixels "
            f"({block_bytes / 1024**2:,.0f} MiB decoded each); blocks above "
            f"{MAX_BLOCK_BYTES // 1024**2} MiB are not read. Re-save it tiled (e.g. gdal_translate -co "
            "TILED=YES) or with smaller strips."
        )
    return _Plan(
        colour=colour,
        band_map=band_map,
        colour_bands=colour_bands,
        read_bands=read_bands,
        alpha_band=alpha,
        internal_mask=internal_mask,
        nodata_values=nodata_values,
        dtype=dtype,
        scaling=scaling,
        nbits=nbits,
        block_shape=(block_h, block_w),
        palette=palette,
        warnings=notes,
    )


def _palette_table(src: Any, band: int, dtype: np.dtype[Any]) -> UInt8Array | None:
    if dtype not in (np.uint8, np.uint16):
        return None
    try:
        colormap = src.colormap(band)
    except (RasterioError, CPLE_BaseError, ValueError):
        return None
    if not colormap:
        return None
    size = 256 if dtype == np.uint8 else max(256, max(colormap) + 1)
    table = np.zeros((size, 4), np.uint8)
    table[:, 3] = 255
    for index, entry in colormap.items():
        if 0 <= index < size:
            table[index, : len(entry)] = np.clip(np.asarray(entry[:4], dtype=np.int64), 0, 255)
    return table


def _read_step(block_height: int) -> int:
    """Rows per read: a multiple of the block height near :data:`ROWS_PER_READ`, or a tile's height
    for blocks taller than two tiles (which are then read in several steps from GDAL's cache)."""
    if block_height > 2 * TILE_SIZE:
        return TILE_SIZE
    return block_height * max(1, ROWS_PER_READ // block_height)


def _sample_windows(width: int, height: int, block_shape: tuple[int, int]) -> list[Window]:
    """Whole blocks drawn by a seeded random choice, up to :data:`STRETCH_SAMPLE_PIXELS` pixels."""
    block_h, block_w = block_shape
    if block_h * block_w > STRETCH_SAMPLE_PIXELS:  # giant blocks: sample sub-windows of them
        block_h = max(1, min(block_h, STRETCH_SAMPLE_PIXELS // (16 * min(block_w, width)) or 1))
        block_w = min(block_w, width)
    rows = math.ceil(height / block_h)
    cols = math.ceil(width / block_w)
    per_block = block_h * block_w
    wanted = max(1, min(rows * cols, STRETCH_SAMPLE_PIXELS // per_block))
    rng = np.random.default_rng(0)
    picks = np.sort(rng.choice(rows * cols, size=wanted, replace=False))
    windows = []
    for pick in picks.tolist():
        r, c = divmod(pick, cols)
        x, y = c * block_w, r * block_h
        windows.append(Window(x, y, min(block_w, width - x), min(block_h, height - y)))
    return windows


class _TileCutter:
    """The rolling row buffer behind :meth:`RasterReader.tiles` (see the module docstring).

    A ring: image row ``r`` lives at buffer row ``r % capacity``, so dropping rows that no later tile
    needs costs nothing (no memmove); a tile whose rows wrap around the ring is copied in two parts.
    """

    def __init__(self, reader: RasterReader, specs: Sequence[TileSpec]) -> None:
        self.reader = reader
        self.plan = reader._plan
        self.specs = sorted(specs, key=lambda s: (s.y, s.x, s.index))
        info = reader.info
        block_h, block_w = self.plan.block_shape
        # Reads span the union of the requested columns, widened to block edges.
        x0 = min(s.x for s in self.specs)
        x1 = max(s.x + s.width for s in self.specs)
        self.x0 = (x0 // block_w) * block_w if block_w <= info.width else 0
        self.x1 = min(info.width, math.ceil(x1 / block_w) * block_w)
        self.step = _read_step(block_h)
        tallest = max(s.height for s in self.specs)
        # Rows held: from the start of the read band holding a tile's top to the end of the one holding
        # its bottom, i.e. fewer than tallest + 2 x step; a multiple of step keeps every read unwrapped.
        self.capacity = min(info.height, math.ceil((tallest + 2 * self.step) / self.step) * self.step)
        width = self.x1 - self.x0
        self.pixels = np.zeros((self.plan.channels, self.capacity, width), np.uint8)
        self.valid: BoolArray | None = (
            np.ones((self.capacity, width), np.bool_) if self.plan.can_mask else None
        )
        self.top = 0  # first image row held
        self.bottom = 0  # one past the last image row held
        per_column = self.step * len(self.plan.read_bands) * self.plan.dtype.itemsize
        columns = max(block_w, (CONVERT_CHUNK_BYTES // max(per_column, 1)) // block_w * block_w)
        self.chunk_cols = width if self.plan.direct else min(width, columns)

    def run(self) -> Iterator[Tile]:
        for spec in self.specs:
            self._hold(spec.y, spec.y + spec.height)
            tile = self._cut(spec)
            if tile is None:
                self.reader.skipped += 1
            else:
                yield tile

    def _hold(self, y0: int, y1: int) -> None:
        """Make the buffer hold image rows ``[y0, y1)``, dropping rows above ``y0``'s read band."""
        start = (y0 // self.step) * self.step
        if start >= self.bottom:
            self.top = self.bottom = start
        else:
            self.top = max(self.top, start)
        height = self.reader.info.height
        while self.bottom < y1:
            end = min(height, self.bottom + self.step)
            self._fill(self.bottom, end)
            self.bottom = end
        assert self.bottom - self.top <= self.capacity

    def _ring(self, y: int, height: int) -> list[tuple[slice, slice]]:
        """``(tile rows, buffer rows)`` pairs covering image rows ``[y, y + height)``."""
        r = y % self.capacity
        first = min(height, self.capacity - r)
        parts = [(slice(0, first), slice(r, r + first))]
        if first < height:
            parts.append((slice(first, height), slice(0, height - first)))
        return parts

    def _fill(self, y0: int, y1: int) -> None:
        """Decode image rows ``[y0, y1)`` into the buffer (block-aligned, column chunk by chunk)."""
        plan, reader = self.plan, self.reader
        ((_, rows),) = self._ring(y0, y1 - y0)  # reads start on multiples of step: never wrapped
        for c0 in range(self.x0, self.x1, self.chunk_cols):
            c1 = min(self.x1, c0 + self.chunk_cols)
            window = Window(c0, y0, c1 - c0, y1 - y0)
            out = self.pixels[:, rows, c0 - self.x0 : c1 - self.x0]
            if plan.direct:
                reader._read(list(plan.band_map[: plan.channels]), window, out=out)
                samples: Samples = {b: out[plan.band_map.index(b)] for b in plan.colour_bands}
                if plan.alpha_band is not None:
                    samples[plan.alpha_band] = reader._read(plan.alpha_band, window)
            else:
                samples = _by_band(reader._read(list(plan.read_bands), window), plan.read_bands)
                plan.convert(samples, out)
            if self.valid is None:
                continue
            mask = reader._read_mask(plan.colour_bands[0], window) if plan.internal_mask else None
            valid = plan.validity(samples, mask)
            target = self.valid[rows, c0 - self.x0 : c1 - self.x0]
            if valid is None:
                target[...] = True
            else:
                target[...] = valid
                out[:, ~valid] = 0

    def _cut(self, spec: TileSpec) -> Tile | None:
        cols = slice(spec.x - self.x0, spec.x - self.x0 + spec.width)
        parts = self._ring(spec.y, spec.height)
        padded = spec.width < TILE_SIZE or spec.height < TILE_SIZE
        valid: BoolArray | None = None
        if self.valid is not None or padded:
            valid = np.zeros((TILE_SIZE, TILE_SIZE), np.bool_)
            for tile_rows, buffer_rows in parts:
                valid[tile_rows, : spec.width] = True if self.valid is None else self.valid[buffer_rows, cols]
            window_valid = valid[: spec.height, : spec.width]
            if not window_valid.any():
                return None
            if not padded and window_valid.all():
                valid = None
        pixels = (
            np.zeros((3, TILE_SIZE, TILE_SIZE), np.uint8)
            if padded
            else np.empty((3, TILE_SIZE, TILE_SIZE), np.uint8)
        )
        for tile_rows, buffer_rows in parts:
            pixels[:, tile_rows, : spec.width] = self.pixels[:, buffer_rows, cols]
        return Tile(spec, pixels, valid)

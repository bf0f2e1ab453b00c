"""Where a raster is opened: the only module that imports rasterio or touches image files.

Everything a user uploads passes through :func:`open_raster`, which returns a :class:`RasterReader`
yielding model-ready :class:`~gateway.pipeline.raster.cutter.Tile` objects (uint8 RGB, channel-first,
plus a mask of valid pixels).

Safety, in the order it is applied:

1. **Format from the bytes, not the name** (:mod:`~gateway.pipeline.raster.sniff`): the first bytes
   decide the one GDAL driver allowed to open the file; anything else is refused with
   :class:`UnsupportedMediaType` before GDAL sees it.
2. **Hardened GDAL environment** (:data:`GDAL_ENV`): no sidecar probing, no ``.aux.xml`` writes, no
   network, a bounded block cache; see the comments on each option.
3. **Budgets right after open, before any decode** (:func:`~gateway.pipeline.raster.policy.check_budgets`):
   opening reads only the TIFF directory, so a 262-byte file claiming 65,535 bands or a sparse one
   claiming 100,000 x 100,000 pixels is refused in milliseconds.
4. **Every rasterio/GDAL error is translated** to :class:`CorruptRaster`, :class:`UnsupportedRaster` or
   :class:`UnsupportedMediaType` (``raise ... from exc``) with the GDAL reason, minus the server path.

The reader describes the file to the reading policy (:mod:`~gateway.pipeline.raster.policy`) as plain
values, reads the pixels the policy's stretch sample asks for, and serves the windows the tile cutter
(:mod:`~gateway.pipeline.raster.cutter`) reads.

Resolution: the file's ground sample distance is measured from its georeferencing and judged against
the model's range (:func:`~gateway.pipeline.resolution.plan_resolution`, from
:attr:`ReadOptions.resolution`) right after open: a file far coarser than the model can see is refused
there, before any pixel is decoded, and a finer one is read resampled (:class:`_Resampled`): each tile
pixel is the average of the source area behind it (nearest neighbour for palette indices), read window
by window with a fractional source window and ``out_shape``, so GDAL serves it from the most detailed
internal overview not coarser than the read and never holds more than the rows it is resampling. A
resampled pixel is valid when any pixel behind it is (GDAL's average skips nodata, alpha-0 and masked
pixels; a NaN sample without a nodata value makes the pixel NaN, hence invalid).

Georeferencing: ``crs`` is ``"EPSG:n"`` (or another ``AUTH:CODE``) when the CRS has an authority code,
else WKT; ``transform`` is ``[a, b, c, d, e, f]`` in rasterio's affine order, ``None`` without
georeferencing. Rotated and sheared transforms are kept as they are. A file georeferenced only by GCPs
gets the affine transform fitted to its GCPs, with a warning; without a CRS the result is pixel-only,
with a warning, never an error. Sidecar files (``.aux.xml``, ``.msk``, world files) are never read.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy.typing as npt
import rasterio
from rasterio._err import CPLE_BaseError
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.transform import from_gcps
from rasterio.windows import Window as RasterioWindow

from gateway.errors import CorruptRaster, GatewayError, UnsupportedRaster
from gateway.pipeline.raster.cutter import BlockSource, Tile, TileCutter, read_step
from gateway.pipeline.raster.policy import (
    BandLayout,
    BandPlan,
    Colour,
    GeorefSource,
    RasterInfo,
    ReadOptions,
    Samples,
    Scaling,
    SourceDescription,
    Stretch,
    Window,
    by_band,
    check_budgets,
    choose_layout,
    compute_stretch,
    stretch_sample,
)
from gateway.pipeline.raster.sniff import SNIFF_BYTES, Driver, allowed_driver
from gateway.pipeline.resolution import SourceArea, plan_resolution, source_area
from gateway.pipeline.tiling import TileSpec
from gateway.settings import LimitSettings

logger = logging.getLogger(__name__)

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
    # A small block cache (bytes): each block is read once (see TileCutter), so the cache only serves
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


def open_raster(path: Path, limits: LimitSettings, options: ReadOptions | None = None) -> RasterReader:
    """Open the raster at ``path`` for tiled reading, after checking its format and budgets.

    Use as a context manager (``with open_raster(...) as reader``) so the dataset is closed. A reader
    must be used from the thread that opened it.

    Args:
        path: a local regular file (never a URL or GDAL ``/vsi`` path).
        limits: width/height/band/decoded-byte budgets, checked before any pixel is decoded.
        options: band mapping, pixel limit, and the model's GSD range with the caller's choices.

    Returns:
        A reader whose :attr:`~RasterReader.info` describes the file and how it will be read.

    Raises:
        UnsupportedMediaType: the bytes are not TIFF, PNG or JPEG.
        CorruptRaster: the file cannot be parsed, or the pixels sampled for the stretch cannot be decoded.
        UnsupportedRaster: a valid file we cannot turn into RGB (complex samples, missing codec, a
            giant single block).
        RasterTooLarge: a budget is exceeded.
        InvalidParameter: ``options.bands`` names a band the file does not have.
        ResolutionOutOfRange: the file's GSD is far coarser than the model's range (and the caller did
            not turn resampling off).
        ValueError: ``path`` is not a local regular file (a programming error, not user input).
    """
    return RasterReader(path, limits, options or ReadOptions())


class RasterReader:
    """An open raster: :attr:`info`, then :meth:`tiles`. Create with :func:`open_raster`.

    Attributes:
        info: what was opened and how it is read.
        plan: how its bands become uint8 RGB and validity (what :class:`TileCutter` needs).
    """

    def __init__(self, path: Path, limits: LimitSettings, options: ReadOptions) -> None:
        local = Path(os.path.abspath(path))
        if str(local).startswith("/vsi") or not local.is_file():
            raise ValueError(f"not a local regular file: {path}")
        self._path = local
        self._cutter: TileCutter | None = None
        self._stack = ExitStack()
        try:
            with local.open("rb") as fh:
                head = fh.read(SNIFF_BYTES)
            driver = allowed_driver(head, options.drivers)
            self._stack.enter_context(rasterio.Env(**GDAL_ENV))
            self._src = self._open(driver)
            self._stack.callback(self._src.close)
            try:
                src = self._src
                check_budgets(
                    int(src.width),
                    int(src.height),
                    int(src.count),
                    str(src.dtypes[0]),
                    limits,
                    options.max_pixels,
                )
                layout = choose_layout(self._describe_source(), options.bands)
                if layout.block_shape[0] > read_step(layout.block_shape[0]):
                    # One block spans several reads: keep it cached so it is still decoded once.
                    self._stack.enter_context(
                        rasterio.Env(GDAL_CACHEMAX=BASE_CACHE_BYTES + layout.block_bytes)
                    )
                self.plan = BandPlan(layout, self._stretch(layout))
                self.info = self._describe(driver, options)
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

    @property
    def skipped(self) -> int:
        """Tiles skipped by the last :meth:`tiles` call because none of their pixels is valid."""
        return 0 if self._cutter is None else self._cutter.skipped

    def tiles(self, specs: Sequence[TileSpec]) -> Iterator[Tile]:
        """Cut the tiles ``specs`` (from :func:`~gateway.pipeline.tiling.tile_grid`) out of the image.

        Tiles come in row-major order of their windows (by ``y``, then ``x``), whatever the order of
        ``specs``; tiles without any valid pixel are skipped and counted in :attr:`skipped`. Windows are
        in pixels of the image as it is read: ``info.read_width`` x ``info.read_height``, the file
        resampled when ``info.resample_factor`` is above 1.

        Raises:
            ValueError: a window of ``specs`` is outside the image or larger than a tile.
            CorruptRaster: a block cannot be decoded (damaged or truncated data).
            UnsupportedRaster: the codec of a block is not available.
        """
        self._cutter = None
        if not specs:
            return
        info = self.info
        source: BlockSource = self if info.read_size == (info.width, info.height) else _Resampled(self)
        self._cutter = TileCutter(source, self.plan, info.read_width, info.read_height, specs)
        yield from self._cutter.tiles()

    def read(
        self,
        bands: Sequence[int],
        window: Window,
        out: npt.NDArray[Any] | None = None,
        *,
        shape: tuple[int, int] | None = None,
    ) -> npt.NDArray[Any]:
        """Samples of the 1-based ``bands`` in ``window``, ``(len(bands), rows, cols)``.

        Args:
            bands: 1-based band numbers.
            window: the pixels to read.
            out: an array to read into (and return) instead of a new one.
            shape: ``(rows, cols)`` to read the window at, by nearest neighbour (from an overview where
                the file has one); ``None`` for the window's own size.

        Raises:
            CorruptRaster: a block cannot be decoded (damaged or truncated data).
            UnsupportedRaster: the codec of a block is not available.
        """
        return self._read_area(bands, _area(window), shape, out, Resampling.nearest)

    def read_mask(
        self, band: int, window: Window, *, shape: tuple[int, int] | None = None
    ) -> npt.NDArray[Any]:
        """The file's stored mask of ``band`` in ``window``, ``(rows, cols)`` uint8, 0 where invalid.

        Args:
            band: 1-based band number.
            window: the pixels to read.
            shape: ``(rows, cols)`` to read the window at; ``None`` for the window's own size.

        Raises:
            CorruptRaster: a block cannot be decoded (damaged or truncated data).
            UnsupportedRaster: the codec of a block is not available.
        """
        return self._read_mask_area(band, _area(window), shape, Resampling.nearest)

    # -- internals ---------------------------------------------------------------------------------

    def _read_area(
        self,
        bands: Sequence[int],
        area: SourceArea,
        shape: tuple[int, int] | None,
        out: npt.NDArray[Any] | None,
        resampling: Resampling,
    ) -> npt.NDArray[Any]:
        """Samples of ``bands`` in a (fractional) source ``area``, at ``shape`` or its own size."""
        out_shape = None if shape is None or out is not None else (len(bands), *shape)
        try:
            data: npt.NDArray[Any] = self._src.read(
                list(bands),
                window=_rasterio_window(area),
                out=out,
                out_shape=out_shape,
                resampling=resampling,
            )
        except (RasterioError, CPLE_BaseError) as exc:
            raise self._decode_error(exc, area) from exc
        return data

    def _read_mask_area(
        self, band: int, area: SourceArea, shape: tuple[int, int] | None, resampling: Resampling
    ) -> npt.NDArray[Any]:
        try:
            mask: npt.NDArray[Any] = self._src.read_masks(
                band, window=_rasterio_window(area), out_shape=shape, resampling=resampling
            )
        except (RasterioError, CPLE_BaseError) as exc:
            raise self._decode_error(exc, area) from exc
        return mask

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

    def _decode_error(self, exc: BaseException, area: SourceArea) -> GatewayError:
        reason = self._reason(exc)
        if "missing codec" in reason.lower():
            return UnsupportedRaster(f"A block uses a compression this server cannot decode ({reason}).")
        return CorruptRaster(
            f"Pixel data cannot be decoded near rows {math.floor(area.row_off)}-"
            f"{math.ceil(area.row_off + area.height)} ({reason}); the file is damaged or truncated."
        )

    def _describe_source(self) -> SourceDescription:
        """The open file as the plain values :func:`~gateway.pipeline.raster.policy.choose_layout` reads."""
        src = self._src
        interp = tuple(src.colorinterp)
        return SourceDescription(
            dtypes=tuple(str(d) for d in src.dtypes),
            colour_interp=tuple(ci.name for ci in interp),
            stored_mask=tuple(_stored_mask(set(flags)) for flags in src.mask_flag_enums),
            nodata=tuple(None if v is None else float(v) for v in src.nodatavals),
            nbits=tuple(_nbits(src.tags(b, ns="IMAGE_STRUCTURE")) for b in range(1, len(interp) + 1)),
            colormaps=tuple(
                self._colormap(i + 1) if ci == ColorInterp.palette else None for i, ci in enumerate(interp)
            ),
            block_shape=(int(src.block_shapes[0][0]), int(src.block_shapes[0][1])),
        )

    def _colormap(self, band: int) -> tuple[tuple[int, tuple[int, ...]], ...] | None:
        try:
            colormap = self._src.colormap(band)
        except (RasterioError, CPLE_BaseError, ValueError):
            return None
        return tuple((int(index), tuple(int(v) for v in entry)) for index, entry in colormap.items())

    def _stretch(self, layout: BandLayout) -> Stretch | None:
        """The percentile stretch of ``layout``, from the pixels the policy says to sample."""
        if layout.scaling is not Scaling.PERCENTILE:
            return None
        src = self._src
        factors = [int(f) for f in src.overviews(layout.colour_bands[0])]
        sample = stretch_sample(int(src.width), int(src.height), layout.block_shape, factors)
        return compute_stretch(
            layout, self._sample_reads(layout, sample.windows, sample.out_shape), sample.source
        )

    def _sample_reads(
        self, layout: BandLayout, windows: Sequence[Window], out_shape: tuple[int, int] | None
    ) -> Iterator[tuple[Samples, npt.NDArray[Any] | None]]:
        """The samples of ``layout.read_bands`` (and the stored mask) of each window, at ``out_shape``."""
        for window in windows:
            shape = out_shape or (window.height, window.width)
            samples = by_band(self.read(layout.read_bands, window, shape=shape), layout.read_bands)
            mask = None
            if layout.internal_mask:
                mask = self.read_mask(layout.colour_bands[0], window, shape=shape)
            yield samples, mask

    def _describe(self, driver: Driver, options: ReadOptions) -> RasterInfo:
        src, plan = self._src, self.plan
        layout = plan.layout
        notes = list(plan.warnings)
        crs, transform, georef = self._georeference(notes)
        resolution = plan_resolution(_gsd(crs, transform, src.width, src.height), options.resolution)
        notes.extend(resolution.warnings)
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
            band_map=layout.band_map,
            colour=layout.colour,
            alpha_band=layout.alpha_band,
            masking=layout.masking,
            nodata=layout.nodata_values[0] if layout.nodata_values else None,
            scaling=layout.scaling,
            stretch=plan.stretch.ranges if plan.stretch is not None else None,
            scaling_source=plan.stretch.source if plan.stretch is not None else None,
            block_shape=layout.block_shape,
            compression=str(compression) if compression is not None else None,
            warnings=tuple(notes),
            gsd_m=resolution.gsd_m,
            gsd_source=resolution.gsd_source,
            inference_gsd_m=resolution.inference_gsd_m,
            resample_factor=resolution.factor,
        )

    def _georeference(
        self, notes: list[str]
    ) -> tuple[str | None, tuple[float, float, float, float, float, float] | None, GeorefSource]:
        src = self._src
        try:
            crs_obj = src.crs
        except CRSError as exc:
            crs_obj = None
            notes.append(f"The CRS cannot be interpreted ({exc}); results are in pixel coordinates.")
        affine = src.transform
        georef = GeorefSource.TRANSFORM
        if affine.is_identity:
            try:
                gcps, gcp_crs = src.gcps
            except CRSError:
                gcps, gcp_crs = [], None
            if len(gcps) >= 3 and gcp_crs is not None:
                affine = from_gcps(gcps)
                crs_obj = gcp_crs
                georef = GeorefSource.GCPS
                notes.append(
                    f"Georeferenced by an affine fit to {len(gcps)} ground control points; "
                    "positions are approximate."
                )
            elif gcps:
                notes.append(
                    f"The file has {len(gcps)} ground control points but no usable CRS for them; "
                    "results are in pixel coordinates."
                )
                return None, None, GeorefSource.NONE
            else:
                georef = GeorefSource.NONE
        transform = None if affine.is_identity else _affine_tuple(affine)
        crs = _crs_string(crs_obj) if crs_obj else None
        if transform is not None and not all(math.isfinite(v) for v in transform):
            notes.append("The geotransform is not finite; results are in pixel coordinates.")
            transform, georef = None, GeorefSource.NONE
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
        return crs, transform, georef if transform is not None else GeorefSource.NONE


def _gsd(crs: str | None, transform: Sequence[float] | None, width: int, height: int) -> float | None:
    from gateway.pipeline import geo

    if crs is None or transform is None:
        return None
    size = geo.ground_sample_distance(crs, transform, width, height)
    return round(size, 4) if size is not None else None


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


class _Resampled:
    """The open file as the tile cutter reads it when it is resampled: windows of the image at
    ``info.read_width`` x ``info.read_height`` (see the module docstring)."""

    def __init__(self, reader: RasterReader) -> None:
        info = reader.info
        self._reader = reader
        self._source = (info.width, info.height)
        self._read = info.read_size
        # Averaging palette indices would invent colours; every other layout averages its samples.
        palette = reader.plan.layout.colour is Colour.PALETTE
        self._resampling = Resampling.nearest if palette else Resampling.average

    def read(
        self, bands: Sequence[int], window: Window, out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        shape = (window.height, window.width)
        return self._reader._read_area(bands, self._area(window), shape, out, self._resampling)

    def read_mask(self, band: int, window: Window) -> npt.NDArray[Any]:
        shape = (window.height, window.width)
        return self._reader._read_mask_area(band, self._area(window), shape, self._resampling)

    def _area(self, window: Window) -> SourceArea:
        return source_area(
            window.col_off, window.row_off, window.width, window.height, self._source, self._read
        )


def _area(window: Window) -> SourceArea:
    return SourceArea(window.col_off, window.row_off, window.width, window.height)


def _rasterio_window(area: SourceArea) -> RasterioWindow:
    return RasterioWindow(area.col_off, area.row_off, area.width, area.height)


def _stored_mask(flags: set[MaskFlags]) -> bool:
    """Whether GDAL's mask flags of a band say the file stores a mask for it: a per-dataset mask not
    derived from an alpha band, or (no flag at all) a mask band of its own."""
    return (MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags) or not flags


def _nbits(structure: dict[str, str]) -> int | None:
    """The ``NBITS`` of a band's IMAGE_STRUCTURE metadata, where it is an integer."""
    try:
        return int(structure["NBITS"])
    except (KeyError, ValueError):
        return None

"""How a raster is read: budgets, bands, colour, scaling and validity (also in ``docs/raster-policy.md``).

Pure code over plain values. The reader describes the opened file as a :class:`SourceDescription`
(nothing from rasterio crosses into this module); :func:`choose_layout` turns it into a
:class:`BandLayout`; for percentile scaling, :func:`stretch_sample` says which pixels to sample and
:func:`compute_stretch` turns the samples into a :class:`Stretch`; the two make the :class:`BandPlan`
that converts every window of the file.

* **Budgets** (:func:`check_budgets`), from the header alone, before any pixel is decoded: width,
  height, bands and decoded bytes (:class:`~gateway.settings.LimitSettings`) and the caller's pixel
  limit (:attr:`ReadOptions.max_pixels`) raise :class:`RasterTooLarge`. A block (tile or strip, all
  bands) larger than :data:`MAX_BLOCK_BYTES` is refused with :class:`UnsupportedRaster`, since decoding
  it would need that much memory at once.
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
  tile and ``False`` in :attr:`~gateway.pipeline.raster.cutter.Tile.valid`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.errors import InvalidParameter, RasterTooLarge, UnsupportedRaster
from gateway.pipeline.resolution import GsdSource, ResolutionRequest, scaled_size
from gateway.settings import LimitSettings

UInt8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
Samples = dict[int, npt.NDArray[Any]]
"""Source samples of one window, by 1-based band number."""

STRETCH_LOW_PERCENTILE: Final = 2.0
STRETCH_HIGH_PERCENTILE: Final = 98.0
STRETCH_SAMPLE_PIXELS: Final = 4_000_000
"""Upper bound on the pixels sampled (per band) to compute the percentile stretch."""
STRETCH_OVERVIEW_MIN_SIDE: Final = 256
MAX_BLOCK_BYTES: Final = 128 * 1024**2
"""Largest single block (tile or strip, all bands) we agree to decode."""


class Colour(StrEnum):
    """How the selected bands become RGB."""

    RGB = "rgb"
    GREY = "grey"
    PALETTE = "palette"


class Scaling(StrEnum):
    """How samples become 0-255."""

    NONE = "none"
    NBITS = "nbits"
    """1/2/4-bit data scaled to 0-255."""
    PERCENTILE = "percentile"
    """The 2-98 percentile stretch."""


class GeorefSource(StrEnum):
    """Where a file's ``crs``/``transform`` come from."""

    TRANSFORM = "transform"
    GCPS = "gcps"
    """An affine transform fitted to ground control points."""
    NONE = "none"


class MaskSource(StrEnum):
    """A source of invalid pixels."""

    NODATA = "nodata"
    NAN = "nan"
    ALPHA = "alpha"
    MASK = "mask"
    PALETTE_ALPHA = "palette-alpha"


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """Per-request reading choices.

    Attributes:
        bands: 1-based source bands for red, green, blue (``(3, 2, 1)``), or one band read as grey
            (``(4,)``); ``None`` applies the default policy (see the module docstring).
        max_pixels: refuse images with more pixels than this (:class:`RasterTooLarge`); ``None`` for no
            limit beyond :class:`~gateway.settings.LimitSettings`.
        drivers: the formats this upload may be (``("GTiff",)`` for a file named ``.tif``, see
            :func:`~gateway.pipeline.raster.sniff.drivers_for_name`); ``None`` accepts GeoTIFF, PNG and
            JPEG by content.
        resolution: the model's GSD range and the caller's choices (:mod:`gateway.pipeline.resolution`);
            ``None`` reads the file at its own resolution whatever its GSD.
    """

    bands: tuple[int, ...] | None = None
    max_pixels: int | None = None
    drivers: tuple[str, ...] | None = None
    resolution: ResolutionRequest | None = None


@dataclass(frozen=True, slots=True)
class RasterInfo:
    """What was opened and how it will be read; plain values only (it crosses process boundaries).

    The enumerated fields are :class:`~enum.StrEnum` members, so JSON shows their plain strings; built
    from those strings (as the decode workers' wire format does), they become members again.

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
        gsd_m: the ground sample distance at the image's centre in metres
            (:func:`gateway.pipeline.geo.ground_sample_distance`), or the caller's for a file without
            georeferencing; ``None`` when unknown.
        gsd_source: where ``gsd_m`` comes from (``"file"`` or ``"caller"``).
        inference_gsd_m: the GSD the tiles are cut at: ``gsd_m`` unless the file is resampled.
        resample_factor: source pixels per tile pixel along each axis; above 1 the tiles are cut from
            the image resampled to :attr:`read_width` x :attr:`read_height`
            (:mod:`gateway.pipeline.resolution`).
    """

    driver: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float] | None
    georef: GeorefSource
    band_map: tuple[int, int, int]
    colour: Colour
    alpha_band: int | None
    masking: tuple[MaskSource, ...]
    nodata: float | None
    scaling: Scaling
    stretch: tuple[tuple[float, float], ...] | None
    scaling_source: str | None
    block_shape: tuple[int, int]
    compression: str | None
    warnings: tuple[str, ...] = ()
    gsd_m: float | None = None
    gsd_source: GsdSource | None = None
    inference_gsd_m: float | None = None
    resample_factor: float = 1.0

    def __post_init__(self) -> None:
        # Plain strings (from JSON) become enum members; members stay as they are.
        object.__setattr__(self, "georef", GeorefSource(self.georef))
        if self.gsd_source is not None:
            object.__setattr__(self, "gsd_source", GsdSource(self.gsd_source))
        object.__setattr__(self, "colour", Colour(self.colour))
        object.__setattr__(self, "scaling", Scaling(self.scaling))
        object.__setattr__(self, "masking", tuple(MaskSource(m) for m in self.masking))

    @property
    def read_size(self) -> tuple[int, int]:
        """``(width, height)`` of the image the tiles are cut from: the file's own, or resampled."""
        return scaled_size(self.width, self.height, self.resample_factor)

    @property
    def read_width(self) -> int:
        """Pixels per row of the image the tiles are cut from."""
        return self.read_size[0]

    @property
    def read_height(self) -> int:
        """Rows of the image the tiles are cut from."""
        return self.read_size[1]


@dataclass(frozen=True, slots=True)
class Window:
    """A rectangle of image pixels: columns ``[col_off, col_off + width)``, rows ``[row_off, row_off +
    height)``."""

    col_off: int
    row_off: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class SourceDescription:
    """What the policy needs to know about an opened file, as plain values.

    Per-band tuples hold band ``b`` (1-based) at index ``b - 1``.

    Attributes:
        dtypes: the sample type of each band (``"uint8"``, ``"float32"``, ...).
        colour_interp: GDAL's colour interpretation name of each band (``"red"``, ``"green"``,
            ``"blue"``, ``"alpha"``, ``"palette"``, ``"gray"``, ``"undefined"``, ...).
        stored_mask: whether the file stores a mask for the band (a per-dataset mask not derived from
            an alpha band, or a mask band of its own).
        nodata: the nodata value of each band, if any.
        nbits: the ``NBITS`` image-structure metadata of each band, where it is an integer.
        colormaps: the colour table of each palette band as ``(index, (r, g, b, a))`` entries; ``None``
            for other bands and for palette bands whose table cannot be read.
        block_shape: ``(rows, cols)`` of the first band's blocks (tiles or strips).
    """

    dtypes: tuple[str, ...]
    colour_interp: tuple[str, ...]
    stored_mask: tuple[bool, ...]
    nodata: tuple[float | None, ...]
    nbits: tuple[int | None, ...]
    colormaps: tuple[tuple[tuple[int, tuple[int, ...]], ...] | None, ...]
    block_shape: tuple[int, int]

    @property
    def count(self) -> int:
        """Bands in the file."""
        return len(self.dtypes)


@dataclass(frozen=True, slots=True)
class BandLayout:
    """Which source bands become uint8 RGB and a validity mask, and how; chosen by :func:`choose_layout`.

    Attributes:
        colour: how the bands become RGB.
        band_map: 1-based source bands for red, green, blue (equal for grey and palette).
        colour_bands: the distinct bands of ``band_map``, in first-use order.
        read_bands: ``colour_bands`` plus the alpha band: the bands read for every window.
        alpha_band: the band used as alpha, if any.
        internal_mask: whether the file's stored mask of the first colour band is read.
        nodata_values: the nodata value of each colour band; empty unless every one has one.
        dtype: the sample type of every band.
        scaling: how samples become 0-255.
        nbits: bits per sample of the first mapped band (8 unless the file says fewer).
        block_shape: ``(rows, cols)`` of the file's blocks.
        palette: ``(entries, 4)`` RGBA lookup table of a palette band.
        masking: the sources of invalid pixels.
        warnings: what the user should know about the choice.
    """

    colour: Colour
    band_map: tuple[int, int, int]
    colour_bands: tuple[int, ...]
    read_bands: tuple[int, ...]
    alpha_band: int | None
    internal_mask: bool
    nodata_values: tuple[float, ...]
    dtype: np.dtype[Any]
    scaling: Scaling
    nbits: int
    block_shape: tuple[int, int]
    palette: UInt8Array | None
    masking: tuple[MaskSource, ...]
    warnings: tuple[str, ...]

    @property
    def direct(self) -> bool:
        """Source samples are the output samples: read straight into the tile buffer."""
        return self.scaling is Scaling.NONE and self.colour in (Colour.RGB, Colour.GREY)

    @property
    def channels(self) -> int:
        """Channels held in the row buffer (grey is broadcast to RGB only when a tile is cut)."""
        return 1 if self.colour is Colour.GREY else 3

    @property
    def can_mask(self) -> bool:
        """Whether any pixel can be invalid (besides padding)."""
        return bool(self.masking)

    @property
    def block_bytes(self) -> int:
        """Decoded bytes of one block of :attr:`read_bands`."""
        block_h, block_w = self.block_shape
        return block_h * block_w * len(self.read_bands) * self.dtype.itemsize

    def validity(self, samples: Samples, mask: npt.NDArray[Any] | None) -> BoolArray | None:
        """Valid pixels given the source ``samples`` of :attr:`read_bands` and the file's stored
        ``mask`` (read when :attr:`internal_mask`); ``None`` if all are valid."""
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
        if self.palette is not None and MaskSource.PALETTE_ALPHA in self.masking:
            narrow(self.palette[:, 3][_palette_index(colour[0], self.palette)] > 0)
        return valid


@dataclass(frozen=True, slots=True)
class Stretch:
    """The percentile stretch of a file, shared by all its tiles.

    Attributes:
        ranges: per output channel, the ``(low, high)`` source values mapped to 0 and 255.
        source: where the percentiles were computed (``"all pixels"``, ``"overview 1/8"``,
            ``"12 sampled blocks"``).
        warnings: what the user should know about it.
    """

    ranges: tuple[tuple[float, float], ...]
    source: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BandPlan:
    """The complete recipe for turning windows of a file into uint8 RGB: a layout and its stretch.

    Attributes:
        layout: the bands, colour, scaling and masking.
        stretch: the percentile stretch; given exactly when the layout's scaling is percentile.

    Raises:
        ValueError: ``stretch`` is missing for percentile scaling, or given for another scaling.
    """

    layout: BandLayout
    stretch: Stretch | None = None

    def __post_init__(self) -> None:
        if (self.layout.scaling is Scaling.PERCENTILE) != (self.stretch is not None):
            raise ValueError(f"a stretch is needed exactly for percentile scaling, not {self.layout.scaling}")

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the user should know about how the file is read."""
        return self.layout.warnings + (self.stretch.warnings if self.stretch is not None else ())

    def convert(self, samples: Samples, out: UInt8Array) -> None:
        """Write the source ``samples`` as uint8 into ``out`` (``(channels, h, w)``)."""
        layout = self.layout
        if layout.colour is Colour.PALETTE:
            assert layout.palette is not None
            lut = np.ascontiguousarray(layout.palette[:, :3].T)
            np.take(lut, _palette_index(samples[layout.band_map[0]], layout.palette), axis=1, out=out)
            return
        if layout.scaling is Scaling.NBITS:
            top = (1 << layout.nbits) - 1
            for c in range(layout.channels):
                values = samples[layout.band_map[c]]
                out[c] = (np.minimum(values, top).astype(np.uint16) * 255 + top // 2) // top
            return
        assert self.stretch is not None
        for c in range(layout.channels):
            low, high = self.stretch.ranges[c]
            _stretch_into(samples[layout.band_map[c]], low, high, out[c])


@dataclass(frozen=True, slots=True)
class StretchSample:
    """Where the stretch percentiles are sampled (see :func:`stretch_sample`).

    Attributes:
        windows: the image windows to read.
        out_shape: ``(rows, cols)`` to read each window at (nearest neighbour, i.e. from an overview);
            ``None`` for full resolution.
        source: a description for :attr:`Stretch.source`.
    """

    windows: tuple[Window, ...]
    out_shape: tuple[int, int] | None
    source: str


def check_budgets(
    width: int, height: int, count: int, dtype: str, limits: LimitSettings, max_pixels: int | None
) -> None:
    """Size budgets from the header alone; nothing is decoded before these pass.

    Raises:
        RasterTooLarge: a budget of ``limits`` or the ``max_pixels`` of the request is exceeded.
    """
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
    decoded = width * height * count * np.dtype(dtype).itemsize
    if decoded > limits.max_decoded_bytes:
        raise RasterTooLarge(
            f"Decoded, the image would take {decoded / 1024**3:,.1f} GiB ({width:,} x {height:,} x "
            f"{count} x {dtype}); the limit is {limits.max_decoded_bytes / 1024**3:,.1f} GiB.",
            limit="decoded_bytes",
            decoded_bytes=decoded,
        )
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise RasterTooLarge(
            f"The image has {pixels:,} pixels ({width:,} x {height:,}), above the {max_pixels:,} "
            "pixel limit of a direct request; run it with `palm-serve predict`, which has no pixel limit.",
            limit="max_pixels",
            pixels=pixels,
            max_pixels=max_pixels,
        )


def choose_layout(source: SourceDescription, bands: tuple[int, ...] | None = None) -> BandLayout:
    """Choose source bands, colour conversion, masking and scaling for ``source`` (the policy).

    Args:
        source: the opened file, described.
        bands: the request's band choice (:attr:`ReadOptions.bands`); ``None`` for the default.

    Raises:
        UnsupportedRaster: complex or mixed sample types, no band, or a block above
            :data:`MAX_BLOCK_BYTES`.
        InvalidParameter: ``bands`` does not fit the file.
    """
    count = source.count
    interp = source.colour_interp
    dtypes = set(source.dtypes)
    dtype = np.dtype(source.dtypes[0])
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
    alpha = next((i + 1 for i, ci in enumerate(interp) if ci == "alpha"), None)
    colour = Colour.RGB
    if bands is not None:
        if len(bands) not in (1, 3) or any(not 1 <= b <= count for b in bands):
            raise InvalidParameter(
                f"bands={','.join(map(str, bands))} does not fit this image: give 1 or 3 band numbers "
                f"between 1 and {count}.",
                bands=list(bands),
                count=count,
            )
        if len(bands) == 1:
            band_map = (bands[0],) * 3
            colour = Colour.PALETTE if interp[bands[0] - 1] == "palette" else Colour.GREY
        else:
            band_map = (bands[0], bands[1], bands[2])
        if alpha in band_map:
            alpha = None
    elif all(ci in interp for ci in ("red", "green", "blue")):
        band_map = (interp.index("red") + 1, interp.index("green") + 1, interp.index("blue") + 1)
    elif interp[0] == "palette":
        colour, band_map = Colour.PALETTE, (1, 1, 1)
    elif count <= 2:
        colour, band_map = Colour.GREY, (1, 1, 1)
        if count == 2 and alpha != 2:
            notes.append("2 bands without an alpha band: band 1 is read as grey, band 2 is ignored.")
    else:
        picks = [b for b in range(1, count + 1) if b != alpha][:3]
        if len(picks) < 3:
            colour, band_map = Colour.GREY, (picks[0],) * 3
        else:
            band_map = (picks[0], picks[1], picks[2])
        if count - (alpha is not None) > 3:
            names = ", ".join(interp[:8])
            notes.append(
                f"{count} bands ({names}) without red/green/blue colour interpretation: bands "
                f"{','.join(map(str, band_map))} are read as R,G,B; choose others with bands=."
            )
    colour_bands = tuple(dict.fromkeys(band_map))
    if colour is Colour.GREY and interp[band_map[0] - 1] == "palette":
        colour = Colour.PALETTE
    read_bands = colour_bands + ((alpha,) if alpha is not None and alpha not in colour_bands else ())

    palette: UInt8Array | None = None
    if colour is Colour.PALETTE:
        palette = _palette_table(source.colormaps[band_map[0] - 1], dtype)
        if palette is None:
            colour = Colour.GREY
            notes.append("The palette band has no usable colour table; it is read as grey.")
    internal_mask = any(source.stored_mask[b - 1] for b in colour_bands)
    nodata_values = tuple(v for v in (source.nodata[b - 1] for b in colour_bands) if v is not None)
    if len(nodata_values) < len(colour_bands):
        nodata_values = ()

    declared_nbits = source.nbits[band_map[0] - 1]
    nbits = 8 if declared_nbits is None else declared_nbits
    if colour is Colour.PALETTE:
        scaling = Scaling.NONE
    elif dtype == np.uint8:
        scaling = Scaling.NBITS if 1 <= nbits < 8 else Scaling.NONE
    else:
        scaling = Scaling.PERCENTILE

    masking: list[MaskSource] = []
    if nodata_values:
        masking.append(MaskSource.NODATA)
    if dtype.kind == "f":
        masking.append(MaskSource.NAN)
    if alpha is not None:
        masking.append(MaskSource.ALPHA)
    if internal_mask:
        masking.append(MaskSource.MASK)
    if palette is not None and bool((palette[:, 3] == 0).any()):
        masking.append(MaskSource.PALETTE_ALPHA)

    layout = BandLayout(
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
        block_shape=source.block_shape,
        palette=palette,
        masking=tuple(masking),
        warnings=tuple(notes),
    )
    block_h, block_w = layout.block_shape
    if layout.block_bytes > MAX_BLOCK_BYTES and block_h > 1:
        raise UnsupportedRaster(
            f"The image is stored in blocks of {block_w:,} x {block_h:,} pixels "
            f"({layout.block_bytes / 1024**2:,.0f} MiB decoded each); blocks above "
            f"{MAX_BLOCK_BYTES // 1024**2} MiB are not read. Re-save it tiled (e.g. gdal_translate -co "
            "TILED=YES) or with smaller strips."
        )
    return layout


def stretch_sample(
    width: int, height: int, block_shape: tuple[int, int], overview_factors: Sequence[int]
) -> StretchSample:
    """Where to sample the stretch of a ``width`` x ``height`` image (see the module docstring).

    Args:
        width: pixels per row.
        height: rows.
        block_shape: ``(rows, cols)`` of the file's blocks.
        overview_factors: decimation factors of the file's internal overviews (``[2, 4, 8]``).
    """
    usable = [
        f
        for f in overview_factors
        if f > 1
        and math.ceil(width / f) * math.ceil(height / f) <= STRETCH_SAMPLE_PIXELS
        and min(math.ceil(width / f), math.ceil(height / f)) >= STRETCH_OVERVIEW_MIN_SIDE
    ]
    whole = (Window(0, 0, width, height),)
    if width * height <= STRETCH_SAMPLE_PIXELS:
        return StretchSample(whole, None, "all pixels")
    if usable:
        factor = min(usable)
        return StretchSample(
            whole, (math.ceil(height / factor), math.ceil(width / factor)), f"overview 1/{factor}"
        )
    windows = sample_windows(width, height, block_shape)
    return StretchSample(windows, None, f"{len(windows)} sampled blocks")


def sample_windows(width: int, height: int, block_shape: tuple[int, int]) -> tuple[Window, ...]:
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
    return tuple(windows)


def compute_stretch(
    layout: BandLayout, windows: Iterable[tuple[Samples, npt.NDArray[Any] | None]], source: str
) -> Stretch:
    """The 2-98 percentile stretch of the valid pixels in the sampled ``windows``.

    Args:
        layout: how the file is read (its colour bands and validity).
        windows: per sampled window, the samples of :attr:`BandLayout.read_bands` and the stored mask
            (``None`` unless :attr:`BandLayout.internal_mask`).
        source: where the windows come from (:attr:`StretchSample.source`).
    """
    collected: dict[int, list[npt.NDArray[np.float64]]] = {b: [] for b in layout.colour_bands}
    for samples, mask in windows:
        valid = layout.validity(samples, mask)
        for band in layout.colour_bands:
            values = samples[band]
            selected = values if valid is None else values[valid]
            collected[band].append(selected.astype(np.float64, copy=False).ravel())
    pooled = {b: np.concatenate(v) if v else np.zeros(0) for b, v in collected.items()}
    notes: list[str] = []
    empty = [band for band in layout.colour_bands if pooled[band].size == 0]
    if empty:
        notes.append(
            f"No valid pixel in the stretch sample of band(s) {','.join(map(str, empty))}; "
            f"the full {layout.dtype} range is mapped to 0-255 there."
        )
    ranges: list[tuple[float, float]] = []
    for band in layout.colour_bands:
        values = pooled[band]
        if values.size == 0:
            low, high = _dtype_range(layout.dtype)
        else:
            low, high = (
                float(v) for v in np.percentile(values, [STRETCH_LOW_PERCENTILE, STRETCH_HIGH_PERCENTILE])
            )
        if not high > low:
            high = low + 1.0 if abs(low) < 1e300 else low
        ranges.append((low, high))
    by_band = dict(zip(layout.colour_bands, ranges, strict=True))
    return Stretch(tuple(by_band[b] for b in layout.band_map), source, tuple(notes))


def by_band(stack: npt.NDArray[Any], bands: Sequence[int]) -> Samples:
    """The ``(bands, h, w)`` array ``stack`` of the 1-based ``bands`` as :data:`Samples`."""
    return {band: stack[i] for i, band in enumerate(bands)}


def _palette_table(
    colormap: Iterable[tuple[int, tuple[int, ...]]] | None, dtype: np.dtype[Any]
) -> UInt8Array | None:
    if dtype not in (np.uint8, np.uint16):
        return None
    entries = dict(colormap or ())
    if not entries:
        return None
    size = 256 if dtype == np.uint8 else max(256, max(entries) + 1)
    table = np.zeros((size, 4), np.uint8)
    table[:, 3] = 255
    for index, entry in entries.items():
        if 0 <= index < size:
            table[index, : len(entry)] = np.clip(np.asarray(entry[:4], dtype=np.int64), 0, 255)
    return table


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


def _dtype_range(dtype: np.dtype[Any]) -> tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0

"""Seeded raster fixtures: every test image is written here, from a seed, never committed.

``make_geotiff`` writes a GeoTIFF with the layout under test (bands, dtype, nodata, alpha, internal
mask, palette, CRS or none, rotated transform, GCPs, tiled or striped, any compression GDAL has) and
``synthetic_bands`` regenerates the exact samples it wrote by default, so a test can assert that the
pixel at ``(x, y)`` of a tile is the pixel at ``(x, y)`` of the image.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

DEFAULT_ORIGIN = (500_000.0, 4_000_000.0)  # UTM metres: easting, northing of the top-left corner
DEFAULT_PIXEL_SIZE = 0.5

RANGES: dict[str, tuple[float, float]] = {
    "uint8": (0, 255),
    "int8": (-100, 100),
    "uint16": (100, 4000),
    "int16": (-1000, 3000),
    "uint32": (0, 100_000),
    "int32": (-50_000, 50_000),
    "float32": (-1.0, 1.0),
    "float64": (-1000.0, 1000.0),
}


def north_up(
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    pixel_size: float = DEFAULT_PIXEL_SIZE,
    rotation_deg: float = 0.0,
) -> Affine:
    """A north-up (or, with ``rotation_deg``, rotated) transform with its top-left corner at ``origin``."""
    return Affine.translation(*origin) @ Affine.rotation(rotation_deg) @ Affine.scale(pixel_size, -pixel_size)


def synthetic_bands(
    width: int, height: int, bands: int = 3, dtype: str = "uint8", seed: int = 0
) -> npt.NDArray[Any]:
    """Seeded ``(bands, height, width)`` samples spread over :data:`RANGES` for ``dtype``."""
    rng = np.random.default_rng(seed)
    low, high = RANGES[dtype]
    unit = rng.random((bands, height, width))
    values = low + unit * (high - low)
    if np.dtype(dtype).kind in "iu":
        values = np.rint(values)
    return values.astype(dtype)


def make_geotiff(
    path: Path,
    width: int = 64,
    height: int = 64,
    bands: int = 3,
    dtype: str = "uint8",
    crs: str | None = "EPSG:32633",
    nodata: float | None = None,
    *,
    seed: int = 0,
    data: npt.NDArray[Any] | None = None,
    transform: Affine | None = None,
    colorinterp: Sequence[ColorInterp] | None = None,
    mask: npt.NDArray[np.bool_] | None = None,
    palette: Mapping[int, tuple[int, ...]] | None = None,
    gcps: Sequence[GroundControlPoint] | None = None,
    gcp_crs: str | None = "EPSG:4326",
    tiled: bool = True,
    blocksize: int = 256,
    compress: str | None = "deflate",
    overviews: Sequence[int] = (),
    **creation_options: Any,
) -> Path:
    """Write a GeoTIFF and return its path.

    Args:
        path: where to write.
        width, height, bands, dtype: the raster's shape and sample type.
        crs: e.g. ``"EPSG:32633"``; ``None`` writes no CRS (and, unless ``transform`` is given, no
            geotransform either).
        nodata: the nodata value of every band.
        seed: seeds :func:`synthetic_bands` when ``data`` is not given.
        data: ``(bands, height, width)`` samples to write instead of the seeded ones.
        transform: the geotransform; north-up 0.5 m pixels at :data:`DEFAULT_ORIGIN` by default.
        colorinterp: colour interpretation per band (e.g. ``[gray, alpha]``; ``alpha`` marks an alpha
            band).
        mask: an internal per-dataset mask, True where valid.
        palette: a colour table for band 1 (``{index: (r, g, b[, a])}``).
        gcps: ground control points instead of a geotransform (in ``gcp_crs``).
        tiled, blocksize: tiled with square blocks, or striped with ``blocksize`` rows per strip.
        compress: any GDAL GTiff compression (``deflate``, ``lzw``, ``zstd``, ``jpeg``, ``webp``, ...).
        overviews: internal overview factors to build (e.g. ``(2, 4)``).
        creation_options: more GTiff creation options (``photometric="RGB"``, ``interleave="band"``).
    """
    pixels = data if data is not None else synthetic_bands(width, height, bands, dtype, seed)
    if pixels.shape != (bands, height, width):
        raise ValueError(f"data has shape {pixels.shape}, expected {(bands, height, width)}")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": bands,
        "dtype": dtype,
        "nodata": nodata,
        **creation_options,
    }
    if compress is not None:
        profile["compress"] = compress
    if tiled:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    else:
        profile.update(tiled=False, blockysize=blocksize)
    if gcps is None:
        if crs is not None:
            profile["crs"] = crs
        if transform is not None or crs is not None:
            profile["transform"] = transform if transform is not None else north_up()
    env = rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_PAM_ENABLED=False)
    with warnings.catch_warnings(), env:
        # Pixel-only fixtures are deliberate.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        _write(path, profile, pixels, gcps, gcp_crs, colorinterp, palette, mask, overviews)
    return path


def _write(
    path: Path,
    profile: dict[str, Any],
    pixels: npt.NDArray[Any],
    gcps: Sequence[GroundControlPoint] | None,
    gcp_crs: str | None,
    colorinterp: Sequence[ColorInterp] | None,
    palette: Mapping[int, tuple[int, ...]] | None,
    mask: npt.NDArray[np.bool_] | None,
    overviews: Sequence[int],
) -> None:
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        if gcps is not None:
            dst.gcps = (list(gcps), CRS.from_user_input(gcp_crs) if gcp_crs else CRS())
        if colorinterp is not None:
            dst.colorinterp = list(colorinterp)
        if palette is not None:
            dst.write_colormap(1, dict(palette))
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
        if overviews:
            dst.build_overviews(list(overviews))


def make_image(path: Path, data: npt.NDArray[np.uint8], driver: str = "PNG", **options: Any) -> Path:
    """Write ``data`` (``(bands, height, width)`` uint8) as a plain PNG or JPEG (no georeferencing)."""
    bands, height, width = data.shape
    with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED=False):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver=driver, width=width, height=height, count=bands, dtype="uint8", **options
        ) as dst:
            dst.write(data)
    return path


def sparse_bomb(path: Path, side: int = 100_000) -> Path:
    """A tiled GeoTIFF of a few hundred bytes claiming ``side x side`` pixels (nothing written)."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=side,
        height=side,
        count=1,
        dtype="uint8",
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        sparse_ok=True,
        crs="EPSG:3857",
        transform=north_up(),
    ):
        pass  # nothing written: a few hundred bytes claiming side x side pixels
    return path


def read_png(data: bytes) -> npt.NDArray[np.uint8]:
    """The pixels of PNG bytes as ``[rows, cols, bands]``, decoded by GDAL (not by the code under test)."""
    with warnings.catch_warnings(), MemoryFile(data) as memory:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a PNG has no georeferencing
        with memory.open() as dataset:
            assert dataset.driver == "PNG"
            return np.moveaxis(dataset.read(), 0, -1)

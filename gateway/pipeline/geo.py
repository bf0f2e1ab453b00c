"""Where pixels become places: pure georeferencing, no file I/O.

A raster's affine transform ``(a, b, c, d, e, f)`` (rasterio order) maps a pixel *corner* coordinate
``(x, y)`` (``(0, 0)`` is the top-left corner of the top-left pixel, ``(0.5, 0.5)`` its centre) to CRS
coordinates::

    X = a * x + b * y + c
    Y = d * x + e * y + f

``b`` and ``d`` are non-zero for rotated or sheared rasters, so a pixel box is georeferenced by
transforming all four of its corners (never just two), then reprojecting them to EPSG:4326.

Output follows RFC 7946: longitude before latitude, closed rings (first vertex repeated last),
exterior rings counter-clockwise. A box whose ring crosses the antimeridian is cut in two at 180°
and returned as a ``MultiPolygon``. A box that cannot be placed on WGS 84 (no CRS, a non-Earth CRS,
non-finite coordinates) gets ``None``; georeferencing never raises for a user's file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.warp import transform as warp_transform

logger = logging.getLogger(__name__)

WGS84 = "EPSG:4326"
FloatArray = npt.NDArray[np.float64]
GeoJSON = dict[str, Any]


class Georeferenced(Protocol):
    """Anything carrying a CRS string and an affine transform (e.g. ``RasterInfo``)."""

    @property
    def crs(self) -> str | None: ...

    @property
    def transform(self) -> Sequence[float] | None: ...


@dataclass(frozen=True, slots=True)
class Georef:
    """A CRS (``"EPSG:32633"``, ``"ESRI:102039"`` or WKT) and an affine transform in rasterio order."""

    crs: str
    transform: tuple[float, float, float, float, float, float]

    @staticmethod
    def of(source: Georeferenced | Georef | None) -> Georef | None:
        """The georeference of ``source``, or ``None`` when it lacks a CRS or a transform."""
        if source is None:
            return None
        if isinstance(source, Georef):
            return source
        crs, transform = source.crs, source.transform
        if not crs or transform is None or len(transform) < 6:
            return None
        values = tuple(float(v) for v in transform[:6])
        return Georef(crs, (values[0], values[1], values[2], values[3], values[4], values[5]))

    def to_crs(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Pixel corner coordinates to CRS coordinates (the affine transform)."""
        a, b, c, d, e, f = self.transform
        x = np.asarray(xs, dtype=np.float64)
        y = np.asarray(ys, dtype=np.float64)
        with np.errstate(all="ignore"):  # extreme transforms overflow to inf; callers check finiteness
            return a * x + b * y + c, d * x + e * y + f

    def from_crs(self, xs: npt.ArrayLike, ys: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """CRS coordinates to pixel corner coordinates (the inverse affine transform).

        Raises:
            ValueError: the transform is singular.
        """
        a, b, c, d, e, f = self.transform
        det = a * e - b * d
        if det == 0 or not math.isfinite(det):
            raise ValueError("the geotransform is not invertible")
        gx = np.asarray(xs, dtype=np.float64) - c
        gy = np.asarray(ys, dtype=np.float64) - f
        return (e * gx - b * gy) / det, (-d * gx + a * gy) / det


def pixels_to_lonlat(
    georef: Georeferenced | Georef, xs: npt.ArrayLike, ys: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Pixel corner coordinates to WGS 84 longitude/latitude (NaN where not transformable).

    Raises:
        ValueError: ``georef`` has no CRS or transform, or the CRS cannot be interpreted.
    """
    ref = _require(georef)
    x, y = ref.to_crs(xs, ys)
    return _reproject(ref.crs, WGS84, x, y)


def pixel_to_lonlat(georef: Georeferenced | Georef, x: float, y: float) -> tuple[float, float]:
    """One pixel corner coordinate to ``(lon, lat)``; use ``x + 0.5, y + 0.5`` for a pixel centre.

    Raises:
        ValueError: ``georef`` has no CRS or transform, the CRS cannot be interpreted, or the point
            has no WGS 84 position.
    """
    lon, lat = pixels_to_lonlat(georef, [x], [y])
    if not (math.isfinite(lon[0]) and math.isfinite(lat[0])):
        raise ValueError(f"pixel ({x}, {y}) has no WGS 84 position in this CRS")
    return float(lon[0]), float(lat[0])


def lonlat_to_pixel(georef: Georeferenced | Georef, lon: float, lat: float) -> tuple[float, float]:
    """``(lon, lat)`` in WGS 84 to the pixel corner coordinate ``(x, y)`` (fractional).

    Raises:
        ValueError: ``georef`` has no CRS or transform, the CRS cannot be interpreted, the transform is
            singular, or the point cannot be projected.
    """
    ref = _require(georef)
    gx, gy = _reproject(WGS84, ref.crs, np.array([lon], np.float64), np.array([lat], np.float64))
    if not (math.isfinite(gx[0]) and math.isfinite(gy[0])):
        raise ValueError(f"({lon}, {lat}) cannot be projected to this CRS")
    px, py = ref.from_crs(gx, gy)
    return float(px[0]), float(py[0])


def can_georeference(crs: str, transform: Sequence[float], width: int, height: int) -> bool:
    """Whether any of the corners or the centre of a ``width x height`` image has a WGS 84 position.

    Some of them may not (a geostationary image's corners look into space); boxes there get ``None``.
    """
    ref = Georef.of(_Plain(crs, transform))
    if ref is None:
        return False
    xs = np.array([0, width, width, 0, width / 2], np.float64)
    ys = np.array([0, 0, height, height, height / 2], np.float64)
    try:
        lon, lat = pixels_to_lonlat(ref, xs, ys)
    except ValueError:
        return False
    placed = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90)
    return bool(placed.any())


EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG); ground distances here are great-circle distances on that sphere."""


def ground_sample_distance(crs: str, transform: Sequence[float], width: int, height: int) -> float | None:
    """The side of one pixel on the ground at the image's centre, in metres.

    Measured, whatever the CRS (projected in metres or feet, geographic in degrees, rotated, fitted to
    GCPs), as ``sqrt(dx * dy)`` where ``dx`` and ``dy`` are the great-circle lengths of the centre
    pixel's two edges in WGS 84. Where the centre has no WGS 84 position (another planet's CRS), a
    projected CRS still gives the pixel's size in its linear unit, ``sqrt(|a e - b d|)`` in metres (on
    that body's surface, at the projection's true scale); otherwise ``None``.
    """
    ref = Georef.of(_Plain(crs, transform))
    if ref is None:
        return None
    cx, cy = width / 2, height / 2
    try:
        lon, lat = pixels_to_lonlat(ref, [cx, cx + 1, cx], [cy, cy, cy + 1])
    except ValueError:
        return None
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        return _projected_pixel_size(ref)
    dx = _great_circle(lon[0], lat[0], lon[1], lat[1])
    dy = _great_circle(lon[0], lat[0], lon[2], lat[2])
    size = math.sqrt(dx * dy)
    return size if size > 0 and math.isfinite(size) else None


def _projected_pixel_size(ref: Georef) -> float | None:
    """A pixel's side in metres from the transform of a projected CRS; ``None`` for any other CRS."""
    try:
        crs = _crs(ref.crs)
        if not crs.is_projected:
            return None
        _, metres_per_unit = crs.linear_units_factor
    except (ValueError, CRSError):
        return None
    a, b, _, d, e, _ = ref.transform
    with np.errstate(all="ignore"):
        size = (
            math.sqrt(abs(a * e - b * d)) * float(metres_per_unit)
            if math.isfinite(a * e - b * d)
            else math.inf
        )
    return size if size > 0 and math.isfinite(size) else None


def _great_circle(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Haversine distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def footprint(
    crs: str | None, transform: Sequence[float] | None, width: int, height: int
) -> list[list[float]] | None:
    """The image's four corners in WGS 84, ``[[lon, lat], ...]`` clockwise from the top-left corner
    (top-left, top-right, bottom-right, bottom-left: the order a map's image overlay takes).

    ``None`` without georeferencing, or when a corner has no WGS 84 position.
    """
    ref = Georef.of(_Plain(crs, transform))
    if ref is None or width <= 0 or height <= 0:
        return None
    try:
        lon, lat = pixels_to_lonlat(ref, [0, width, width, 0], [0, 0, height, height])
    except ValueError:
        return None
    if not (np.isfinite(lon).all() and np.isfinite(lat).all() and (np.abs(lat) <= 90).all()):
        return None
    return [[round(float(x), 9), round(float(y), 9)] for x, y in zip(lon, lat, strict=True)]


def box_polygons(boxes: npt.ArrayLike, georef: Georeferenced | Georef | None) -> list[GeoJSON | None]:
    """GeoJSON geometries in EPSG:4326 for pixel boxes.

    Args:
        boxes: ``(N, 4)`` ``x1, y1, x2, y2`` in pixel corner coordinates (as merged detections are).
        georef: a :class:`Georef` or anything with ``crs``/``transform`` (e.g. ``RasterInfo``).

    Returns:
        One geometry per box, in order: a ``Polygon`` (or a ``MultiPolygon`` when the box crosses the
        antimeridian), or ``None`` for every box when ``georef`` lacks a CRS or transform, or for a box
        that has no WGS 84 position.
    """
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ref = Georef.of(georef)
    if ref is None or array.shape[0] == 0:
        return [None] * array.shape[0]
    # Corners in ring order: top-left, top-right, bottom-right, bottom-left.
    xs = array[:, [0, 2, 2, 0]]
    ys = array[:, [1, 1, 3, 3]]
    try:
        lon, lat = pixels_to_lonlat(ref, xs.ravel(), ys.ravel())
    except ValueError:
        logger.warning("cannot georeference boxes from CRS %.60s", ref.crs)
        return [None] * array.shape[0]
    lon = lon.reshape(-1, 4)
    lat = lat.reshape(-1, 4)
    return _polygons(lon, lat)


def _polygons(lon: FloatArray, lat: FloatArray) -> list[GeoJSON | None]:
    """Closed, counter-clockwise rings for ``(N, 4)`` corner arrays, vectorised for the common case.

    Boxes that are unplaceable or cross the antimeridian take the per-box path of :func:`_geometry`.
    """
    # Rows holding inf/NaN/huge values are not simple and take the per-box path; ignore their warnings.
    with np.errstate(all="ignore"):
        simple = (
            np.isfinite(lon).all(axis=1)
            & np.isfinite(lat).all(axis=1)
            & (np.abs(lat) <= 90).all(axis=1)
            & (lon.max(axis=1) - lon.min(axis=1) <= 180)
        )
        # Shoelace sign per ring; clockwise rings (e.g. north-up images: y grows southward) are reversed.
        area2 = (lon * np.roll(lat, -1, axis=1) - np.roll(lon, -1, axis=1) * lat).sum(axis=1)
    order = np.where((area2 >= 0)[:, None], np.arange(4), np.arange(3, -1, -1))
    order = np.concatenate([order, order[:, :1]], axis=1)
    rows = np.arange(lon.shape[0])[:, None]
    rings = np.stack([lon[rows, order], lat[rows, order]], axis=2).tolist()
    return [
        {"type": "Polygon", "coordinates": [rings[i]]} if simple[i] else _geometry(lon[i], lat[i])
        for i in range(lon.shape[0])
    ]


@dataclass(frozen=True, slots=True)
class _Plain:
    crs: str | None
    transform: Sequence[float] | None


def _require(georef: Georeferenced | Georef) -> Georef:
    ref = Georef.of(georef)
    if ref is None:
        raise ValueError("no CRS or no geotransform: positions are pixel-only")
    return ref


def _crs(text: str) -> CRS:
    # Not cached: GDAL spatial reference objects must not be shared between threads, and callers run
    # this in worker threads; parsing costs about a millisecond per image.
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise ValueError(f"the CRS cannot be interpreted: {exc}") from exc


def _reproject(src: str, dst: str, xs: FloatArray, ys: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Transform points between CRSs; a point without a position in ``dst`` becomes NaN.

    Raises:
        ValueError: a CRS cannot be interpreted.
    """
    shape = np.shape(xs)
    x = np.asarray(xs, np.float64).ravel()
    y = np.asarray(ys, np.float64).ravel()
    if src == dst:
        return x.reshape(shape), y.reshape(shape)
    finite = np.isfinite(x) & np.isfinite(y)
    out_x = np.full(x.shape, np.nan)
    out_y = np.full(y.shape, np.nan)
    if not finite.any():
        return out_x.reshape(shape), out_y.reshape(shape)
    source, target = _crs(src), _crs(dst)
    index = np.flatnonzero(finite)
    if not _try_transform(source, target, x, y, index, out_x, out_y):
        # GDAL fails a whole call for one unplaceable point (a geostationary corner looking into space).
        # A spread of single points tells a CRS pair that cannot be transformed at all (another planet)
        # from one where some points can; only the second is worth searching point by point.
        spread = np.linspace(0, index.size - 1, min(index.size, PROBE_POINTS)).astype(np.intp)
        placed = [_try_transform(source, target, x, y, index[i : i + 1], out_x, out_y) for i in spread]
        if any(placed):
            _bisect(source, target, x, y, index, out_x, out_y, budget=[MAX_FAILED_CALLS])
    return out_x.reshape(shape), out_y.reshape(shape)


PROBE_POINTS = 16
"""Single points tried after a failed call, to tell whether any point can be placed at all."""
MAX_FAILED_CALLS = 256
"""Failed calls the search for unplaceable points may spend; points left undecided stay NaN."""


def _try_transform(
    source: CRS,
    target: CRS,
    x: FloatArray,
    y: FloatArray,
    index: npt.NDArray[np.intp],
    out_x: FloatArray,
    out_y: FloatArray,
) -> bool:
    """Transform the points at ``index`` into ``out_x``/``out_y``; ``False`` if GDAL refused the call."""
    try:
        tx, ty = warp_transform(source, target, x[index].tolist(), y[index].tolist())
    except (RasterioError, CPLE_BaseError, CRSError):
        return False
    out_x[index] = tx
    out_y[index] = ty
    return True


def _bisect(
    source: CRS,
    target: CRS,
    x: FloatArray,
    y: FloatArray,
    index: npt.NDArray[np.intp],
    out_x: FloatArray,
    out_y: FloatArray,
    budget: list[int],
) -> None:
    """Split a failing call in halves until the points that fail alone are found (``O(k log n)`` calls
    for ``k`` of them), spending at most ``budget[0]`` failed calls."""
    if index.size <= 1 or budget[0] <= 0:
        return
    half = index.size // 2
    for part in (index[:half], index[half:]):
        if not _try_transform(source, target, x, y, part, out_x, out_y):
            budget[0] -= 1
            _bisect(source, target, x, y, part, out_x, out_y, budget)


def _geometry(lon: FloatArray, lat: FloatArray) -> GeoJSON | None:
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))) or np.any(np.abs(lat) > 90):
        return None
    ring = [(float(x), float(y)) for x, y in zip(lon, lat, strict=True)]
    if max(lon) - min(lon) > 180:
        unwrapped = [(x + 360.0 if x < 0 else x, y) for x, y in ring]
        east = _clip(unwrapped, keep_below=True)
        west = [(x - 360.0, y) for x, y in _clip(unwrapped, keep_below=False)]
        parts = [_closed_ccw(p) for p in (east, west) if len(p) >= 3]
        if len(parts) == 2:
            return {"type": "MultiPolygon", "coordinates": [[p] for p in parts]}
        if parts:
            return {"type": "Polygon", "coordinates": [parts[0]]}
        return None
    return {"type": "Polygon", "coordinates": [_closed_ccw(ring)]}


def _clip(ring: list[tuple[float, float]], keep_below: bool) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clip of a ring against the meridian ``lon = 180``."""

    def inside(p: tuple[float, float]) -> bool:
        return p[0] <= 180.0 if keep_below else p[0] >= 180.0

    out: list[tuple[float, float]] = []
    for i, current in enumerate(ring):
        previous = ring[i - 1]
        if inside(current) != inside(previous):
            t = (180.0 - previous[0]) / (current[0] - previous[0])
            out.append((180.0, previous[1] + t * (current[1] - previous[1])))
        if inside(current):
            out.append(current)
    return out


def _closed_ccw(ring: list[tuple[float, float]]) -> list[list[float]]:
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True))
    ordered = ring if area2 >= 0 else ring[::-1]
    return [[x, y] for x, y in [*ordered, ordered[0]]]

"""Seeded synthetic aerial scenes with exact ground truth (numpy + rasterio only, no torch).

A scene is an RGB ``uint8`` image of ``size x size`` pixels at a ground sample distance (GSD) of
0.3 to 0.6 m (or any GSD a caller asks for, e.g. 0.1 m drone imagery for resolution checks),
georeferenced in a UTM zone, with COCO ground truth for category 1 ``palm_tree`` and
2 ``building``. It is drawn in layers, all in float32 and vectorised per object window:

1. land cover: soil / grass / scrub blended by fractal value noise, with fine texture;
2. water bodies (thresholded low-frequency noise) and roads (sampled polylines, asphalt or dirt);
3. one shadow map for every object: a crown or footprint shifted along the sun vector by
   ``height / tan(sun_elevation) / gsd`` pixels (building shadows are the convex hull of the footprint
   and its shifted copy, i.e. the footprint extruded along the sun ray), applied once so that
   overlapping shadows do not darken twice;
4. objects: buildings (rectangles and L-shapes; gable, hip or flat roofs shaded by the sun), cars,
   round bushes and broadleaf crowns (distractors), and palm crowns (a star of 9 to 18 tapered fronds,
   3 to 8 m across, lit per frond) in plantation lattices and scattered;
5. illumination (low-frequency haze, white balance, exposure), a 3-tap blur and sensor noise.

Ground truth is exactly what was drawn: a box is the bounding box of the pixels where the object's own
coverage is at least 0.5 (``x2``/``y2`` exclusive), clipped to the image, whether or not a later object
covers part of it. A frond of width ``w`` at relative position ``t`` along a frond of length ``L`` has
half-width ``w * sqrt(4 t (1 - t))``.

Determinism: every random draw comes from one ``numpy.random.Generator`` seeded with the scene seed,
and no BLAS reductions are used, so the same seed gives the same pixels and (through
:func:`write_geotiff`) the same GeoTIFF bytes.

Seed ranges: ``export.train`` draws training scenes from ``[0, 900_000)`` and validation scenes from
``[900_000, 1_000_000)``; held-out evaluation scenes have seeds ``>= HELDOUT_MIN_SEED`` (enforced by
``export.train`` and ``export.evaluate``).

CLI: ``python -m export.synth --out DIR --scenes N --size S --seed K`` writes ``scene_<seed>.tif`` for
seeds ``K .. K+N-1`` and ``annotations.json`` (COCO).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform

from gateway.pipeline.result import Category

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
PALM, BUILDING = 1, 2
#: The Palm model's classes, as its model card lists them (channel ``c`` of its heatmap is category
#: ``c + 1``); the gateway itself knows a model's classes only from its card.
PALM_CATEGORIES: Final = (
    Category(PALM, "palm_tree", "vegetation"),
    Category(BUILDING, "building", "structure"),
)
GSD_RANGE = (0.3, 0.6)
"""The GSDs scenes are drawn at when none is asked for: what training and evaluation render."""
RENDER_GSD_LIMITS = (0.05, 2.0)
"""The GSDs a caller may ask for: finer and coarser than training, for resolution checks."""
TRAIN_SEEDS = range(0, 900_000)
VAL_SEEDS = range(900_000, 1_000_000)
HELDOUT_MIN_SEED = 1_000_000
#: Largest building extent in pixels, kept below the tiler's 128 px overlap so every building lies
#: whole inside at least one tile.
MAX_BUILDING_PX = 110.0
#: Palms per 512 px tile that a plantation block may reach. The training and evaluation scenes stay
#: below it, well inside the model's K = 2048 rows per tile; denser plantations at coarse GSD are
#: unmeasured (see the model card).
MAX_PALMS_PER_TILE = 400
#: UTM zones where palms grow (EPSG code, false northing of the hemisphere, typical northing span).
_ZONES: tuple[tuple[int, float, float], ...] = (
    (32647, 0.0, 600_000.0),  # Thailand / Peninsular Malaysia north
    (32648, 0.0, 400_000.0),  # Malaysia / Borneo north
    (32748, 10_000_000.0, -300_000.0),  # Sumatra / Java south
    (32750, 10_000_000.0, -100_000.0),  # Borneo south
    (32631, 0.0, 700_000.0),  # West Africa
    (32632, 0.0, 500_000.0),  # Nigeria / Cameroon
    (32722, 10_000_000.0, -250_000.0),  # Brazil (Pará)
    (32618, 0.0, 800_000.0),  # Colombia
    (32633, 0.0, 3_600_000.0),  # Mediterranean date palms
)


@dataclass(frozen=True, slots=True)
class PalmAt:
    """A palm that a caller wants at a known place: centre ``(x, y)`` in pixels, crown diameter in m."""

    x: float
    y: float
    diameter_m: float = 6.0


@dataclass(frozen=True, slots=True)
class Scene:
    """One rendered scene and its ground truth.

    Attributes:
        seed: the scene seed (same seed, same scene).
        pixels: ``uint8 [3, H, W]`` RGB, channel-first as rasterio reads it.
        boxes: ``float32 [M, 4]`` as ``x1, y1, x2, y2`` pixel edges (``x2``, ``y2`` exclusive).
        categories: ``int32 [M]`` COCO category ids (1 palm_tree, 2 building).
        gsd: ground sample distance in metres per pixel.
        crs: projected CRS as ``"EPSG:326xx"`` / ``"EPSG:327xx"`` (UTM).
        transform: pixel to CRS affine transform (north-up, square pixels of ``gsd`` m).
    """

    seed: int
    pixels: npt.NDArray[np.uint8]
    boxes: F32
    categories: npt.NDArray[np.int32]
    gsd: float
    crs: str
    transform: Affine

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    def pixel_to_lonlat(self, x: float, y: float) -> tuple[float, float]:
        """WGS84 ``(lon, lat)`` of pixel coordinates ``(x, y)`` (pixel edges; centres are ``+0.5``)."""
        e, n = self.transform @ (x, y)
        lon, lat = warp_transform(self.crs, "EPSG:4326", [e], [n])
        return float(lon[0]), float(lat[0])

    def lonlat_to_pixel(self, lon: float, lat: float) -> tuple[float, float]:
        """Pixel coordinates ``(x, y)`` of a WGS84 ``(lon, lat)``."""
        e, n = warp_transform("EPSG:4326", self.crs, [lon], [lat])
        x, y = ~self.transform @ (float(e[0]), float(n[0]))
        return float(x), float(y)


@dataclass(slots=True)
class _Canvas:
    """Mutable drawing state of one scene (internal)."""

    rng: np.random.Generator
    size: int
    gsd: float
    sun: tuple[float, float]  # unit vector towards the sun, image axes (x right, y down)
    shadow_per_m: float  # shadow length in pixels per metre of height
    rgb: F32
    shadow: F32
    reserved: npt.NDArray[np.bool_]  # water, roads, buildings: no tree is centred here
    texture: F32  # fine noise in [-1, 1], reused for object textures
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
        """Integer window ``[c0, c1) x [r0, r1)`` clipped to the canvas, or None when empty."""
        c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        c1, r1 = min(math.ceil(x1) + 1, self.size), min(math.ceil(y1) + 1, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return c0, r0, c1, r1

    def paint(self, win: tuple[int, int, int, int], alpha: F32, colour: F32) -> None:
        """Alpha-composite ``colour`` (``[h, w, 3]`` or ``[3]``) over the window."""
        c0, r0, c1, r1 = win
        a = alpha[..., None]
        dst = self.rgb[r0:r1, c0:c1]
        dst *= 1.0 - a
        dst += a * colour

    def cast(self, win: tuple[int, int, int, int], coverage: F32) -> None:
        """Add ``coverage`` to the shadow map (shadows do not stack: maximum, not sum)."""
        c0, r0, c1, r1 = win
        np.maximum(self.shadow[r0:r1, c0:c1], coverage, out=self.shadow[r0:r1, c0:c1])

    def record(self, mask: npt.NDArray[np.bool_], win: tuple[int, int, int, int], category: int) -> None:
        """Record the bounding box of ``mask`` (pixels drawn at coverage >= 0.5) as ground truth."""
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        c0, r0, _, _ = win
        self.boxes.append(
            (float(c0 + cols[0]), float(r0 + rows[0]), float(c0 + cols[-1] + 1), float(r0 + rows[-1] + 1))
        )
        self.categories.append(category)


# --------------------------------------------------------------------------------------------- noise


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> F32:
    """Value noise in ``[0, 1]``: random values on a ``cell``-pixel lattice, smoothstep-interpolated."""
    gh, gw = math.ceil(height / cell) + 2, math.ceil(width / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    ox, oy = rng.random(2) * 0.99
    xs = np.arange(width, dtype=np.float32) / np.float32(cell) + np.float32(ox)
    ys = np.arange(height, dtype=np.float32) / np.float32(cell) + np.float32(oy)
    xi, yi = xs.astype(np.int64), ys.astype(np.int64)
    fx, fy = xs - xi, ys - yi
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    rows = grid[:, xi] * (1 - fx) + grid[:, xi + 1] * fx
    out: F32 = (rows[yi] * (1 - fy)[:, None] + rows[yi + 1] * fy[:, None]).astype(np.float32)
    return out


def fractal_noise(
    rng: np.random.Generator, height: int, width: int, cells: Sequence[float], gain: float = 0.55
) -> F32:
    """Sum of :func:`value_noise` octaves (largest cell first, amplitude ``gain ** k``), in ~[-1, 1]."""
    total = np.zeros((height, width), np.float32)
    norm = 0.0
    for k, cell in enumerate(cells):
        amp = gain**k
        total += np.float32(amp) * value_noise(rng, height, width, cell)
        norm += amp
    total *= np.float32(2.0 / norm)
    total -= np.float32(1.0)
    return total


def _vec(x: float, y: float) -> F32:
    return np.array([x, y], np.float32)


def _smoothstep(x: F32, lo: float, hi: float) -> F32:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    out: F32 = (t * t * (3 - 2 * t)).astype(np.float32)
    return out


def _jitter(rng: np.random.Generator, rgb: Sequence[float], spread: float) -> F32:
    base = np.asarray(rgb, np.float32)
    return (base * np.float32(1 + rng.normal(0, spread)) + rng.normal(0, spread * 40, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------- background


_SOILS = ((176, 146, 112), (150, 112, 82), (186, 128, 92), (128, 104, 84), (196, 176, 142))
_GRASSES = ((104, 128, 64), (126, 142, 76), (88, 112, 58), (140, 146, 90))
_SCRUBS = ((70, 84, 50), (86, 92, 60), (60, 74, 46))


def _land_cover(cv: _Canvas) -> None:
    rng, n = cv.rng, cv.size
    soil = _jitter(rng, _SOILS[rng.integers(len(_SOILS))], 0.06)
    grass = _jitter(rng, _GRASSES[rng.integers(len(_GRASSES))], 0.06)
    scrub = _jitter(rng, _SCRUBS[rng.integers(len(_SCRUBS))], 0.06)
    macro = fractal_noise(rng, n, n, (n / 1.5, n / 3, n / 6, n / 12, 24, 12))
    patches = fractal_noise(rng, n, n, (n / 4, n / 8, 32, 16, 8))
    grass_level = rng.uniform(-0.5, 0.4)
    w_grass = _smoothstep(macro, grass_level - 0.15, grass_level + 0.15)
    w_scrub = _smoothstep(patches, 0.25, 0.55) * w_grass * np.float32(rng.uniform(0.3, 1.0))
    fine = cv.texture
    base = soil + (grass - soil) * w_grass[..., None]
    base += (scrub - base) * w_scrub[..., None]
    # Fine texture: brightness speckle stronger on scrub (shrubs) and grass (tufts) than on bare soil.
    grain = np.float32(0.06) + np.float32(0.08) * w_grass + np.float32(0.12) * w_scrub
    base *= (1.0 + grain * fine)[..., None]
    cv.rgb[...] = base


def _water(cv: _Canvas) -> None:
    rng, n = cv.rng, cv.size
    field_ = fractal_noise(rng, n, n, (n / 1.2, n / 2.5, n / 5, n / 10), gain=0.45)
    # A threshold near the top of the distribution keeps water to a pond / lake on one side.
    level = np.float32(np.quantile(field_[::8, ::8], rng.uniform(0.82, 0.95)))
    alpha = _smoothstep(field_, float(level), float(level) + 0.04)
    colour = _jitter(rng, ((44, 66, 74), (70, 86, 62), (52, 72, 90))[rng.integers(3)], 0.05)
    ripple = np.float32(1.0) + np.float32(0.02) * cv.texture[..., None]
    cv.rgb[...] = cv.rgb * (1 - alpha[..., None]) + colour * ripple * alpha[..., None]
    # Muddy bank: a darker ring just outside the water.
    bank = _smoothstep(field_, float(level) - 0.015, float(level)) * (1 - alpha)
    cv.rgb *= (1.0 - np.float32(0.25) * bank)[..., None]
    cv.reserved |= alpha > 0.2


def _polyline(cv: _Canvas) -> F32:
    """A gently curving path across the scene, as ``[P, 2]`` points roughly 16 px apart."""
    rng, n = cv.rng, cv.size
    side = rng.integers(4)
    t = rng.uniform(0.1, 0.9) * n
    start = {0: (t, -20.0), 1: (n + 20.0, t), 2: (t, n + 20.0), 3: (-20.0, t)}[int(side)]
    heading = math.atan2(n / 2 - start[1], n / 2 - start[0]) + rng.uniform(-0.6, 0.6)
    pts = [start]
    turn = rng.uniform(-0.01, 0.01)
    for _ in range(int(3 * n / 16)):
        heading += turn + rng.normal(0, 0.02)
        x, y = pts[-1]
        pts.append((x + 16 * math.cos(heading), y + 16 * math.sin(heading)))
        if not (-40 <= pts[-1][0] <= n + 40 and -40 <= pts[-1][1] <= n + 40):
            break
    return np.asarray(pts, np.float32)


def _segment_distance(px: F32, py: F32, a: F32, b: F32) -> F32:
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
    return np.asarray(np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1])), np.float32)


def _roads(cv: _Canvas) -> list[F32]:
    rng = cv.rng
    paths: list[F32] = []
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):
        pts = _polyline(cv)
        asphalt = rng.random() < 0.5
        width = rng.uniform(5.0, 8.0) if asphalt else rng.uniform(3.0, 5.0)
        half = width / 2 / cv.gsd
        colour = _jitter(rng, (92, 92, 96) if asphalt else (170, 142, 110), 0.05)
        # Coverage of the whole road first (max over segments), painted once, so joints do not show.
        alpha = np.zeros((cv.size, cv.size), np.float32)
        for a, b in itertools.pairwise(pts):
            win = cv.window(
                min(a[0], b[0]) - half - 2, min(a[1], b[1]) - half - 2,
                max(a[0], b[0]) + half + 2, max(a[1], b[1]) + half + 2,
            )  # fmt: skip
            if win is None:
                continue
            c0, r0, c1, r1 = win
            px, py = _grid(win)
            cov = np.clip(half - _segment_distance(px, py, a, b) + 0.5, 0, 1)
            np.maximum(alpha[r0:r1, c0:c1], cov, out=alpha[r0:r1, c0:c1])
        tex = 1.0 + (0.03 if asphalt else 0.1) * cv.texture[..., None]
        cv.paint((0, 0, cv.size, cv.size), alpha, colour * tex)
        cv.reserved |= alpha > 0.2
        paths.append(pts)
    return paths


# ------------------------------------------------------------------------------------------- shapes


def _polygon_coverage(px: F32, py: F32, poly: F32) -> F32:
    """Anti-aliased coverage of a convex polygon (counter-clockwise in image axes, ``[V, 2]``).

    The signed distance is ``max_e n_e . (p - v_e)`` over edges ``e`` with outward unit normals ``n_e``;
    coverage is ``clip(0.5 - distance, 0, 1)``.
    """
    dist = np.full(np.broadcast_shapes(px.shape, py.shape), -1e9, np.float32)
    for i in range(len(poly)):
        (ax, ay), (bx, by) = poly[i], poly[(i + 1) % len(poly)]
        ex, ey = bx - ax, by - ay
        norm = math.hypot(ex, ey) or 1.0
        nx, ny = ey / norm, -ex / norm
        np.maximum(dist, (px - ax) * nx + (py - ay) * ny, out=dist)
    out: F32 = np.clip(0.5 - dist, 0, 1).astype(np.float32)
    return out


def _convex_hull(points: F32) -> F32:
    """Monotone-chain convex hull, in the vertex order :func:`_polygon_coverage` expects."""
    pts = sorted({(float(x), float(y)) for x, y in points})

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], np.float32)


def _rect(cx: float, cy: float, half_u: float, half_v: float, angle: float) -> F32:
    """Corners of a rotated rectangle (``u`` along ``angle``), ordered for :func:`_polygon_coverage`."""
    cu, su = math.cos(angle), math.sin(angle)
    corners = [(-half_u, -half_v), (-half_u, half_v), (half_u, half_v), (half_u, -half_v)]
    pts = np.asarray([(cx + u * cu - v * su, cy + u * su + v * cu) for u, v in corners], np.float32)
    return _convex_hull(pts)


def _grid(win: tuple[int, int, int, int]) -> tuple[F32, F32]:
    c0, r0, c1, r1 = win
    px = np.arange(c0, c1, dtype=np.float32)[None, :] + np.float32(0.5)
    py = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5)
    return px, py


# ---------------------------------------------------------------------------------------- buildings


_ROOFS = (
    (176, 92, 66),  # terracotta
    (150, 74, 58),  # red-brown tiles
    (158, 156, 150),  # concrete
    (196, 198, 200),  # bare metal
    (92, 112, 142),  # blue metal
    (78, 80, 84),  # dark bitumen
    (104, 128, 104),  # green metal
    (210, 204, 188),  # whitewashed
)


@dataclass(frozen=True, slots=True)
class _Wing:
    cx: float
    cy: float
    half_u: float
    half_v: float
    angle: float


def _building(cv: _Canvas, cx: float, cy: float) -> bool:
    """Draw one building centred near ``(cx, cy)``; False when it would overlap reserved ground."""
    rng, g = cv.rng, cv.gsd
    angle = rng.uniform(0, math.pi)
    length = rng.uniform(7.0, 26.0) / g
    depth = rng.uniform(5.0, 12.0) / g
    wings = [_Wing(cx, cy, length / 2, min(depth, length * 0.9) / 2, angle)]
    if rng.random() < 0.35:  # L-shape: a perpendicular wing at one end of the main block
        w_len = rng.uniform(0.5, 1.0) * length
        w_dep = rng.uniform(0.6, 1.0) * wings[0].half_v * 2
        end = rng.choice([-1.0, 1.0]) * (wings[0].half_u - w_dep / 2)
        side = rng.choice([-1.0, 1.0]) * (wings[0].half_v + w_len / 2 - 1.0)
        cu, su = math.cos(angle), math.sin(angle)
        wx = cx + end * cu - side * su
        wy = cy + end * su + side * cu
        wings.append(_Wing(wx, wy, w_len / 2, w_dep / 2, angle + math.pi / 2))
    polys = [_rect(w.cx, w.cy, w.half_u, w.half_v, w.angle) for w in wings]
    allpts = np.concatenate(polys)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    if float((hi - lo).max()) > MAX_BUILDING_PX:
        return False
    if not (0 <= (lo[0] + hi[0]) / 2 < cv.size and 0 <= (lo[1] + hi[1]) / 2 < cv.size):
        return False
    win = cv.window(lo[0] - 3, lo[1] - 3, hi[0] + 3, hi[1] + 3)
    if win is None:
        return False
    c0, r0, c1, r1 = win
    if cv.reserved[r0:r1, c0:c1].any():
        return False

    # Shadow: each wing extruded along the shadow vector (convex hull of footprint and its copy).
    height = rng.uniform(3.0, 10.0)
    sx, sy = -cv.sun[0] * height * cv.shadow_per_m, -cv.sun[1] * height * cv.shadow_per_m
    shifted = [p + _vec(sx, sy) for p in polys]
    allsh = np.concatenate([allpts, *shifted])
    swin = cv.window(
        allsh[:, 0].min() - 2, allsh[:, 1].min() - 2, allsh[:, 0].max() + 2, allsh[:, 1].max() + 2
    )
    if swin is not None:
        spx, spy = _grid(swin)
        cover = np.zeros((swin[3] - swin[1], swin[2] - swin[0]), np.float32)
        for p, q in zip(polys, shifted, strict=True):
            np.maximum(cover, _polygon_coverage(spx, spy, _convex_hull(np.concatenate([p, q]))), out=cover)
        cv.cast(swin, cover)

    px, py = _grid(win)
    roof = _jitter(rng, _ROOFS[rng.integers(len(_ROOFS))], 0.05)
    style = rng.choice(["gable", "hip", "flat"], p=[0.45, 0.3, 0.25])
    alpha = np.zeros((r1 - r0, c1 - c0), np.float32)
    shade = np.ones_like(alpha)
    for wing, poly in zip(wings, polys, strict=True):
        cov = _polygon_coverage(px, py, poly)
        cu, su = math.cos(wing.angle), math.sin(wing.angle)
        u = (px - wing.cx) * cu + (py - wing.cy) * su
        v = -(px - wing.cx) * su + (py - wing.cy) * cu
        if style == "flat":
            edge = np.maximum(np.abs(u) - wing.half_u, np.abs(v) - wing.half_v)
            facet = np.where(edge > -1.2, 1.12, 1.0).astype(np.float32)  # parapet catches light
        else:
            # Facet normal in image axes: across the ridge (gable), or also towards the ends (hip).
            nv = np.sign(v)
            nx, ny = -su * nv, cu * nv
            if style == "hip":
                ends = (np.abs(u) - (wing.half_u - wing.half_v)) > np.abs(v)
                nu = np.sign(u)
                nx = np.where(ends, cu * nu, nx)
                ny = np.where(ends, su * nu, ny)
            facet = (0.82 + 0.3 * (nx * cv.sun[0] + ny * cv.sun[1])).astype(np.float32)
            ridge = np.abs(v) < 0.6
            facet = np.where(ridge & ~(style == "hip"), 1.05, facet).astype(np.float32)
        # A later wing overwrites the earlier one where they overlap (its own roof facets win).
        shade = np.where(cov > 0, facet, shade)
        np.maximum(alpha, cov, out=alpha)
    tex = 1.0 + 0.04 * cv.texture[r0:r1, c0:c1]
    colour = roof[None, None, :] * (shade * tex)[..., None]
    cv.paint(win, alpha, colour)
    # A dark outline where walls meet the ground on the shadow side reads as the building's edge.
    cv.record(alpha >= 0.5, win, BUILDING)
    cv.reserved[r0:r1, c0:c1] |= alpha > 0
    return True


def _car(cv: _Canvas, cx: float, cy: float, angle: float) -> None:
    rng, g = cv.rng, cv.gsd
    half_u, half_v = rng.uniform(2.0, 2.5) / g, rng.uniform(0.85, 1.0) / g
    poly = _rect(cx, cy, half_u, half_v, angle)
    win = cv.window(cx - half_u - 3, cy - half_u - 3, cx + half_u + 3, cy + half_u + 3)
    if win is None:
        return
    off = 1.5 * cv.shadow_per_m
    swin = cv.window(
        cx - half_u - 3 - off, cy - half_u - 3 - off, cx + half_u + 3 + off, cy + half_u + 3 + off
    )
    if swin is not None:
        spx, spy = _grid(swin)
        shifted = poly + _vec(-cv.sun[0] * off, -cv.sun[1] * off)
        cv.cast(swin, _polygon_coverage(spx, spy, _convex_hull(np.concatenate([poly, shifted]))))
    px, py = _grid(win)
    cov = _polygon_coverage(px, py, poly)
    colours = ((225, 225, 228), (180, 182, 186), (36, 38, 42), (150, 36, 32), (40, 60, 120), (200, 190, 170))
    body = _jitter(rng, colours[rng.integers(len(colours))], 0.04)
    u = (px - cx) * math.cos(angle) + (py - cy) * math.sin(angle)
    glass = (np.abs(u - half_u * 0.25) < half_u * 0.18).astype(np.float32)
    colour = body[None, None, :] * (1 - 0.6 * glass)[..., None]
    cv.paint(win, cov, colour)


# -------------------------------------------------------------------------------------------- trees


@dataclass(frozen=True, slots=True)
class _Palm:
    cx: float
    cy: float
    radius: float  # px
    phi: F32  # frond angles
    length: F32  # frond lengths, px
    width: float  # frond max half-width, px
    height: float  # m
    tints: F32  # [fronds, 3] colour per frond
    lit: F32  # [fronds] brightness per frond
    hub: float  # brightness of the crown's centre


def _palm_coverage(p: _Palm, px: F32, py: F32, ox: float = 0.0, oy: float = 0.0) -> tuple[F32, F32, F32]:
    """Coverage of a palm crown centred at ``(cx + ox, cy + oy)``; also the nearest frond and its ``t``."""
    dx = px - np.float32(p.cx + ox)
    dy = py - np.float32(p.cy + oy)
    r = np.sqrt(dx * dx + dy * dy)
    th = np.arctan2(dy, dx)
    d = np.remainder(th[..., None] - p.phi + np.float32(math.pi), np.float32(2 * math.pi)) - np.float32(
        math.pi
    )
    along = r[..., None] * np.cos(d)
    perp = r[..., None] * np.abs(np.sin(d))
    t = along / p.length
    tc = np.clip(t, 0, 1)
    half = np.float32(p.width) * np.sqrt(4 * tc * (1 - tc)) + np.float32(0.3)
    cov = np.clip(half - perp + 0.5, 0, 1) * np.clip((1 - t) * p.length + 0.5, 0, 1) * (along > -0.5)
    frond = np.argmax(cov, axis=-1)
    best = np.take_along_axis(cov, frond[..., None], axis=-1)[..., 0]
    tb = np.take_along_axis(tc, frond[..., None], axis=-1)[..., 0]
    # Midrib position: 0 on the frond's axis, 1 at its edge (for shading).
    edge = np.take_along_axis(perp / half, frond[..., None], axis=-1)[..., 0]
    hub = np.clip(np.float32(0.16 * p.radius + 0.6) - r + 0.5, 0, 1)
    tb = np.where(hub > best, -1.0, tb)  # t = -1 marks the hub
    return np.maximum(best, hub).astype(np.float32), frond, np.stack([tb, edge]).astype(np.float32)


def _make_palm(
    cv: _Canvas, cx: float, cy: float, diameter_m: float, rng: np.random.Generator | None = None
) -> _Palm:
    """All of a palm's random choices (shape and colour), drawn from ``rng`` (the scene's by default)."""
    rng = cv.rng if rng is None else rng
    radius = diameter_m / 2 / cv.gsd
    # Reserve the crown's core so no bush or broadleaf tree is later planted inside it.
    core = cv.window(cx - radius / 2, cy - radius / 2, cx + radius / 2, cy + radius / 2)
    if core is not None:
        cv.reserved[core[1] : core[3], core[0] : core[2]] = True
    count = int(rng.integers(12, 23))
    phi = (rng.uniform(0, 2 * math.pi) + np.arange(count) * (2 * math.pi / count)).astype(np.float32)
    phi += rng.normal(0, 0.12, count).astype(np.float32)
    length = (radius * rng.uniform(0.78, 1.0, count)).astype(np.float32)
    length[int(rng.integers(count))] = radius  # the crown's extent is its longest frond
    width = max(radius * rng.uniform(0.07, 0.12), 0.4)
    # Per-frond light: fronds pointing towards the sun tilt their upper surface into it.
    lit = 0.78 + 0.3 * (np.cos(phi) * cv.sun[0] + np.sin(phi) * cv.sun[1]) + rng.normal(0, 0.06, count)
    base = _jitter(rng, ((70, 104, 44), (84, 116, 50), (62, 92, 46), (96, 120, 58))[rng.integers(4)], 0.05)
    tints = np.repeat(base[None, :], count, axis=0)
    dead = rng.random(count) < 0.08
    tints[dead] = _jitter(rng, (150, 132, 80), 0.05)
    return _Palm(
        cx, cy, radius, phi, length, width, rng.uniform(5.0, 16.0),
        tints, lit.astype(np.float32), rng.uniform(0.55, 0.75),
    )  # fmt: skip


def _palm_shadow(cv: _Canvas, p: _Palm) -> None:
    ox = -cv.sun[0] * p.height * cv.shadow_per_m
    oy = -cv.sun[1] * p.height * cv.shadow_per_m
    r = p.radius + 2
    win = cv.window(
        min(p.cx, p.cx + ox) - r, min(p.cy, p.cy + oy) - r, max(p.cx, p.cx + ox) + r, max(p.cy, p.cy + oy) + r
    )
    if win is None:
        return
    px, py = _grid(win)
    crown = _palm_coverage(p, px, py, ox, oy)[0]
    trunk_w = max(0.25 / cv.gsd, 0.4)
    d = _segment_distance(px, py, _vec(p.cx, p.cy), _vec(p.cx + ox, p.cy + oy))
    trunk = np.clip(trunk_w - d + 0.5, 0, 1)
    cv.cast(win, np.maximum(crown * np.float32(0.95), trunk * np.float32(0.8)))


def _palm_draw(cv: _Canvas, p: _Palm, record: bool = True) -> None:
    win = cv.window(p.cx - p.radius - 2, p.cy - p.radius - 2, p.cx + p.radius + 2, p.cy + p.radius + 2)
    if win is None:
        return
    px, py = _grid(win)
    cov, frond, te = _palm_coverage(p, px, py)
    t, edge = te[0], np.clip(te[1], 0, 1)
    # Fronds arch down towards their tips, so they darken along their length; the midrib catches
    # light, the leaflets at the frond's edge less so; the hub is shaded by the fronds around it.
    hub = t < 0
    along = (1.12 - 0.4 * np.clip(t, 0, 1) ** 1.5) * (1.12 - 0.28 * edge)
    along = np.where(hub, np.float32(p.hub), along).astype(np.float32)
    c0, r0, c1, r1 = win
    tex = 1.0 + 0.1 * cv.texture[r0:r1, c0:c1]
    colour = p.tints[frond] * (p.lit[frond] * along * tex)[..., None]
    cv.paint(win, cov, colour)
    if record:
        cv.record(cov >= 0.5, win, PALM)


def _blob_coverage(
    px: F32, py: F32, cx: float, cy: float, radius: float, harmonics: F32, phases: F32
) -> tuple[F32, F32, F32]:
    dx, dy = px - np.float32(cx), py - np.float32(cy)
    r = np.sqrt(dx * dx + dy * dy)
    th = np.arctan2(dy, dx)
    wobble = np.ones_like(th)
    for k, (amp, ph) in enumerate(zip(harmonics, phases, strict=True)):
        wobble += amp * np.cos((k + 3) * th + ph)
    edge = np.float32(radius) * wobble
    return np.clip(edge - r + 0.5, 0, 1).astype(np.float32), dx, dy


def _broadleaf(
    cv: _Canvas, cx: float, cy: float, diameter_m: float, bush: bool, rng: np.random.Generator | None = None
) -> None:
    """A round, lumpy crown (broadleaf tree or bush): a distractor that is not a palm."""
    rng = cv.rng if rng is None else rng
    radius = diameter_m / 2 / cv.gsd
    harmonics = (rng.uniform(0.02, 0.09, 4) * (0.5 if bush else 1.0)).astype(np.float32)
    phases = rng.uniform(0, 2 * math.pi, 4).astype(np.float32)
    height = rng.uniform(1.0, 2.5) if bush else rng.uniform(5.0, 14.0)
    ox, oy = -cv.sun[0] * height * cv.shadow_per_m, -cv.sun[1] * height * cv.shadow_per_m
    r = radius * 1.4 + 2
    swin = cv.window(min(cx, cx + ox) - r, min(cy, cy + oy) - r, max(cx, cx + ox) + r, max(cy, cy + oy) + r)
    if swin is not None:
        spx, spy = _grid(swin)
        shadow, _, _ = _blob_coverage(spx, spy, cx + ox, cy + oy, radius, harmonics, phases)
        d = _segment_distance(spx, spy, _vec(cx, cy), _vec(cx + ox, cy + oy))
        trunk = np.clip(max(0.3 / cv.gsd, 0.5) - d + 0.5, 0, 1) * np.float32(0 if bush else 0.8)
        cv.cast(swin, np.maximum(shadow, trunk))
    win = cv.window(cx - r, cy - r, cx + r, cy + r)
    if win is None:
        return
    px, py = _grid(win)
    cov, dx, dy = _blob_coverage(px, py, cx, cy, radius, harmonics, phases)
    palette = (
        ((58, 86, 40), (46, 70, 36), (76, 98, 48), (64, 82, 56)) if not bush else ((52, 70, 38), (70, 84, 46))
    )
    base = _jitter(rng, palette[rng.integers(len(palette))], 0.06)
    # Dome shading: brighter on the sun side, plus clumpy foliage texture (coarser on trees).
    c0, r0, c1, r1 = win
    dome = 0.85 + 0.3 * (dx * cv.sun[0] + dy * cv.sun[1]) / np.float32(max(radius, 1.0))
    clumps = 1.0 + (0.1 if bush else 0.22) * cv.texture[r0:r1, c0:c1]
    colour = base[None, None, :] * (dome * clumps)[..., None]
    cv.paint(win, cov, colour)


# ---------------------------------------------------------------------------------------- placement


def _free(cv: _Canvas, x: float, y: float) -> bool:
    xi, yi = int(x), int(y)
    return 0 <= xi < cv.size and 0 <= yi < cv.size and not cv.reserved[yi, xi]


def _plantation(cv: _Canvas) -> list[_Palm]:
    """A rotated block of palms on a triangular (or square) lattice with gaps and jitter."""
    rng, g, n = cv.rng, cv.gsd, cv.size
    spacing = rng.uniform(7.5, 10.0) / g
    diameter = rng.uniform(3.5, 8.0)
    # Crowns touch and overlap a little, never swallow a neighbour.
    diameter = min(diameter, spacing * g * 1.2)
    angle = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(0, n, 2)
    half_u, half_v = rng.uniform(0.2, 0.8, 2) * n
    triangular = rng.random() < 0.7
    cell_area = spacing * spacing * (0.866 if triangular else 1.0)
    # Keep a block below MAX_PALMS_PER_TILE palms wherever a tile falls on it.
    scale = math.sqrt(min(1.0, MAX_PALMS_PER_TILE * cell_area / (4 * half_u * half_v)))
    half_u, half_v = half_u * scale, half_v * scale
    missing = rng.uniform(0.02, 0.15)
    cu, su = math.cos(angle), math.sin(angle)
    palms = []
    rows = int(2 * half_v / (spacing * (0.866 if triangular else 1.0))) + 1
    cols = int(2 * half_u / spacing) + 1
    for i in range(rows):
        v = -half_v + i * spacing * (0.866 if triangular else 1.0)
        shift = spacing / 2 if (triangular and i % 2) else 0.0
        us = -half_u + shift + np.arange(cols) * spacing
        jit = rng.normal(0, 0.25 / g, (cols, 2))
        drop = rng.random(cols) < missing
        sizes = diameter * rng.uniform(0.88, 1.1, cols)
        for j, u in enumerate(us):
            x = cx + u * cu - v * su + jit[j, 0]
            y = cy + u * su + v * cu + jit[j, 1]
            if drop[j] or not _free(cv, x, y):
                continue
            palms.append(_make_palm(cv, x, y, float(sizes[j])))
    return palms


def _populate(cv: _Canvas, roads: list[F32]) -> list[_Palm]:
    rng, n, g = cv.rng, cv.size, cv.gsd
    area_ha = (n * g) ** 2 / 1e4
    # Buildings: a village cluster along a road or around a point, plus a few isolated ones.
    n_buildings = int(
        rng.choice([0, 3, 6, 10, 16, 24]) * min(max(area_ha / 10.0, 0.4), 3.0) + rng.integers(0, 3)
    )
    anchor = rng.uniform(0.15, 0.85, 2) * n
    placed = 0
    for _ in range(n_buildings * 6):
        if placed >= n_buildings:
            break
        if roads and rng.random() < 0.6:
            path = roads[int(rng.integers(len(roads)))]
            k = int(rng.integers(len(path)))
            x, y = path[k] + rng.normal(0, 14.0 / g, 2)
        elif rng.random() < 0.6:
            x, y = anchor + rng.normal(0, 40.0 / g, 2)
        else:
            x, y = rng.uniform(0, n, 2)
        placed += _building(cv, float(x), float(y))
    for path in roads:
        for _ in range(int(rng.integers(0, 6))):
            k = int(rng.integers(1, len(path)))
            a, b = path[k - 1], path[k]
            t = rng.random()
            x, y = a + t * (b - a)
            ang = math.atan2(float(b[1] - a[1]), float(b[0] - a[0]))
            side = rng.choice([-1.0, 1.0]) * 1.5 / g
            _car(cv, float(x - side * math.sin(ang)), float(y + side * math.cos(ang)), ang)

    palms: list[_Palm] = []
    if rng.random() < 0.7:
        palms += _plantation(cv)
    for _ in range(int(rng.integers(0, int(30 * max(area_ha / 10, 0.3))))):
        x, y = rng.uniform(0, n, 2)
        if rng.random() < 0.4 and palms:  # scattered palms cluster: a second tree next to a first
            q = palms[int(rng.integers(len(palms)))]
            x, y = q.cx + rng.normal(0, q.radius * 2.2), q.cy + rng.normal(0, q.radius * 2.2)
        if _free(cv, x, y):
            palms.append(_make_palm(cv, float(x), float(y), rng.uniform(3.0, 8.0)))

    others: list[tuple[float, float, float, bool]] = []
    for _ in range(int(rng.integers(3, 30) * max(area_ha / 10, 0.3))):
        x, y = rng.uniform(0, n, 2)
        if _free(cv, x, y):
            others.append((float(x), float(y), rng.uniform(4.0, 11.0), False))
    for _ in range(int(rng.integers(10, 80) * max(area_ha / 10, 0.3))):
        x, y = rng.uniform(0, n, 2)
        if _free(cv, x, y):
            others.append((float(x), float(y), rng.uniform(1.2, 3.0), True))
    for x, y, d, bush in others:
        _broadleaf(cv, x, y, d, bush)
    return palms


# -------------------------------------------------------------------------------------- distractors


#: The distractor layer draws from ``default_rng([seed, DISTRACTOR_STREAM])``, apart from the scene's own
#: stream, so a scene rendered with ``distractors=True`` keeps every other draw (objects, ground truth,
#: illumination, noise) of the same seed without them.
DISTRACTOR_STREAM: Final = 2


def _claim(blocked: npt.NDArray[np.bool_], cx: float, cy: float, radius: float) -> bool:
    """Take the square around ``(cx, cy)`` of half-side ``radius`` when all of it is free ground."""
    n = blocked.shape[0]
    c0, r0 = math.floor(cx - radius), math.floor(cy - radius)
    c1, r1 = math.ceil(cx + radius) + 1, math.ceil(cy + radius) + 1
    if not (0 <= cx < n and 0 <= cy < n):
        return False
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, n), min(r1, n)
    if blocked[r0:r1, c0:c1].any():
        return False
    blocked[r0:r1, c0:c1] = True
    return True


def _disc(px: F32, py: F32, cx: float, cy: float, radius: float) -> F32:
    out: F32 = np.clip(np.float32(radius) - np.hypot(px - cx, py - cy) + 0.5, 0, 1).astype(np.float32)
    return out


def _extruded_shadow(cv: _Canvas, cx: float, cy: float, radius: float, height: float) -> None:
    """Cast the shadow of an upright cylinder (its disc swept along the sun ray), off its own top."""
    ox, oy = -cv.sun[0] * height * cv.shadow_per_m, -cv.sun[1] * height * cv.shadow_per_m
    r = radius + 2
    win = cv.window(min(cx, cx + ox) - r, min(cy, cy + oy) - r, max(cx, cx + ox) + r, max(cy, cy + oy) + r)
    if win is None:
        return
    px, py = _grid(win)
    swept = np.clip(radius - _segment_distance(px, py, _vec(cx, cy), _vec(cx + ox, cy + oy)) + 0.5, 0, 1)
    cv.cast(win, (swept * (1 - _disc(px, py, cx, cy, radius))).astype(np.float32))


_TANKS = ((214, 214, 208), (176, 178, 174), (72, 74, 72), (74, 102, 148), (92, 120, 94), (146, 100, 72))


def _tank(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, diameter_m: float) -> None:
    """A round storage tank seen from above: a flat or gently domed lid with a bright rim and a hatch."""
    radius = diameter_m / 2 / cv.gsd
    _extruded_shadow(cv, cx, cy, radius, rng.uniform(2.0, 9.0))
    win = cv.window(cx - radius - 2, cy - radius - 2, cx + radius + 2, cy + radius + 2)
    if win is None:
        return
    px, py = _grid(win)
    cov = _disc(px, py, cx, cy, radius)
    dx, dy = px - np.float32(cx), py - np.float32(cy)
    dist = np.hypot(dx, dy)
    dome = 0.95 + rng.uniform(0.0, 0.15) * (dx * cv.sun[0] + dy * cv.sun[1]) / np.float32(max(radius, 1.0))
    rim = np.where(dist > radius - max(0.4 / cv.gsd, 1.0), 1.12, 1.0)
    hatch = np.where(np.hypot(dx - radius * 0.45, dy) < max(0.35 / cv.gsd, 1.0), 0.7, 1.0)
    c0, r0, c1, r1 = win
    tex = 1.0 + 0.03 * cv.texture[r0:r1, c0:c1]
    base = _jitter(rng, _TANKS[rng.integers(len(_TANKS))], 0.05)
    cv.paint(win, cov, base[None, None, :] * (dome * rim * hatch * tex)[..., None])


_PARASOLS = ((206, 48, 44), (232, 230, 222), (44, 84, 160), (232, 190, 64), (66, 128, 72), (204, 184, 146))


def _parasol(
    cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, diameter_m: float, colours: F32, panels: int
) -> None:
    """A parasol from above: a regular polygon of ``panels`` fabric panels (plain or striped), each lit by
    its slope towards the sun, with darker seams along its ribs."""
    radius = diameter_m / 2 / cv.gsd
    _extruded_shadow(cv, cx, cy, radius * 0.95, rng.uniform(2.0, 2.6))
    win = cv.window(cx - radius - 2, cy - radius - 2, cx + radius + 2, cy + radius + 2)
    if win is None:
        return
    rot = rng.uniform(0, 2 * math.pi)
    step = 2 * math.pi / panels
    corners = [
        (cx + radius * math.cos(rot + k * step), cy + radius * math.sin(rot + k * step))
        for k in range(panels)
    ]
    px, py = _grid(win)
    cov = _polygon_coverage(px, py, _convex_hull(np.asarray(corners, np.float32)))
    dx, dy = px - np.float32(cx), py - np.float32(cy)
    rel = np.remainder(np.arctan2(dy, dx) - np.float32(rot), np.float32(2 * math.pi))
    panel = np.minimum((rel / np.float32(step)).astype(np.int64), panels - 1)
    mid = np.float32(rot) + (panel.astype(np.float32) + 0.5) * np.float32(step)
    lit = 0.86 + 0.18 * (np.cos(mid) * cv.sun[0] + np.sin(mid) * cv.sun[1])
    off_rib = np.minimum(rel - panel * np.float32(step), (panel + 1) * np.float32(step) - rel)
    seam = np.where(off_rib * np.hypot(dx, dy) < 0.7, 0.8, 1.0)
    fabric = colours[panel % len(colours)]
    cv.paint(win, cov, fabric * (lit * seam)[..., None])


def _roundabout(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, island_m: float) -> None:
    """A roundabout's planted centre island inside its ring of asphalt, with a concrete kerb."""
    g = cv.gsd
    r_island = island_m / 2 / g
    r_kerb = r_island + max(0.5 / g, 1.0)
    r_outer = r_kerb + rng.uniform(6.0, 9.0) / g
    win = cv.window(cx - r_outer - 2, cy - r_outer - 2, cx + r_outer + 2, cy + r_outer + 2)
    if win is None:
        return
    px, py = _grid(win)
    c0, r0, c1, r1 = win
    tex = cv.texture[r0:r1, c0:c1]
    asphalt = _jitter(rng, (92, 92, 96), 0.05)
    kerb = _jitter(rng, (188, 186, 178), 0.04)
    grass = _jitter(rng, _GRASSES[rng.integers(len(_GRASSES))], 0.06)
    cv.paint(win, _disc(px, py, cx, cy, r_outer), asphalt * (1.0 + 0.03 * tex)[..., None])
    cv.paint(win, _disc(px, py, cx, cy, r_kerb), np.broadcast_to(kerb, (r1 - r0, c1 - c0, 3)))
    bed = rng.uniform(0.3, 0.7)  # an inner flower bed or shrub ring, darker than the lawn
    lawn = grass[None, None, :] * (1.0 + 0.12 * tex)[..., None]
    shrubs = lawn * np.float32(0.7)
    inner = _disc(px, py, cx, cy, r_island * bed)[..., None]
    cv.paint(win, _disc(px, py, cx, cy, r_island), lawn * (1 - inner) + shrubs * inner)


def _distractors(cv: _Canvas, seed: int, trees: Sequence[_Palm]) -> None:
    """Round things that are not palms, on free ground only (never over water, roads, buildings or a
    palm's crown, so every recorded box keeps what it showed without them): broadleaf orchards and
    more broadleaf crowns (3 to 9 m), bushes (1 to 4 m) scattered and in hedgerows, round tanks (2.5 to
    12 m), parasols (2 to 4 m, alone or set out in rows) and roundabout islands (6 to 24 m)."""
    rng = np.random.default_rng([seed, DISTRACTOR_STREAM])
    g, n = cv.gsd, cv.size
    scale = max((n * g) ** 2 / 1e5, 0.3)  # hectares / 10, as in _populate
    blocked = cv.reserved.copy()
    for p in trees:
        win = cv.window(p.cx - p.radius - 3, p.cy - p.radius - 3, p.cx + p.radius + 3, p.cy + p.radius + 3)
        if win is not None:
            blocked[win[1] : win[3], win[0] : win[2]] = True

    def anywhere() -> tuple[float, float]:
        x, y = rng.uniform(0, n, 2)
        return float(x), float(y)

    for _ in range(int(rng.poisson(0.3 * scale))):
        x, y = anywhere()
        island = rng.uniform(6.0, 24.0)
        if _claim(blocked, x, y, (island / 2 + 10.0) / g):
            _roundabout(cv, rng, x, y, island)
    for _ in range(int(rng.poisson(1.5 * scale))):
        x, y = anywhere()
        for _ in range(int(rng.choice([1, 1, 2, 3, 4]))):  # tank farms stand in small rows
            d = rng.uniform(2.5, 12.0)
            if _claim(blocked, x, y, d / 2 / g + 2):
                _tank(cv, rng, x, y, d)
            x += (d + rng.uniform(1.0, 4.0)) / g
    if rng.random() < 0.45:  # an orchard: broadleaf crowns on a lattice, like a plantation
        spacing = rng.uniform(5.0, 9.0) / g
        diameter = min(rng.uniform(3.0, 7.0), spacing * g * 1.05)
        angle = rng.uniform(0, math.pi)
        cx, cy = anywhere()
        half = rng.uniform(0.1, 0.35, 2) * n
        cu, su = math.cos(angle), math.sin(angle)
        for i, j in itertools.product(
            range(int(2 * half[1] / spacing) + 1), range(int(2 * half[0] / spacing) + 1)
        ):
            u, v = -half[0] + j * spacing, -half[1] + i * spacing
            x = cx + u * cu - v * su + rng.normal(0, 0.3 / g)
            y = cy + u * su + v * cu + rng.normal(0, 0.3 / g)
            d = diameter * rng.uniform(0.85, 1.15)
            if rng.random() > 0.08 and _claim(blocked, x, y, d / 2 / g):
                _broadleaf(cv, x, y, d, False, rng)
    for _ in range(int(rng.poisson(12 * scale))):
        x, y = anywhere()
        d = rng.uniform(3.0, 9.0)
        if _claim(blocked, x, y, d / 2 / g):
            _broadleaf(cv, x, y, d, False, rng)
    for _ in range(int(rng.poisson(30 * scale))):
        x, y = anywhere()
        d = rng.uniform(1.0, 4.0)
        if _claim(blocked, x, y, d / 2 / g):
            _broadleaf(cv, x, y, d, True, rng)
    for _ in range(int(rng.poisson(1.0 * scale))):  # hedgerows: bushes in a line
        x, y = anywhere()
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(5, 16))):
            d = rng.uniform(1.5, 3.5)
            if _claim(blocked, x, y, d / 2 / g):
                _broadleaf(cv, x, y, d, True, rng)
            x += math.cos(heading) * d * 1.1 / g
            y += math.sin(heading) * d * 1.1 / g
    for _ in range(int(rng.poisson(1.2 * scale))):  # parasols: a terrace in rows, or a few alone
        x0, y0 = anywhere()
        colours = np.stack([_jitter(rng, _PARASOLS[rng.integers(len(_PARASOLS))], 0.04) for _ in range(2)])
        if rng.random() < 0.5:
            colours = colours[:1]
        panels = int(rng.choice([6, 8, 8, 10, 12]))
        d = rng.uniform(2.0, 4.0)
        gap = d + rng.uniform(0.8, 3.0)
        rows, cols = (int(rng.integers(1, 4)), int(rng.integers(2, 7))) if rng.random() < 0.6 else (1, 1)
        for i, j in itertools.product(range(rows), range(cols)):
            x, y = x0 + j * gap / g, y0 + i * gap / g
            if _claim(blocked, x, y, d / 2 / g + 1):
                _parasol(cv, rng, x, y, d, colours, panels)


# ----------------------------------------------------------------------------------------- assembly


def _georef(rng: np.random.Generator, gsd: float) -> tuple[str, Affine]:
    epsg, false_north, north = _ZONES[int(rng.integers(len(_ZONES)))]
    easting = round(float(rng.uniform(250_000, 750_000)), 1)
    northing = round(false_north + north + float(rng.uniform(-50_000, 50_000)), 1)
    return f"EPSG:{epsg}", Affine(gsd, 0.0, easting, 0.0, -gsd, northing)


def render_scene(
    seed: int,
    size: int = 1024,
    gsd: float | None = None,
    *,
    palms: Sequence[PalmAt] = (),
    populate: bool = True,
    shadows: bool = True,
    distractors: bool = False,
) -> Scene:
    """Render one scene.

    Args:
        seed: scene seed; the same seed (and arguments) gives the same scene, byte for byte.
        size: width and height in pixels.
        gsd: metres per pixel, within :data:`RENDER_GSD_LIMITS`; drawn from :data:`GSD_RANGE` (what
            training and evaluation render) when None, and only then does the draw consume the seed's
            first random number.
        palms: extra palms at known pixel positions (drawn last, on top, and recorded as ground truth).
        populate: False renders only land cover plus ``palms`` (for tests that need a known layout).
        shadows: False leaves out every cast shadow (for tests that compare drawn pixels with boxes).
        distractors: True adds round things that are not palms on free ground (see
            :func:`_distractors`; drawn from their own random stream, so the scene's other content and
            its ground truth are those of the same seed without them).

    Returns:
        The scene with its ground truth.

    Raises:
        ValueError: if ``size`` is not positive or ``gsd`` is outside :data:`RENDER_GSD_LIMITS`.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    g = float(rng.uniform(*GSD_RANGE)) if gsd is None else float(gsd)
    if not RENDER_GSD_LIMITS[0] - 1e-9 <= g <= RENDER_GSD_LIMITS[1] + 1e-9:
        raise ValueError(f"gsd must be in {RENDER_GSD_LIMITS}, got {g}")
    azimuth = rng.uniform(0, 2 * math.pi)
    elevation = math.radians(rng.uniform(35.0, 72.0))
    cv = _Canvas(
        rng=rng,
        size=size,
        gsd=g,
        sun=(math.cos(azimuth), math.sin(azimuth)),
        shadow_per_m=1.0 / math.tan(elevation) / g,
        rgb=np.zeros((size, size, 3), np.float32),
        shadow=np.zeros((size, size), np.float32),
        reserved=np.zeros((size, size), np.bool_),
        texture=fractal_noise(rng, size, size, (6.0, 3.0, 1.5), gain=0.8),
    )
    crs, transform = _georef(rng, g)
    _land_cover(cv)
    trees: list[_Palm] = []
    if populate:
        if rng.random() < 0.35:
            _water(cv)
        roads = _roads(cv)
        trees = _populate(cv, roads)
    # Requested palms draw from their own stream, so adding one changes only its crown and shadow.
    own = np.random.default_rng([seed, 1])
    extra = [_make_palm(cv, p.x, p.y, p.diameter_m, own) for p in palms]
    if distractors:
        _distractors(cv, seed, [*trees, *extra])
    for palm in [*trees, *extra]:
        _palm_shadow(cv, palm)
    # Shadows land on the ground and on objects drawn before the trees (buildings, cars, bushes).
    darkness = np.float32(rng.uniform(0.38, 0.55))
    if shadows:
        cv.rgb *= (1.0 - darkness * cv.shadow)[..., None]
        cv.rgb[..., 2] += np.float32(6.0) * cv.shadow  # skylight makes shadows slightly blue
    cv.shadow[...] = 0
    for palm in trees:
        _palm_draw(cv, palm)
    for palm in extra:
        _palm_draw(cv, palm)
    pixels = _finish(cv)
    boxes = np.asarray(cv.boxes, np.float32).reshape(-1, 4)
    np.clip(boxes, 0, size, out=boxes)
    return Scene(
        seed=seed,
        pixels=pixels,
        boxes=boxes,
        categories=np.asarray(cv.categories, np.int32),
        gsd=g,
        crs=crs,
        transform=transform,
    )


def _finish(cv: _Canvas) -> npt.NDArray[np.uint8]:
    """Illumination, white balance, optics blur and sensor noise; to ``uint8 [3, H, W]``."""
    rng, n = cv.rng, cv.size
    haze = fractal_noise(rng, n, n, (n / 1.5, n / 3, n / 6), gain=0.6)
    img = cv.rgb * (1.0 + np.float32(rng.uniform(0.04, 0.12)) * haze)[..., None]
    img *= (np.float32(rng.uniform(0.85, 1.15)) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)
    img += np.float32(rng.uniform(0, 12)) * (haze[..., None] + 1) / 2  # thin haze lifts the blacks
    # Sensor MTF: separable [1, 2, 1] / 4 blur, blended in partially.
    blur = img.copy()
    blur[1:-1] = 0.25 * img[:-2] + 0.5 * img[1:-1] + 0.25 * img[2:]
    blur2 = blur.copy()
    blur2[:, 1:-1] = 0.25 * blur[:, :-2] + 0.5 * blur[:, 1:-1] + 0.25 * blur[:, 2:]
    k = np.float32(rng.uniform(0.3, 0.9))
    img = img * (1 - k) + blur2 * k
    img += rng.normal(0, rng.uniform(1.0, 3.5), img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------- output


LUMA: Final = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights: how a colour scene becomes the grey image a panchromatic sensor would give."""


def to_grey(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``uint8 [3, H, W]`` RGB to its luma, rounded, in all three channels (as the gateway reads grey)."""
    luma = np.tensordot(np.asarray(LUMA, np.float32), pixels.astype(np.float32), axes=1)
    grey = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    out: npt.NDArray[np.uint8] = np.broadcast_to(grey, pixels.shape).copy()
    return out


def write_geotiff(scene: Scene, path: Path) -> Path:
    """Write a scene as a tiled, DEFLATE-compressed, 3-band ``uint8`` GeoTIFF (deterministic bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 3,
        "dtype": "uint8",
        "crs": scene.crs,
        "transform": scene.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB",
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(scene.pixels)
        dst.update_tags(PALM_SCENE_SEED=str(scene.seed), PALM_GSD_M=f"{scene.gsd:.4f}")
    return path


def coco_dataset(scenes: Iterable[tuple[Scene, str]]) -> dict[str, Any]:
    """COCO ground truth for ``(scene, file_name)`` pairs; image ids count from 1 in order."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (scene, name) in enumerate(scenes, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "width": scene.width,
                "height": scene.height,
                "seed": scene.seed,
                "gsd_m": round(scene.gsd, 6),
                "crs": scene.crs,
            }
        )
        for box, cat in zip(scene.boxes.tolist(), scene.categories.tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "Palm Serve synthetic aerial scenes (export.synth)"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in PALM_CATEGORIES
        ],
    }


def write_dataset(out: Path, scenes: int, size: int, seed: int) -> Path:
    """Render scenes with seeds ``seed .. seed + scenes - 1`` to GeoTIFFs plus ``annotations.json``.

    Returns:
        The path of the COCO file.
    """
    out.mkdir(parents=True, exist_ok=True)

    def rendered() -> Iterable[tuple[Scene, str]]:
        for s in range(seed, seed + scenes):
            scene = render_scene(s, size)
            name = f"scene_{s}.tif"
            write_geotiff(scene, out / name)
            log.info("scene %s: %d palms, %d buildings", s, int((scene.categories == PALM).sum()),
                     int((scene.categories == BUILDING).sum()))  # fmt: skip
            yield scene, name

    coco = out / "annotations.json"
    coco.write_text(json.dumps(coco_dataset(rendered()), indent=1) + "\n")
    return coco


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m export.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED, help="first scene seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    coco = write_dataset(args.out, args.scenes, args.size, args.seed)
    print(f"wrote {args.scenes} scenes and {coco}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

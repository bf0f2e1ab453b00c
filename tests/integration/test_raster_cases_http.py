"""One palm at a known place, written in every band/dtype/nodata/CRS layout, through the real stack.

Each variant of the same seeded scene goes through ``/v1/predict`` (real uvicorn, real Triton, the
shipped model); the palm must come back exactly once at its pixel and, where the file is georeferenced,
at its lon/lat (within a pixel) in the json and the geojson outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp

from export.synth import PalmAt, Scene, render_scene
from gateway.app import create_app
from gateway.pipeline.geo import Georef, lonlat_to_pixel, pixel_to_lonlat
from gateway.settings import DecodeSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests.factories import make_geotiff
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

SIZE = 768
SEED = 7101


def clear_spot(seed: int) -> tuple[float, float]:
    """A pixel centre of the populated scene with no drawn object within 30 px (room for one palm)."""
    boxes = render_scene(seed, size=SIZE, gsd=0.5).boxes
    for y in range(80, SIZE - 80, 16):
        for x in range(80, SIZE - 80, 16):
            gap_x = np.maximum(boxes[:, 0] - x, x - boxes[:, 2])
            gap_y = np.maximum(boxes[:, 1] - y, y - boxes[:, 3])
            if np.all(np.maximum(gap_x, gap_y) > 30):
                return x + 0.5, y + 0.5
    raise AssertionError(f"scene {seed} has no clear spot")


PALM_X, PALM_Y = clear_spot(SEED)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return render_scene(SEED, size=SIZE, gsd=0.5, palms=[PalmAt(PALM_X, PALM_Y, 7.0)])


@pytest.fixture(scope="module")
def client(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("cases"),
        triton=triton_settings.model_copy(update={"url": triton_server.grpc_url}),
        decode=DecodeSettings(workers=1, file_timeout_s=120),
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


Variant = Callable[[Scene, Path], tuple[Path, dict[str, Any], Georef | None]]


def rgb_uint8(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    written = make_geotiff(path, SIZE, SIZE, data=scene.pixels, crs=scene.crs, transform=scene.transform)
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def rgb_uint16(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    data = scene.pixels.astype(np.uint16) * 180 + 900  # a 16-bit sensor range, stretched back per file
    written = make_geotiff(
        path, SIZE, SIZE, dtype="uint16", data=data, crs=scene.crs, transform=scene.transform
    )
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def float_with_nan(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    data = scene.pixels.astype(np.float32) / 255.0
    data[:, :120, 600:] = np.nan  # a corner with no data, away from the palm
    written = make_geotiff(
        path, SIZE, SIZE, dtype="float32", data=data, crs=scene.crs, transform=scene.transform
    )
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def rgba_alpha(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    alpha = np.full((1, SIZE, SIZE), 255, np.uint8)
    alpha[:, :, :150] = 0
    data = np.concatenate([scene.pixels, alpha])
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    written = make_geotiff(
        path, SIZE, SIZE, bands=4, data=data, crs=scene.crs, transform=scene.transform, colorinterp=interp
    )
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def nodata_border(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    data = np.maximum(scene.pixels, 1)
    data[:, :40, :] = 0
    data[:, :, -40:] = 0
    written = make_geotiff(path, SIZE, SIZE, data=data, nodata=0, crs=scene.crs, transform=scene.transform)
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def multispectral_bgrn(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    nir = scene.pixels.mean(axis=0, keepdims=True).astype(np.uint8)
    data = np.concatenate([scene.pixels[::-1], nir])  # blue, green, red, near infrared
    written = make_geotiff(
        path,
        SIZE,
        SIZE,
        bands=4,
        data=data,
        crs=scene.crs,
        transform=scene.transform,
        colorinterp=[ColorInterp.undefined] * 4,
        photometric="MINISBLACK",
    )
    return written, {"bands": "3,2,1"}, Georef(scene.crs, tuple(scene.transform)[:6])


def rotated(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    transform = scene.transform @ Affine.rotation(20)
    written = make_geotiff(path, SIZE, SIZE, data=scene.pixels, crs=scene.crs, transform=transform)
    return written, {}, Georef(scene.crs, tuple(transform)[:6])


def gcps_only(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    corners = [(0, 0), (SIZE, 0), (SIZE, SIZE), (0, SIZE), (SIZE / 2, SIZE / 2)]
    points = []
    for col, row in corners:
        x, y = scene.transform @ (col, row)
        points.append(GroundControlPoint(row=row, col=col, x=x, y=y))
    written = make_geotiff(path, SIZE, SIZE, data=scene.pixels, gcps=points, gcp_crs=scene.crs)
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def grey_one_band(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    grey = (scene.pixels.astype(np.float32) * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(axis=0)
    data = grey[None].round().astype(np.uint8)
    written = make_geotiff(path, SIZE, SIZE, bands=1, data=data, crs=scene.crs, transform=scene.transform)
    return written, {}, Georef(scene.crs, tuple(scene.transform)[:6])


def no_crs(scene: Scene, path: Path) -> tuple[Path, dict[str, Any], Georef | None]:
    return make_geotiff(path, SIZE, SIZE, data=scene.pixels, crs=None), {}, None


VARIANTS: dict[str, Variant] = {
    "rgb-uint8": rgb_uint8,
    "rgb-uint16-stretched": rgb_uint16,
    "float32-with-nan": float_with_nan,
    "rgba-alpha": rgba_alpha,
    "nodata-border": nodata_border,
    "4-band-bgrn-bands-3,2,1": multispectral_bgrn,
    "rotated-transform": rotated,
    "gcps-only": gcps_only,
    "grey-1-band": grey_one_band,
    "no-crs": no_crs,
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_palm_comes_back_at_its_place(
    name: str, scene: Scene, client: httpx.Client, tmp_path: Path
) -> None:
    path, params, georef = VARIANTS[name](scene, tmp_path / f"{name}.tif")
    want = pixel_to_lonlat(georef, PALM_X, PALM_Y) if georef is not None else None
    for fmt in ("json", "geojson"):
        with open(path, "rb") as f:
            response = client.post(
                "/v1/predict", params={**params, "format": fmt}, files={"file": (path.name, f, "image/tiff")}
            )
        assert response.status_code == 200, response.text
        body = response.json()
        if fmt == "json":
            found = [(d["category"], d["bbox"], d["geometry"]) for d in body["detections"]]
        else:
            found = [
                (f["properties"]["category"], f["properties"]["bbox_px"], f["geometry"])
                for f in body["features"]
            ]
        near = [
            (bbox, geometry)
            for category, bbox, geometry in found
            if category == "palm_tree"
            and abs(bbox[0] + bbox[2] / 2 - PALM_X) < 4
            and abs(bbox[1] + bbox[3] / 2 - PALM_Y) < 4
        ]
        assert len(near) == 1, f"{name}/{fmt}: expected the palm once near its pixel, found {len(near)}"
        bbox, geometry = near[0]
        assert (bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2) == pytest.approx((PALM_X, PALM_Y), abs=1.5)
        if georef is None:
            assert geometry is None
            continue
        assert want is not None
        lon, lat = np.array(geometry["coordinates"][0])[:4].mean(axis=0)
        x, y = lonlat_to_pixel(georef, lon, lat)
        assert (x, y) == pytest.approx((PALM_X, PALM_Y), abs=1.5), f"{name}/{fmt}: {lon}, {lat} vs {want}"

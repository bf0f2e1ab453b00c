"""The gateway over real HTTP (uvicorn on 127.0.0.1) in front of the real embedded tritonserver."""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import rasterio
from pycocotools.coco import COCO
from rasterio.errors import NotGeoreferencedWarning

from export.synth import PalmAt, Scene, render_scene, write_geotiff
from gateway.app import create_app
from gateway.settings import REPO_ROOT, DecodeSettings, LimitSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def gateway_settings(data_dir: Path, triton: TritonSettings, **limits: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        triton=triton,
        decode=DecodeSettings(workers=2, file_timeout_s=120),
        limits=LimitSettings(**limits),
    )


@pytest.fixture(scope="module")
def gateway(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """The gateway on a free port, talking to the session's tritonserver (it starts none itself)."""
    triton = triton_settings.model_copy(
        update={"url": triton_server.grpc_url, "metrics_url": triton_server.metrics_url}
    )
    settings = gateway_settings(tmp_path_factory.mktemp("gateway"), triton, max_upload_bytes=64 * 1024**2)
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def palm_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scene, Path]:
    """A populated 1024 px scene plus three palms at known places, one of them on the tile seam."""
    scene = render_scene(
        7001,
        size=1024,
        gsd=0.4,
        palms=[PalmAt(200.5, 700.5, 7.0), PalmAt(448.5, 300.5, 6.0), PalmAt(800.5, 150.5)],
    )
    path = write_geotiff(scene, tmp_path_factory.mktemp("scenes") / "palms.tif")
    return scene, path


def post(client: httpx.Client, path: Path, name: str | None = None, **params: Any) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/predict", params=params, files={"file": (name or path.name, f, "image/tiff")})


def write_plain(path: Path, driver: str, pixels: np.ndarray, **profile: Any) -> Path:
    """An image without georeferencing (PNG/JPEG, or a GeoTIFF shell); rasterio warns about that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        bands, height, width = pixels.shape
        with rasterio.open(
            path, "w", driver=driver, width=width, height=height, count=bands, dtype=pixels.dtype, **profile
        ) as dst:
            dst.write(pixels)
    return path


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box ``a`` (x1, y1, x2, y2) with each row of ``b``."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def xyxy(bbox: list[float]) -> np.ndarray:
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h])


def test_health_readiness_docs_and_metrics(gateway: httpx.Client) -> None:
    assert gateway.get("/healthz").json() == {"status": "ok"}
    ready = gateway.get("/readyz")
    assert ready.status_code == 200
    card = json.loads((REPO_ROOT / "model_repository/palm/1/model_card.json").read_text())
    assert ready.json() == {
        "status": "ready",
        "model": {
            "name": "palm",
            "version": card["version"],
            "triton_version": "1",
            "sha256": card["sha256"],
        },
    }
    assert gateway.get("/docs").status_code == 200
    spec = gateway.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    metrics = gateway.get("/metrics").text
    assert 'palm_http_requests_total{method="GET",route="/readyz",status="200"}' in metrics
    assert "palm_http_request_duration_seconds_bucket" in metrics


def test_detections_land_on_the_drawn_objects(gateway: httpx.Client, palm_scene: tuple[Scene, Path]) -> None:
    scene, path = palm_scene
    response = post(gateway, path, score_threshold=0.4)
    assert response.status_code == 200, response.text
    body = response.json()
    image = body["image"]
    assert (image["width"], image["height"]) == (1024, 1024)
    assert image["crs"] == scene.crs
    assert image["transform"] == pytest.approx(list(scene.transform)[:6])
    stages = dict(part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    assert set(stages) == {"upload", "open", "first_result", "tiles", "merge", "georeference", "render"}
    assert all(float(ms) >= 0 for ms in stages.values())
    assert body["model"]["sha256"]
    assert len(body["model"]["sha256"]) == 64
    dets = body["detections"]
    boxes = np.array([xyxy(d["bbox"]) for d in dets]).reshape(-1, 4)
    cats = np.array([d["category_id"] for d in dets])
    matched = 0
    for gt, cat in zip(scene.boxes, scene.categories, strict=True):
        same = boxes[cats == cat]
        if len(same) and iou(gt, same).max() >= 0.5:
            matched += 1
    recall = matched / len(scene.boxes)
    assert recall >= 0.8, f"only {matched} of {len(scene.boxes)} drawn objects were found"
    gt_all = scene.boxes
    precise = sum(iou(box, gt_all).max() >= 0.5 for box in boxes)
    assert precise / max(len(boxes), 1) >= 0.8, (
        f"{len(boxes) - precise} of {len(boxes)} detections hit nothing"
    )
    # The three palms placed on purpose, one across the x=384..512 seam, each found exactly once.
    palms = boxes[cats == 1]
    for gt in scene.boxes[-3:]:
        assert (iou(gt, palms) >= 0.5).sum() == 1


def test_geometry_puts_a_palm_at_its_known_lon_lat(gateway: httpx.Client, tmp_path: Path) -> None:
    """A palm drawn at a known lon/lat comes back there, in the json and in the geojson output."""
    scene = render_scene(7002, size=768, gsd=0.5, palms=[PalmAt(500.5, 260.5, 7.0)])
    path = write_geotiff(scene, tmp_path / "known.tif")
    lon, lat = scene.pixel_to_lonlat(500.5, 260.5)
    for fmt in ("json", "geojson"):
        response = post(gateway, path, format=fmt)
        assert response.status_code == 200, response.text
        if fmt == "json":
            found = [(d["category"], d["geometry"]) for d in response.json()["detections"]]
        else:
            assert response.headers["content-type"].startswith("application/geo+json")
            found = [(f["properties"]["category"], f["geometry"]) for f in response.json()["features"]]
        centres = []
        for category, geometry in found:
            ring = np.array(geometry["coordinates"][0])
            assert ring.shape == (5, 2)
            assert (ring[0] == ring[-1]).all()
            if category == "palm_tree":
                centres.append(scene.lonlat_to_pixel(*ring[:4].mean(axis=0)))
        near = [(x, y) for x, y in centres if abs(x - 500.5) < 8 and abs(y - 260.5) < 8]
        assert len(near) == 1, f"{fmt}: one palm expected at lon {lon:.6f} lat {lat:.6f}, found {len(near)}"
        assert near[0] == pytest.approx((500.5, 260.5), abs=1.5), fmt


def test_coco_output_loads_with_pycocotools(
    gateway: httpx.Client, palm_scene: tuple[Scene, Path], tmp_path: Path
) -> None:
    _, path = palm_scene
    response = post(gateway, path, format="coco")
    assert response.status_code == 200
    doc = response.json()
    target = tmp_path / "coco.json"
    target.write_text(json.dumps(doc))
    coco = COCO(str(target))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"palm_tree", "building"}
    (image,) = coco.loadImgs(coco.getImgIds())
    assert image["file_name"] == "palms.tif"
    assert image["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(coco.getAnnIds()) > 0
    results = coco.loadRes(doc["annotations"])
    assert len(results.getAnnIds()) == len(doc["annotations"])
    assert doc["info"]["tiling"] == {**doc["info"]["tiling"], "tile_size": 512, "overlap": 128}


def test_small_png_and_jpeg_are_accepted(gateway: httpx.Client, tmp_path: Path) -> None:
    scene = render_scene(7003, size=300, populate=True)
    for driver, ext in (("PNG", "png"), ("JPEG", "jpg")):
        path = write_plain(tmp_path / f"small.{ext}", driver, scene.pixels)
        response = post(gateway, path)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image"]["crs"] is None
        assert body["image"]["transform"] is None
        assert all(d["geometry"] is None for d in body["detections"])
        assert body["tiles"] == {"total": 1, "skipped": 0}


@pytest.mark.parametrize(
    ("content", "name", "status", "slug"),
    [
        (b"not an image at all", "notes.tif", 415, "unsupported-media-type"),
        (b"<html><body>502 Bad Gateway</body></html>", "scene.tif", 415, "unsupported-media-type"),
        (b"II*\x00" + b"\x00" * 60, "truncated.tif", 422, "corrupt-raster"),
    ],
)
def test_bad_input_gets_problem_json(
    gateway: httpx.Client, content: bytes, name: str, status: int, slug: str
) -> None:
    response = gateway.post("/v1/predict", files={"file": (name, io.BytesIO(content), "image/tiff")})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"].endswith(slug)
    assert problem["status"] == status
    assert problem["detail"]


def test_png_named_tif_and_dimension_bomb_are_refused(gateway: httpx.Client, tmp_path: Path) -> None:
    png = write_plain(tmp_path / "fake.tif", "PNG", np.zeros((1, 20, 20), np.uint8))
    response = post(gateway, png)
    assert response.status_code == 415
    assert "PNG" in response.json()["detail"]

    bomb = tmp_path / "bomb.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        profile = {"width": 100_000, "height": 100_000, "count": 1, "dtype": "uint8", "tiled": True}
        with rasterio.open(bomb, "w", driver="GTiff", compress="deflate", sparse_ok=True, **profile):
            pass  # a sparse file: a few hundred bytes claiming 10 GB of pixels
    started = time.monotonic()
    response = post(gateway, bomb)
    assert time.monotonic() - started < 5
    assert response.status_code == 413
    assert response.json()["type"].endswith("raster-too-large")


def test_parameters_are_validated(gateway: httpx.Client, palm_scene: tuple[Scene, Path]) -> None:
    _, path = palm_scene
    for params in ({"score_threshold": 1.5}, {"format": "shapefile"}, {"bands": "x,y"}, {"bands": "0,1,2"}):
        response = post(gateway, path, **params)
        assert response.status_code == 422, params
        assert response.headers["content-type"] == PROBLEM
    response = post(gateway, path, bands="5,2,1")
    assert response.status_code == 422
    assert "band" in response.json()["detail"].lower()
    response = gateway.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415
    assert gateway.get("/v1/nothing").headers["content-type"] == PROBLEM


def test_score_threshold_filters(gateway: httpx.Client, palm_scene: tuple[Scene, Path]) -> None:
    _, path = palm_scene
    low = post(gateway, path, score_threshold=0.1).json()["detections"]
    high = post(gateway, path, score_threshold=0.9).json()["detections"]
    assert len(high) <= len(low)
    assert all(d["score"] >= 0.9 for d in high)
    assert [d["score"] for d in low] == sorted((d["score"] for d in low), reverse=True)


def test_limits_give_413(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    tmp_path: Path,
    palm_scene: tuple[Scene, Path],
) -> None:
    _, path = palm_scene
    triton = triton_settings.model_copy(update={"url": triton_server.grpc_url})
    settings = gateway_settings(
        tmp_path, triton, max_predict_pixels=500_000, max_upload_bytes=path.stat().st_size - 1
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        too_big = post(client, path)
        assert too_big.status_code == 413
        assert too_big.json()["type"].endswith("upload-too-large")
    settings = gateway_settings(tmp_path, triton, max_predict_pixels=500_000)
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        too_many = post(client, path)
        assert too_many.status_code == 413
        problem = too_many.json()
        assert problem["type"].endswith("raster-too-large")
        assert "1,048,576" in problem["detail"]
    assert not list((tmp_path / "uploads").iterdir()), "refused uploads leave nothing on disk"


def test_triton_down_gives_503_with_retry_after_quickly(
    triton_settings: TritonSettings, tmp_path: Path, palm_scene: tuple[Scene, Path]
) -> None:
    _, path = palm_scene
    dead = triton_settings.model_copy(update={"url": "127.0.0.1:9", "request_timeout_s": 5.0})
    with (
        serve_in_thread(create_app(gateway_settings(tmp_path, dead))) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert client.get("/healthz").status_code == 200
        started = time.monotonic()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "Retry-After" in ready.headers
        response = post(client, path)
        assert time.monotonic() - started < 15
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        assert response.headers["content-type"] == PROBLEM


def test_server_keeps_serving_after_bad_input(gateway: httpx.Client, palm_scene: tuple[Scene, Path]) -> None:
    _, path = palm_scene
    for _ in range(3):
        gateway.post("/v1/predict", files={"file": ("x.tif", io.BytesIO(b"II*\x00garbage"), "image/tiff")})
    response = post(gateway, path)
    assert response.status_code == 200
    assert response.json()["detections"]


def test_metrics_describe_the_model_the_inputs_and_triton(
    gateway: httpx.Client, palm_scene: tuple[Scene, Path]
) -> None:
    _, path = palm_scene
    assert (
        gateway.post(
            "/v1/predict", files={"file": ("scene.tif", path.read_bytes(), "image/tiff")}
        ).status_code
        == 200
    )
    text = gateway.get("/metrics").text
    card = json.loads((REPO_ROOT / "model_repository/palm/1/model_card.json").read_text())
    assert f'palm_model_info{{name="palm",sha256="{card["sha256"]}",version="{card["version"]}"}} 1.0' in text
    assert 'palm_build_info{version="' in text
    for family in (
        "palm_input_channel_mean_bucket",
        "palm_input_colourfulness_count",
        "palm_input_gsd_meters_sum",
        "palm_tile_detections_bucket",
        "palm_detection_score_count",
    ):
        assert family in text, family
    triton = gateway.get("/metrics/triton")
    assert triton.status_code == 200
    assert 'nv_inference_count{model="palm",version="1"}' in triton.text

"""Any detector as a drop-in: a second model, built here, served by the real embedded tritonserver.

"markers" (tests/markers.py) differs from palm in everything the gateway must not assume: three
categories with ids 10, 20 and 30, 256 px tiles, K = 100 rows per tile, tensors named ``pixels`` and
``boxes``. Its graph finds each class's coloured square in a tile, so where the boxes must land is
known: the image below spans 3 x 3 tiles of 256 px (offsets 0, 192, 344 across and 0, 192, 244 down,
the overlap a quarter of the tile), the red square crosses the seam between the first two columns, the
green one lies whole in four tiles, the blue one is cut by the bottom of the middle row. After the seam
merge each is found once, at its pixels, georeferenced through the file's transform.

The gateway is started the way ``make run`` starts it, with ``PALM_TRITON__MODEL_NAME`` naming the
model (and its own embedded Triton); ``palm-serve predict`` runs against a second server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pycocotools.coco import COCO
from rasterio.warp import transform as warp_transform

from gateway.app import create_app
from gateway.settings import Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests import markers
from tests.factories import make_geotiff, north_up
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 600, 500
CRS = "EPSG:32633"
TRANSFORM = north_up((500_000.0, 4_000_000.0), 0.5)
SQUARES = (
    markers.Marker(category_id=10, x=170, y=30, size=50),  # across the seam of columns 0 and 1
    markers.Marker(category_id=20, x=400, y=300, size=40),  # whole in four tiles
    markers.Marker(category_id=30, x=20, y=420, size=30),  # cut by the bottom of row 1, whole in row 2
)
NAMES = {10: "red_marker", 20: "green_marker", 30: "blue_marker"}
CLI = [sys.executable, "-m", "gateway.cli"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return markers.write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels = markers.draw(WIDTH, HEIGHT, list(SQUARES))
    path = tmp_path_factory.mktemp("images") / "squares.tif"
    return make_geotiff(path, WIDTH, HEIGHT, crs=CRS, transform=TRANSFORM, data=pixels, photometric="RGB")


@pytest.fixture(scope="module")
def gateway(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """``palm-serve serve`` as ``make run`` starts it, told by the environment to serve "markers"."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PALM_TRITON__MODEL_NAME", markers.NAME)
        env.setenv("PALM_TRITON__MODEL_REPOSITORY", str(repository))
        env.setenv("PALM_TRITON__MODEL_CONFIG_NAME", "")  # the model's own config.pbtxt
        env.setenv("PALM_TRITON__READY_TIMEOUT_S", "300")
        env.delenv("PALM_TRITON_URL", raising=False)
        env.delenv("PALM_TRITON__URL", raising=False)
        settings = Settings(data_dir=tmp_path_factory.mktemp("gateway"))
    assert settings.triton.url is None, "the gateway starts its own tritonserver"
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def markers_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """A tritonserver serving "markers", for ``palm-serve predict`` to connect to."""
    settings = TritonSettings(
        model_name=markers.NAME, model_repository=repository, model_config_name="", ready_timeout_s=300
    )
    with EmbeddedTriton(settings, tmp_path_factory.mktemp("triton")) as server:
        yield server


def lonlat_corners(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The four corners of a pixel box in EPSG:4326, from the file's transform and CRS."""
    x1, y1, x2, y2 = box
    xs, ys = zip(*(TRANSFORM @ corner for corner in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))), strict=True)
    lon, lat = warp_transform(CRS, "EPSG:4326", list(xs), list(ys))
    return sorted(zip(lon, lat, strict=True))


def ring_corners(geometry: dict[str, Any]) -> list[tuple[float, float]]:
    (ring,) = geometry["coordinates"]
    assert ring[0] == ring[-1]
    return sorted((lon, lat) for lon, lat in ring[:-1])


def assert_georeferenced(geometry: dict[str, Any], box: tuple[float, float, float, float]) -> None:
    assert geometry["type"] == "Polygon"
    got, expected = ring_corners(geometry), lonlat_corners(box)
    assert np.allclose(np.array(got), np.array(expected), rtol=0, atol=1e-9), (got, expected)


def xywh(box: tuple[float, float, float, float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def predict(client: httpx.Client, path: Path, **params: Any) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/predict", params=params, files={"file": (path.name, f, "image/tiff")})


def load_coco(content: bytes, tmp_path: Path) -> COCO:
    path = tmp_path / "coco.json"
    path.write_bytes(content)
    return COCO(str(path))


def test_predict_reports_the_models_categories_and_boxes_at_the_squares(
    gateway: httpx.Client, image: Path, tmp_path: Path
) -> None:
    ready = gateway.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["model"]["name"] == "markers"
    assert ready.json()["model"]["version"] == "0.1.0"

    response = predict(gateway, image, score_threshold=0.5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tiles"]["total"] == 9
    found = [(d["category_id"], d["category"], d["score"], d["bbox"]) for d in body["detections"]]
    assert found == [
        (m.category_id, NAMES[m.category_id], score, xywh(m.box))
        for m, score in zip(SQUARES, markers.SCORES, strict=True)
    ]
    for detection, square in zip(body["detections"], SQUARES, strict=True):
        assert_georeferenced(detection["geometry"], square.box)

    coco = load_coco(predict(gateway, image, score_threshold=0.5, format="coco").content, tmp_path)
    assert coco.loadCats(coco.getCatIds()) == list(markers.CATEGORIES)
    assert coco.dataset["info"]["tiling"]["tile_size"] == 256
    assert coco.dataset["info"]["tiling"]["overlap"] == 64
    for square in SQUARES:
        (annotation,) = coco.loadAnns(coco.getAnnIds(catIds=[square.category_id]))
        assert annotation["bbox"] == xywh(square.box)

    geojson = predict(gateway, image, score_threshold=0.5, format="geojson").json()
    features = {f["properties"]["category"]: f for f in geojson["features"]}
    assert set(features) == set(NAMES.values())
    for square in SQUARES:
        feature = features[NAMES[square.category_id]]
        assert feature["properties"]["category_id"] == square.category_id
        assert feature["properties"]["bbox_px"] == xywh(square.box)
        assert_georeferenced(feature["geometry"], square.box)


def test_a_job_with_the_model_reports_its_categories_in_coco(
    gateway: httpx.Client, image: Path, tmp_path: Path
) -> None:
    created = gateway.post(
        "/v1/jobs",
        files=[("files", ("a/squares.tif", image.read_bytes(), "image/tiff"))],
        data={"name": "markers", "score_threshold": "0.5"},
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["parameters"]["tile_size"] == 256
    assert created.json()["parameters"]["overlap"] == 64
    deadline = time.monotonic() + 300
    job = created.json()
    while not (job["status"] in ("succeeded", "failed") and job["results"]["ready"]):
        assert time.monotonic() < deadline, f"job did not end: {job}"
        time.sleep(0.2)
        job = gateway.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job

    coco = load_coco(gateway.get(f"/v1/jobs/{job_id}/results").content, tmp_path)
    assert coco.loadCats(coco.getCatIds()) == list(markers.CATEGORIES)
    assert coco.dataset["info"]["model"]["name"] == "markers"
    annotations = coco.loadAnns(coco.getAnnIds())
    assert sorted((a["category_id"], a["bbox"]) for a in annotations) == [
        (m.category_id, xywh(m.box)) for m in SQUARES
    ]


def run_predict(triton: EmbeddedTriton, repository: Path, out: Path, image: Path, fmt: str) -> Any:
    env = {
        **os.environ,
        "PALM_TRITON_URL": triton.grpc_url,
        "PALM_TRITON__MODEL_NAME": markers.NAME,
        "PALM_TRITON__MODEL_REPOSITORY": str(repository),
        "PALM_DATA_DIR": str(out / "var"),
    }
    command = [*CLI, "predict", str(image), "--out", str(out), "--format", fmt, "--no-progress"]
    command += ["--score-threshold", "0.5"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_palm_serve_predict_serves_the_model_named_in_the_environment(
    markers_triton: EmbeddedTriton, repository: Path, image: Path, tmp_path: Path
) -> None:
    result = run_predict(markers_triton, repository, tmp_path, image, "coco")

    assert result.returncode == 0, result.stderr
    coco = COCO(str(tmp_path / "squares.coco.json"))
    assert coco.loadCats(coco.getCatIds()) == list(markers.CATEGORIES)
    assert sorted((a["category_id"], a["bbox"]) for a in coco.loadAnns(coco.getAnnIds())) == [
        (m.category_id, xywh(m.box)) for m in SQUARES
    ]


def test_a_model_without_a_card_is_served_as_triton_describes_it(
    markers_triton: EmbeddedTriton, repository: Path, image: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(repository, bare)
    (bare / markers.NAME / "1" / "model_card.json").unlink()

    result = run_predict(markers_triton, bare, tmp_path / "out", image, "json")

    assert result.returncode == 0, result.stderr
    assert "classes are reported as class_<id>" in result.stderr
    body = json.loads((tmp_path / "out" / "squares.json").read_text())
    assert [(d["category"], d["bbox"]) for d in body["detections"]] == [
        (f"class_{m.category_id}", xywh(m.box)) for m in SQUARES
    ]


def test_a_card_that_disagrees_with_the_server_stops_the_start_naming_both(
    markers_triton: EmbeddedTriton, repository: Path, image: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    shutil.copytree(repository, wrong)
    card_path = wrong / markers.NAME / "1" / "model_card.json"
    card_path.write_text(json.dumps(markers.card(tile=320)))

    result = run_predict(markers_triton, wrong, tmp_path / "out", image, "json")

    assert result.returncode == 2, result.stderr
    assert "tile size 320 vs 256" in result.stderr
    assert "card vs Triton" in result.stderr
    assert str(card_path) in result.stderr
    assert "Traceback" not in result.stderr


# The exporter (torch.onnx, dynamo) calls a pytree API that torch itself deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.slow
async def test_a_wrapped_export_is_served_by_the_embedded_triton_as_written(tmp_path: Path) -> None:
    """docs/bring-your-own-model.md's worked example: export.wrap's entry, loaded with its
    configs/cpu.pbtxt, describes itself to the gateway and answers what onnxruntime answers."""
    import torch

    from export.evaluate import onnx_model
    from export.wrap import Category, ContractWrapper, TinyYolo, write_repository
    from gateway.triton.client import TritonClient

    torch.manual_seed(0)
    wrapper = ContractWrapper(TinyYolo(2), [5, 9], top_k=300, tile=128)
    contract = write_repository(tmp_path, "yolo", wrapper, [Category(5, "car"), Category(9, "bus")])
    settings = TritonSettings(model_name="yolo", model_repository=tmp_path, ready_timeout_s=300)
    tiles = np.random.default_rng(4).integers(0, 256, (3, 3, 128, 128), dtype=np.uint8)
    _, run_onnx = onnx_model(tmp_path / "yolo" / "1" / "model.onnx")

    with EmbeddedTriton(settings, tmp_path / "triton") as server:
        async with TritonClient(server.grpc_url, settings) as client:
            assert await client.served_contract() == contract
            served = await client.infer(tiles)

    expected = run_onnx(tiles)
    assert served.shape == expected.shape == (3, 300, 6)
    for mine, theirs in zip(served, expected, strict=True):
        mine_sorted = mine[np.lexsort(np.round(mine[:, 3::-1], 1).T)]
        theirs_sorted = theirs[np.lexsort(np.round(theirs[:, 3::-1], 1).T)]
        np.testing.assert_allclose(mine_sorted, theirs_sorted, rtol=1e-4, atol=1e-3)

"""The out-of-domain guard as users meet it: real gateway (uvicorn, decode workers, job worker) in front of
the real embedded tritonserver serving the shipped model and its card's baseline; and ``palm-serve
predict`` as a subprocess. Familiar scenes (colour and grey) pass quietly; foreign inputs (over-exposed,
thermal, a scanned page, a photo) carry a warning and their score in json, COCO and GeoJSON, in a job's
file resource and results, and on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from export.synth import fractal_noise, render_scene, to_grey, write_geotiff
from gateway.app import create_app
from gateway.settings import REPO_ROOT, DecodeSettings, JobSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests.factories import make_geotiff
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

CARD = json.loads((REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json").read_text())
THRESHOLD = CARD["out_of_domain"]["threshold"]
FLAG = "out of domain"


@pytest.fixture(scope="module")
def gateway(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    triton = triton_settings.model_copy(
        update={"url": triton_server.grpc_url, "metrics_url": triton_server.metrics_url}
    )
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("gateway"),
        triton=triton,
        decode=DecodeSettings(workers=2, file_timeout_s=120),
        jobs=JobSettings(lease_s=30, poll_s=0.2, files_in_flight=2),
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=180) as client:
        yield client


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two familiar scenes and four foreign inputs, seeded, at a GSD the model was trained for."""
    root = tmp_path_factory.mktemp("domain")
    scene = render_scene(7102, 768)
    rng = np.random.default_rng(7103)
    field = fractal_noise(rng, 640, 640, (320, 160, 80, 40, 20))
    page = np.full((1, 700, 560), 236, np.uint8)
    for top in range(60, 660, 30):
        page[0, top : top + 12, 40:520] = np.where(rng.random(480) < 0.75, 40, 236).astype(np.uint8)
    photo = np.empty((3, 600, 480), np.uint8)
    photo[0], photo[1], photo[2] = 120, 170, 235  # sky
    photo[:, 150:450, 140:340] = np.array([224, 172, 140], np.uint8)[:, None, None]  # a face
    photo[:, 450:, :] = np.array([190, 30, 40], np.uint8)[:, None, None]  # a red shirt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            root / "photo.png", "w", driver="PNG", width=480, height=600, count=3, dtype="uint8"
        ) as dst:
            dst.write(photo)
    return {
        "scene.tif": write_geotiff(scene, root / "scene.tif"),
        "grey_scene.tif": make_geotiff(
            root / "grey_scene.tif",
            768,
            768,
            bands=1,
            data=to_grey(scene.pixels)[:1],
            transform=scene.transform,
        ),
        "overexposed.tif": write_geotiff(
            replace(scene, pixels=np.clip(scene.pixels.astype(np.float32) * 3, 0, 255).astype(np.uint8)),
            root / "overexposed.tif",
        ),
        "thermal.tif": make_geotiff(
            root / "thermal.tif",
            640,
            640,
            bands=1,
            dtype="uint16",
            data=(29_500 + 800 * field)[None].astype(np.uint16),
        ),
        "scanned_page.tif": make_geotiff(root / "scanned_page.tif", 560, 700, bands=1, data=page, crs=None),
        "photo.png": root / "photo.png",
    }


FAMILIAR = ["scene.tif", "grey_scene.tif"]
FOREIGN = ["overexposed.tif", "thermal.tif", "scanned_page.tif", "photo.png"]


def predict(client: httpx.Client, path: Path, fmt: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        response = client.post(
            "/v1/predict", params={"format": fmt}, files={"file": (path.name, f, "image/tiff")}
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def check_scored(check: dict[str, Any], flagged: bool) -> None:
    assert check["threshold"] == THRESHOLD
    assert check["flagged"] is flagged
    assert (check["score"] > THRESHOLD) is flagged
    assert check["variant"] in ("colour", "grey")
    assert check["statistic"] in CARD["input_baseline"]["statistics"]


@pytest.mark.parametrize("name", FAMILIAR)
def test_a_familiar_scene_passes_quietly_in_every_format(
    gateway: httpx.Client, files: dict[str, Path], name: str
) -> None:
    body = predict(gateway, files[name], "json")
    check_scored(body["image"]["out_of_domain"], flagged=False)
    assert body["image"]["out_of_domain"]["variant"] == ("grey" if name.startswith("grey") else "colour")
    assert not any(FLAG in w for w in body["warnings"])
    assert body["detections"], "a familiar scene has palms and buildings"
    coco = predict(gateway, files[name], "coco")
    check_scored(coco["images"][0]["out_of_domain"], flagged=False)
    assert not any(FLAG in w for w in coco["images"][0]["warnings"])
    geojson = predict(gateway, files[name], "geojson")
    assert not any(FLAG in w["message"] for w in geojson["warnings"])


@pytest.mark.parametrize("name", FOREIGN)
def test_a_foreign_input_carries_a_warning_and_its_score_in_every_format(
    gateway: httpx.Client, files: dict[str, Path], name: str
) -> None:
    body = predict(gateway, files[name], "json")
    check = body["image"]["out_of_domain"]
    check_scored(check, flagged=True)
    flagged = [w for w in body["warnings"] if FLAG in w]
    assert len(flagged) == 1
    assert f"{check['score']:.1f} standard deviations" in flagged[0]
    assert check["statistic"] in flagged[0]

    coco = predict(gateway, files[name], "coco")
    image = coco["images"][0]
    assert image["file_name"] == name
    assert image["out_of_domain"] == check
    assert flagged[0] in image["warnings"]

    geojson = predict(gateway, files[name], "geojson")
    assert {"file_name": name, "message": flagged[0]} in geojson["warnings"]


def test_a_job_scores_each_file_in_its_resource_and_its_results(
    gateway: httpx.Client, files: dict[str, Path]
) -> None:
    names = ["scene.tif", "overexposed.tif", "thermal.tif"]
    upload = [("files", (n, files[n].read_bytes(), "image/tiff")) for n in names]
    created = gateway.post("/v1/jobs", files=upload)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        job = gateway.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") and job["results"]["ready"]:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded"

    listed = {f["name"]: f for f in gateway.get(f"/v1/jobs/{job_id}/files").json()["files"]}
    check_scored(listed["scene.tif"]["out_of_domain"], flagged=False)
    assert not any(FLAG in w for w in listed["scene.tif"]["warnings"])
    for name in ("overexposed.tif", "thermal.tif"):
        check_scored(listed[name]["out_of_domain"], flagged=True)
        assert any(FLAG in w for w in listed[name]["warnings"])

    coco = gateway.get(f"/v1/jobs/{job_id}/results").json()
    images = {i["file_name"]: i for i in coco["images"]}
    for name in names:
        assert images[name]["out_of_domain"] == listed[name]["out_of_domain"]
        assert images[name]["warnings"] == listed[name]["warnings"]
    geojson = gateway.get(f"/v1/jobs/{job_id}/results.geojson")
    assert geojson.status_code == 200, geojson.text
    messages = {(w["file_name"], FLAG in w["message"]) for w in geojson.json()["warnings"]}
    assert ("overexposed.tif", True) in messages
    assert ("thermal.tif", True) in messages
    assert ("scene.tif", True) not in messages


def test_palm_serve_predict_prints_the_score_and_warns(
    triton_server: EmbeddedTriton, files: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ, "PALM_TRITON_URL": triton_server.grpc_url, "PALM_DATA_DIR": str(tmp_path / "var")}
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "predict",
            str(files["scene.tif"]),
            str(files["overexposed.tif"]),
            "--out",
            str(out),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"overexposed.tif: warning: {FLAG}" in result.stderr
    assert f"scene.tif: warning: {FLAG}" not in result.stderr
    lines = {line.split(":")[0].rsplit("/", 1)[-1]: line for line in result.stdout.splitlines()}
    assert "out-of-domain score" in lines["scene.tif"]
    assert "out-of-domain score" in lines["overexposed.tif"]
    written = json.loads((out / "overexposed.json").read_text())
    check_scored(written["image"]["out_of_domain"], flagged=True)

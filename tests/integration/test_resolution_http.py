"""Resolution-aware inference on the real stack: ``/v1/predict``, bulk jobs and ``palm-serve predict`` in
front of the real embedded tritonserver, on drone-like, Landsat-like and unreferenced files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from export.synth import PalmAt, Scene, render_scene, write_geotiff
from gateway.app import create_app
from gateway.settings import DecodeSettings, JobSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from palm_serve import Client
from palm_serve.errors import ProblemError
from tests.factories import make_geotiff, north_up
from tests.integration.server import serve_in_thread
from tests.integration.test_api import iou, write_plain, xyxy

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
CLI = [sys.executable, "-m", "gateway.cli"]
PALMS = [PalmAt(400.5, 500.5, 7.0), PalmAt(1100.5, 300.5, 6.5), PalmAt(760.5, 1200.5, 7.5)]


@pytest.fixture(scope="module")
def gateway(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("gateway"),
        triton=triton_settings.model_copy(update={"url": triton_server.grpc_url}),
        decode=DecodeSettings(workers=2, file_timeout_s=120),
        jobs=JobSettings(lease_s=10, poll_s=0.2, files_in_flight=2),
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=180) as client:
        yield client


@pytest.fixture(scope="module")
def drone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scene, Path]:
    """A 1536 px scene at 0.1 m (154 m a side) with three palms drawn at known pixels."""
    scene = render_scene(7101, size=1536, gsd=0.1, palms=PALMS)
    return scene, write_geotiff(scene, tmp_path_factory.mktemp("drone") / "drone.tif")


@pytest.fixture(scope="module")
def landsat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30 m file, the GSD of Landsat."""
    return make_geotiff(
        tmp_path_factory.mktemp("landsat") / "landsat.tif", 400, 300, transform=north_up(pixel_size=30)
    )


def post(client: httpx.Client, path: Path, name: str | None = None, **params: Any) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/predict", params=params, files={"file": (name or path.name, f, "image/tiff")})


def found_palms(scene: Scene, detections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detection matching each palm placed on purpose (IoU >= 0.5 with its drawn box)."""
    palms = [d for d in detections if d["category"] == "palm_tree"]
    boxes = np.array([xyxy(d["bbox"]) for d in palms]).reshape(-1, 4)
    matches = []
    for truth in scene.boxes[-len(PALMS) :]:
        overlaps = iou(truth, boxes) if len(boxes) else np.zeros(0)
        if len(overlaps) and overlaps.max() >= 0.5:
            matches.append(palms[int(overlaps.argmax())])
    return matches


def test_a_drone_scene_is_resampled_and_its_palms_land_on_their_pixels_and_places(
    gateway: httpx.Client, drone: tuple[Scene, Path]
) -> None:
    scene, path = drone
    response = post(gateway, path, score_threshold=0.3)
    assert response.status_code == 200, response.text
    body = response.json()
    image = body["image"]
    assert (image["width"], image["height"]) == (1536, 1536)
    assert image["gsd_m"] == pytest.approx(0.1, rel=0.01)
    assert (image["gsd_source"], image["inference_gsd_m"]) == ("file", 0.3)
    assert image["resample_factor"] == pytest.approx(3.0, rel=0.01)
    assert body["tiles"]["total"] <= 4  # 1536 px at 0.1 m is about 512 px at 0.3 m
    assert body["warnings"] == []
    matches = found_palms(scene, body["detections"])
    assert len(matches) == len(PALMS), (
        "every palm drawn at a known pixel is found there, in the file's pixels"
    )
    for palm, match in zip(PALMS, matches, strict=True):
        ring = np.array(match["geometry"]["coordinates"][0][:4])
        x, y = scene.lonlat_to_pixel(*ring.mean(axis=0))
        assert (x, y) == pytest.approx((palm.x, palm.y), abs=8.0)  # 0.8 m: within a crown's few pixels

    coco = post(gateway, path, format="coco").json()
    (entry,) = coco["images"]
    assert {k: entry[k] for k in ("gsd_source", "inference_gsd_m")} == {
        "gsd_source": "file",
        "inference_gsd_m": 0.3,
    }
    assert entry["resample_factor"] == pytest.approx(3.0, rel=0.01)
    geojson = post(gateway, path, format="geojson").json()
    (described,) = geojson["images"]
    assert (described["file_name"], described["inference_gsd_m"]) == ("drone.tif", 0.3)


def test_a_landsat_like_file_is_refused_naming_both_gsds_unless_resampling_is_off(
    gateway: httpx.Client, landsat: Path
) -> None:
    refused = post(gateway, landsat)
    assert refused.status_code == 422
    assert refused.headers["content-type"] == PROBLEM
    problem = refused.json()
    assert problem["type"] == "https://palm-serve.dev/problems/resolution-out-of-range"
    assert "30 m" in problem["detail"]
    assert "0.3-0.6 m" in problem["detail"]
    assert problem["gsd_m"] == pytest.approx(30.0, rel=0.01)
    assert problem["model_gsd_m"] == {"min": 0.3, "max": 0.6}
    assert problem["max_gsd_m"] == 1.2

    anyway = post(gateway, landsat, resample="off")
    assert anyway.status_code == 200, anyway.text
    body = anyway.json()
    assert body["image"]["resample_factor"] == 1.0
    assert body["image"]["gsd_m"] == pytest.approx(30.0, rel=0.01)
    assert any("not meaningful" in w for w in body["warnings"])


def test_the_corpus_landsat_scene_is_refused_by_default(gateway: httpx.Client, corpus_dir: Path) -> None:
    response = post(gateway, corpus_dir / "rasterio/tests/data/RGB.byte.tif")
    assert response.status_code == 422
    assert response.json()["type"].endswith("/resolution-out-of-range")
    assert "300 m" in response.json()["detail"]


def test_a_file_without_crs_warns_and_a_stated_gsd_resamples_it(
    gateway: httpx.Client, drone: tuple[Scene, Path], tmp_path: Path
) -> None:
    scene, _ = drone
    png = write_plain(tmp_path / "drone.png", "PNG", scene.pixels)
    unknown = post(gateway, png)
    assert unknown.status_code == 200, unknown.text
    body = unknown.json()
    assert (body["image"]["gsd_m"], body["image"]["resample_factor"]) == (None, 1.0)
    assert any("ground sample distance is unknown" in w for w in body["warnings"])

    stated = post(gateway, png, gsd=0.1)
    assert stated.status_code == 200, stated.text
    body = stated.json()
    image = body["image"]
    assert (image["gsd_m"], image["gsd_source"], image["inference_gsd_m"]) == (0.1, "caller", 0.3)
    assert image["resample_factor"] == pytest.approx(3.0)
    assert not any("ground sample distance" in w for w in body["warnings"])
    assert len(found_palms(scene, body["detections"])) == len(PALMS)
    assert all(d["geometry"] is None for d in body["detections"])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"resample": "sometimes"}, "resample must be auto or off"),
        ({"gsd": "-1"}, "gsd must be"),
        ({"gsd": "nan"}, "gsd must be"),
        ({"resampling": "off"}, "unknown query parameter 'resampling'"),
    ],
)
def test_resolution_parameters_are_checked(
    gateway: httpx.Client, landsat: Path, params: dict[str, str], named: str
) -> None:
    response = post(gateway, landsat, **params)
    assert response.status_code == 422
    assert response.json()["type"].endswith("/invalid-parameter")
    assert named in response.json()["detail"]


def wait_done(client: httpx.Client, job_id: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") and job["results"]["ready"]:
            return dict(job)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def test_in_a_job_the_coarse_file_fails_alone_and_the_others_report_their_gsd(
    gateway: httpx.Client, drone: tuple[Scene, Path], landsat: Path
) -> None:
    _, drone_path = drone
    files = [("files", (p.name, p.read_bytes(), "image/tiff")) for p in (landsat, drone_path)]
    created = gateway.post("/v1/jobs", files=files)
    assert created.status_code == 202, created.text
    job = wait_done(gateway, created.json()["id"])
    assert job["status"] == "succeeded"
    assert (job["progress"]["files_done"], job["progress"]["files_failed"]) == (1, 1)
    (error,) = job["errors"]
    assert error["file"] == "landsat.tif"
    assert error["type"].endswith("/resolution-out-of-range")
    assert "30 m" in error["detail"]
    listed = {f["name"]: f for f in gateway.get(f"/v1/jobs/{job['id']}/files").json()["files"]}
    assert listed["drone.tif"]["inference_gsd_m"] == 0.3
    assert listed["drone.tif"]["resample_factor"] == pytest.approx(3.0, rel=0.01)
    assert listed["landsat.tif"]["status"] == "failed"
    coco = gateway.get(f"/v1/jobs/{job['id']}/results").json()
    (image,) = coco["images"]
    assert (image["file_name"], image["gsd_source"], image["inference_gsd_m"]) == ("drone.tif", "file", 0.3)
    assert coco["annotations"], "the drone file's detections are in the job's results"
    geojson = gateway.get(f"/v1/jobs/{job['id']}/results.geojson").json()
    assert [i["file_name"] for i in geojson["images"]] == ["drone.tif"]

    anyway = gateway.post("/v1/jobs", files=files[:1], data={"resample": "off"})
    assert anyway.status_code == 202, anyway.text
    job = wait_done(gateway, anyway.json()["id"])
    assert (job["progress"]["files_done"], job["progress"]["files_failed"]) == (1, 0)
    assert job["parameters"]["resample"] == "off"
    (listed_file,) = gateway.get(f"/v1/jobs/{job['id']}/files").json()["files"]
    assert any("not meaningful" in w for w in listed_file["warnings"])


def test_a_job_refuses_bad_resolution_parameters(gateway: httpx.Client, landsat: Path) -> None:
    files = [("files", (landsat.name, landsat.read_bytes(), "image/tiff"))]
    for data, named in (
        ({"resample": "never"}, "resample must be auto or off"),
        ({"gsd": "0"}, "gsd must be"),
    ):
        response = gateway.post("/v1/jobs", files=files, data=data)
        assert response.status_code == 422, response.text
        assert named in response.json()["detail"]


def run_cli(
    triton_server: EmbeddedTriton, tmp_path: Path, *arguments: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PALM_TRITON_URL": triton_server.grpc_url, "PALM_DATA_DIR": str(tmp_path / "var")}
    return subprocess.run(
        [*CLI, "predict", *arguments, "--no-progress"], env=env, capture_output=True, text=True, timeout=300
    )


def test_the_cli_refuses_a_coarse_file_and_runs_it_when_allowed(
    triton_server: EmbeddedTriton, landsat: Path, tmp_path: Path
) -> None:
    refused = run_cli(triton_server, tmp_path, str(landsat), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1, refused.stderr
    assert "Ground sample distance outside the model's range" in refused.stderr
    assert "30 m" in refused.stderr
    assert "--allow-any-resolution" in refused.stderr
    assert not list((tmp_path / "refused").glob("*.json"))

    allowed = run_cli(
        triton_server, tmp_path, str(landsat), "--allow-any-resolution", "--out", str(tmp_path / "allowed")
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr
    assert "not meaningful" in allowed.stderr
    body = json.loads((tmp_path / "allowed" / "landsat.json").read_text())
    assert body["image"]["resample_factor"] == 1.0


def test_the_cli_takes_a_stated_gsd_and_checks_it(
    triton_server: EmbeddedTriton, drone: tuple[Scene, Path], tmp_path: Path
) -> None:
    scene, _ = drone
    plain = make_geotiff(tmp_path / "plain.tif", 1536, 1536, data=scene.pixels, crs=None)
    done = run_cli(triton_server, tmp_path, str(plain), "--gsd", "0.1", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    body = json.loads((tmp_path / "out" / "plain.json").read_text())
    assert (body["image"]["gsd_source"], body["image"]["inference_gsd_m"]) == ("caller", 0.3)
    assert len(found_palms(scene, body["detections"])) == len(PALMS)

    wrong = run_cli(triton_server, tmp_path, str(plain), "--gsd", "-2")
    assert wrong.returncode == 2
    assert "gsd must be the ground sample distance" in wrong.stderr


def test_the_python_client_passes_resample_and_gsd(gateway: httpx.Client, landsat: Path) -> None:
    with Client(str(gateway.base_url)) as client:
        with pytest.raises(ProblemError) as refused:
            client.predict(landsat)
        assert refused.value.status == 422
        assert refused.value.slug == "resolution-out-of-range"
        assert client.predict(landsat, resample="off")["image"]["resample_factor"] == 1.0
        job = client.jobs.create([landsat], resample="off", name="coarse on purpose")
        job.wait(progress=False)
        assert (job.progress.files_done, job.progress.files_failed) == (1, 0)

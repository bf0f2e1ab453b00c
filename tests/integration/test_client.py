"""``palm_serve.Client``, ``AsyncClient`` and ``palm-serve jobs`` against a real service.

The service is the real app under uvicorn with its decode workers, job worker and SQLite, around the
fake inference backend (one box per tile); the last test runs the client against the real Triton.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pycocotools.coco import COCO

from export.synth import PalmAt, render_scene, write_geotiff
from gateway.app import create_app
from gateway.settings import DecodeSettings, JobSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from palm_serve import AsyncClient, Client, Conflict, IntegrityError, NotFound, ServiceUnreachable
from palm_serve.progress import Progress
from tests.factories import make_geotiff
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration


def service_settings(data_dir: Path, **jobs: float) -> Settings:
    return Settings(
        data_dir=data_dir,
        decode=DecodeSettings(workers=2, file_timeout_s=60),
        jobs=JobSettings(**{"lease_s": 5, "poll_s": 0.2, "files_in_flight": 2, **jobs}),
    )


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = service_settings(tmp_path_factory.mktemp("service"))
    app = create_app(settings, inference=FakeInference(fixed_box(10, 10, 30, 30)))
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 tiny GeoTIFFs in three sub-folders."""
    root = tmp_path_factory.mktemp("folder")
    for area in range(3):
        (root / f"area{area}").mkdir()
    for i in range(300):
        make_geotiff(root / f"area{i % 3}" / f"scene{i:03d}.tif", width=48, height=40, seed=i)
    return root


@pytest.fixture
def small(tmp_path: Path) -> Path:
    root = tmp_path / "small"
    root.mkdir()
    for i in range(3):
        make_geotiff(root / f"s{i}.tif", width=600, height=500, seed=i)
    return root


class Interrupted(Exception):
    pass


def cli(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "jobs", *args, "--url", url],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def test_a_300_file_folder_interrupted_after_100_uploads_resumes_and_its_results_verify(
    url: str, folder: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []

    def stop_at_100(uploaded: int, total: int) -> None:
        seen.append((uploaded, total))
        if uploaded >= 100:
            raise Interrupted

    with Client(url) as client:
        with pytest.raises(Interrupted):
            client.jobs.create(folder, name="coast", staged_above=50, batch_files=25, on_upload=stop_at_100)
        assert seen == [(0, 300), (25, 300), (50, 300), (75, 300), (100, 300)]
        (staged,) = client.jobs.list(status="created")
        assert staged.progress.files_total == 100

        resumed: list[tuple[int, int]] = []
        job = client.jobs.create(
            folder, name="coast", staged_above=50, batch_files=25, on_upload=lambda *a: resumed.append(a)
        )
        assert job.id == staged.id
        assert resumed[0] == (100, 300)
        assert resumed[-1] == (300, 300)
        assert len(resumed) == 1 + 200 // 25

        updates: list[Progress] = []
        job.wait(progress=updates.append)
        assert job.status == "succeeded"
        assert updates[-1].files_total == 300
        coco_path = job.results(tmp_path / "out" / "results.json")
        geojson_path = job.geojson(tmp_path / "out" / "palms.geojson")

    assert hashlib.sha256(coco_path.read_bytes()).hexdigest() == job.data["results"]["sha256"]
    coco = COCO(str(coco_path))
    names = [image["file_name"] for image in coco.loadImgs(coco.getImgIds())]
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tif"))
    assert sorted(names) == expected
    assert len(set(names)) == 300
    features = json.loads(geojson_path.read_text())["features"]
    assert len(features) == len(coco.getAnnIds()) == job.progress.detections > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["palms.geojson", "results.json"]


def test_the_cli_resumes_an_upload_killed_after_100_files(url: str, folder: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "jobs",
        "submit",
        str(folder),
        "--url",
        url,
        "--name",
        "killed",
        "--staged-above",
        "50",
        "--batch-files",
        "20",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tmp_path) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith("uploaded 100/300"):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(30)
    assert "uploaded 100/300 files" in lines, lines

    again = subprocess.run(
        [*command, "--out", "results.json", "--geojson", "palms.geojson"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    resumed = next(line for line in again.stdout.splitlines() if line.startswith("resumed job"))
    already = int(resumed.split(": ")[1].split()[0])
    assert 100 <= already < 300
    assert "uploaded 300/300 files" in again.stdout
    coco = json.loads((tmp_path / "results.json").read_text())
    assert len(coco["images"]) == 300
    assert len(json.loads((tmp_path / "palms.geojson").read_text())["features"]) == len(coco["annotations"])


def test_every_exit_code_of_the_cli(url: str, small: Path, tmp_path: Path) -> None:
    good = cli("submit", str(small), "--wait", "--out", "coco.json", "--no-progress", url=url, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "coco.json").is_file()
    job_id = good.stdout.split()[1].rstrip(":")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "page.tif").write_bytes(b"<html><body>502 Bad Gateway</body></html>")
    (bad / "empty.tif").write_bytes(b"")
    mixed = cli("submit", str(small), str(bad / "page.tif"), "--wait", url=url, cwd=tmp_path)
    assert mixed.returncode == 1, mixed.stderr
    assert "1 of 4 file(s) failed" in mixed.stderr
    assert "page.tif" in mixed.stderr

    failed = cli("submit", str(bad), "--wait", url=url, cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr
    assert "failed" in failed.stderr

    with Client(url) as client:
        staged = client.request("POST", "/v1/jobs", json={"name": "never started"}).json()
    cancelled = cli("cancel", staged["id"], url=url, cwd=tmp_path)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"job {staged['id']}: cancelled")
    outcome = cli("results", staged["id"], "--wait", url=url, cwd=tmp_path)
    assert outcome.returncode == 2
    assert "cancelled" in outcome.stderr

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    unreachable = cli("list", url=nobody, cwd=tmp_path)
    assert unreachable.returncode == 3
    assert "cannot reach Palm Serve" in unreachable.stderr

    missing = cli("show", "no-such-job", url=url, cwd=tmp_path)
    assert missing.returncode == 4
    assert "No such job" in missing.stderr

    listing = cli("list", url=url, cwd=tmp_path)
    assert listing.returncode == 0
    assert job_id in listing.stdout
    shown = cli("show", job_id, url=url, cwd=tmp_path)
    assert "succeeded: 3/3 files" in shown.stdout
    downloaded = cli("results", job_id, "--geojson", "p.geojson", url=url, cwd=tmp_path)
    assert downloaded.returncode == 0, downloaded.stderr
    assert json.loads((tmp_path / "p.geojson").read_text())["type"] == "FeatureCollection"
    assert cli("delete", job_id, url=url, cwd=tmp_path).returncode == 0
    assert cli("show", job_id, url=url, cwd=tmp_path).returncode == 4


def test_errors_are_typed_problems_and_waiting_survives_without_events(url: str, small: Path) -> None:
    class NoEvents(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/events"):
                raise httpx.ConnectError("events blocked by a proxy", request=request)
            return super().handle_request(request)

    with Client(url, transport=NoEvents()) as client:
        with pytest.raises(NotFound) as missing:
            client.jobs.get("nope")
        assert missing.value.status == 404
        assert missing.value.type.endswith("/job-not-found")
        assert missing.value.title == "No such job"
        assert "nope" in missing.value.detail

        job = client.jobs.create(small, name="polled")
        assert job.wait(poll_s=0.2).status == "succeeded"
        assert job.progress.files_done == 3
        with pytest.raises(Conflict) as conflict:
            client.request("POST", f"/v1/jobs/{job.id}/start")
        assert conflict.value.slug == "job-conflict"


def test_a_tampered_download_is_refused(url: str, small: Path, tmp_path: Path) -> None:
    class Tamper(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if not request.url.path.endswith("/results"):
                return response
            body = response.read()
            return httpx.Response(response.status_code, headers=response.headers, content=body[:-2] + b" }")

    with Client(url, transport=Tamper()) as client:
        job = client.jobs.create(small).wait()
        with pytest.raises(IntegrityError, match="sha256"):
            job.results(tmp_path / "out" / "coco.json")
    assert list((tmp_path / "out").iterdir()) == [], "nothing is left where the document was to go"


async def test_the_async_client_does_what_the_sync_one_does(url: str, small: Path, tmp_path: Path) -> None:
    async with AsyncClient(url) as client:
        job = await client.jobs.create(small, name="async", staged_above=1, batch_files=2)
        updates: list[Progress] = []
        await job.wait(progress=updates.append)
        assert job.status == "succeeded"
        assert updates
        path = await job.results(tmp_path / "async.json")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == job.data["results"]["sha256"]
        names = [f["name"] async for f in job.files()]
        assert names == ["s0.tif", "s1.tif", "s2.tif"]
        assert job.id in [j.id async for j in client.jobs.list(limit=50)]
        prediction = await client.predict(small / "s0.tif", format="geojson")
        assert prediction["type"] == "FeatureCollection"
        await job.delete()
        with pytest.raises(NotFound):
            await client.jobs.get(job.id)
    with pytest.raises(ServiceUnreachable):
        async with AsyncClient("http://127.0.0.1:9") as nowhere:
            await nowhere.jobs.get("x")


def test_the_client_against_the_real_triton(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path: Path
) -> None:
    palms = [PalmAt(200.5, 300.5, 7.0), PalmAt(400.5, 120.5, 6.0)]
    folder = tmp_path / "scenes"
    folder.mkdir()
    for seed in range(2):
        write_geotiff(render_scene(8100 + seed, size=512, gsd=0.4, palms=palms), folder / f"p{seed}.tif")
    settings = service_settings(tmp_path / "data").model_copy(
        update={"triton": triton_settings.model_copy(update={"url": triton_server.grpc_url})}
    )
    with serve_in_thread(create_app(settings)) as base, Client(base) as client:
        one = client.predict(folder / "p0.tif")
        job = client.jobs.create(folder).wait(timeout=240)
        coco = json.loads(job.results(tmp_path / "coco.json").read_text())
    assert job.status == "succeeded"
    assert len(coco["images"]) == 2
    assert len(coco["annotations"]) == job.progress.detections >= 2
    assert len(one["detections"]) >= 1
    assert os.path.getsize(tmp_path / "coco.json") == job.data["results"]["bytes"]

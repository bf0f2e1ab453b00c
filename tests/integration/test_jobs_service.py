"""Bulk jobs on the real stack: ``palm-serve serve`` as its own process, a real Triton, SIGKILLs.

A job's COCO after a crash and restart must equal the COCO of an uninterrupted run: the same images and
the same annotations, none twice. Scores and boxes are compared to 1e-3 and 0.05 px: a lone tile may run
on the model's all-cores session instead of a single-threaded one (``solo_max_tiles``), whose float sums
can differ in the last bits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from export.synth import render_scene, write_geotiff
from gateway import procfs
from gateway.db.engine import create_engine
from gateway.db.migrate import upgrade
from gateway.jobs.models import JobPriority
from gateway.jobs.store import FileResult, JobStore, NewFile, new_job_id
from gateway.triton.launcher import EmbeddedTriton
from tests.factories import make_geotiff
from tests.integration.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "same-request"


class Service:
    """``palm-serve serve`` on a data dir; restartable on the same state."""

    def __init__(self, data_dir: Path, database_url: str, triton_url: str, **env: str) -> None:
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "PALM_DATA_DIR": str(data_dir),
            "PALM_DATABASE_URL": database_url,
            "PALM_TRITON_URL": triton_url,
            "PALM_LOG_LEVEL": "WARNING",
            "PALM_JOBS__LEASE_S": "3",
            "PALM_JOBS__POLL_S": "0.2",
            "PALM_JOBS__FILES_IN_FLIGHT": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], env=self.env
        )
        assert wait_for(self._ready, 120), "the service did not get ready"

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        children = procfs.descendants(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        assert wait_for(lambda: not any(procfs.alive(p) for p in children), 15), (
            "decode workers outlived the kill"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("job-scenes")
    return [write_geotiff(render_scene(1_000_700 + i, size=1536), root / f"scene{i}.tif") for i in range(8)]


def multipart(scenes: list[Path]) -> tuple[bytes, str]:
    boundary = "palm-job-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="score_threshold"\r\n\r\n0.05\r\n'.encode()
    ]
    for path in scenes:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: image/tiff\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def submit(service: Service, scenes: list[Path]) -> str:
    body, content_type = multipart(scenes)
    with service.client() as client:
        response = client.post(
            "/v1/jobs", content=body, headers={"content-type": content_type, "Idempotency-Key": KEY}
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(service: Service, job_id: str) -> dict[str, Any]:
    with service.client() as client:
        return dict(client.get(f"/v1/jobs/{job_id}").json())


def finished(service: Service, job_id: str, timeout_s: float = 240) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def done() -> bool:
        state.update(job(service, job_id))
        return state["status"] in ("succeeded", "failed", "cancelled") and state["results"]["ready"]

    assert wait_for(done, timeout_s), f"job did not end: {state}"
    return state


def coco(service: Service, job_id: str) -> dict[str, Any]:
    with service.client() as client:
        response = client.get(f"/v1/jobs/{job_id}/results")
    assert response.status_code == 200
    return dict(response.json())


def assert_same_results(got: dict[str, Any], reference: dict[str, Any]) -> None:
    assert got["images"] == reference["images"]
    assert [a["id"] for a in got["annotations"]] == list(range(1, len(got["annotations"]) + 1))
    assert len(got["annotations"]) == len(reference["annotations"])
    for a, b in zip(got["annotations"], reference["annotations"], strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)


@pytest.fixture(scope="module")
def reference(
    triton_server: EmbeddedTriton, scenes: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The COCO of an uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    service = Service(root, f"sqlite:///{root / 'palm.db'}", triton_server.grpc_url)
    service.start()
    try:
        job_id = submit(service, scenes)
        assert finished(service, job_id)["status"] == "succeeded"
        return coco(service, job_id)
    finally:
        service.stop()


@pytest.fixture
def service(triton_server: EmbeddedTriton, database_url: str, tmp_path: Path) -> Iterator[Service]:
    running = Service(tmp_path / "data", database_url, triton_server.grpc_url)
    running.start()
    yield running
    running.stop()


def test_a_clean_run_is_the_reference(reference: dict[str, Any], scenes: list[Path]) -> None:
    assert [i["file_name"] for i in reference["images"]] == [p.name for p in scenes]
    assert len(reference["annotations"]) > 1000


@pytest.mark.parametrize("moment", ["mid-file", "between-files"])
def test_sigkill_and_restart_give_the_same_results(
    service: Service, scenes: list[Path], reference: dict[str, Any], moment: str
) -> None:
    job_id = submit(service, scenes)

    def files(j: dict[str, Any]) -> list[dict[str, Any]]:
        with service.client() as client:
            return list(client.get(f"/v1/jobs/{job_id}/files").json()["files"])

    conditions: dict[str, Callable[[dict[str, Any]], bool]] = {
        # A file of these scenes takes about as long as the heartbeat that records its tiles done, so
        # a claimed (running) file is the moment; its tiles are then at the decoder or at Triton.
        "mid-file": lambda j: (
            j["progress"]["files_done"] >= 1 and any(f["status"] == "running" for f in files(j))
        ),
        "between-files": lambda j: j["progress"]["files_done"] >= 3,
    }
    condition = conditions[moment]
    deadline = time.monotonic() + 180
    while True:
        seen = job(service, job_id)
        if condition(seen):
            break
        assert seen["status"] in ("queued", "running"), f"the job ended before the moment {moment}: {seen}"
        assert time.monotonic() < deadline, f"never saw the moment {moment}: {seen}"
    service.kill()
    service.start()
    state = finished(service, job_id)
    assert state["status"] == "succeeded"
    assert state["progress"]["files_done"] == len(scenes)
    assert_same_results(coco(service, job_id), reference)


def seeded_row(k: int) -> dict[str, Any]:
    return {
        "category_id": 1 + k % 2,
        "x": float(k % 997),
        "y": float(k // 997),
        "w": 9.5,
        "h": 8.25,
        "score": 0.5 + (k % 500) / 1000,
        "geometry": None,
    }


def finished_files_job(database_url: str, files: int, per_file: int) -> str:
    """A job whose files are all done (detections written straight through the store), results not yet
    written: the next worker to look assembles them."""
    engine = create_engine(database_url)
    upgrade(engine)
    store = JobStore(engine)
    job_id = new_job_id()
    store.create_job(
        job_id=job_id,
        tenant="default",
        name="big",
        priority=JobPriority.normal,
        parameters={"score_threshold": 0.3, "bands": None, "tile_size": 512, "overlap": 128, "nms_iou": 0.5},
        model={"name": "palm", "version": "1.1.0", "sha256": None},
        new_files=[NewFile(f"f{i:03d}.tif", 1, None, f"jobs/{job_id}/uploads/{i}") for i in range(files)],
        start=True,
    )
    while (claim := store.claim("seeder", 60)) is not None:
        rows = [seeded_row(k) for k in range(per_file)]
        store.complete(claim, FileResult(4096, 4096, None, None, [], 100, 0, rows))
    engine.dispose()
    return job_id


def test_sigkill_while_writing_results_leaves_no_half_result(
    triton_server: EmbeddedTriton, database_url: str, tmp_path: Path
) -> None:
    files, per_file = 12, 10_000
    job_id = finished_files_job(database_url, files, per_file)
    service = Service(tmp_path / "data", database_url, triton_server.grpc_url)
    results = tmp_path / "data" / "storage" / "jobs" / job_id / "results"
    service.start()
    try:
        assert wait_for(lambda: any(results.glob(".*.tmp")), 60), "the results were never being written"
        service.kill()
        assert not (results / "coco.json").exists(), "a result appeared before it was whole"
        service.start()
        state = finished(service, job_id)
        served = coco(service, job_id)
    finally:
        service.stop()
    assert state["status"] == "succeeded"
    assert state["results"]["annotations"] == files * per_file
    assert [image["id"] for image in served["images"]] == list(range(1, files + 1))
    expected = [seeded_row(k) for k in range(per_file)]
    for index, annotation in enumerate(served["annotations"]):
        row = expected[index % per_file]
        assert annotation["id"] == index + 1
        assert annotation["image_id"] == index // per_file + 1
        assert annotation["bbox"] == [row["x"], row["y"], row["w"], row["h"]]
        assert annotation["category_id"] == row["category_id"]
        assert annotation["score"] == round(row["score"], 4)
    assert not list(results.glob(".*.tmp")), "the killed writer's temporary file was left behind"


def test_sigkill_during_upload_then_a_retry_makes_one_job(
    service: Service, scenes: list[Path], reference: dict[str, Any]
) -> None:
    body, content_type = multipart(scenes)
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            (
                f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"Idempotency-Key: {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.5)
        service.kill()
    service.start()
    with service.client() as client:
        assert client.get("/v1/jobs").json()["jobs"] == []  # the interrupted request left no job
    job_id = submit(service, scenes)
    assert submit(service, scenes) == job_id
    assert finished(service, job_id)["status"] == "succeeded"
    assert_same_results(coco(service, job_id), reference)


def test_a_job_survives_triton_dying_mid_job(
    make_triton: Callable[..., EmbeddedTriton], scenes: list[Path], tmp_path: Path, reference: dict[str, Any]
) -> None:
    triton = make_triton()
    triton.start()
    service = Service(tmp_path / "data", f"sqlite:///{tmp_path / 'palm.db'}", triton.grpc_url)
    service.start()
    try:
        job_id = submit(service, scenes)
        assert wait_for(lambda: job(service, job_id)["progress"]["tiles_done"] > 0, 120)
        pid = triton.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        state = finished(service, job_id)
        assert triton.restarts >= 1
        assert state["status"] == "succeeded", state
        assert state["progress"]["files_failed"] == 0
        assert_same_results(coco(service, job_id), reference)
    finally:
        service.stop()


def test_predict_answers_while_a_job_runs(service: Service, scenes: list[Path], tmp_path: Path) -> None:
    tile = write_geotiff(render_scene(1_000_799, size=512), tmp_path / "tile.tif").read_bytes()
    job_id = submit(service, scenes * 1)
    codes: list[int] = []

    def predict() -> None:
        with service.client() as client:
            for _ in range(5):
                codes.append(
                    client.post("/v1/predict", files={"file": ("t.tif", tile, "image/tiff")}).status_code
                )

    thread = threading.Thread(target=predict)
    thread.start()
    thread.join(120)
    assert codes == [200] * 5
    assert job(service, job_id)["status"] in ("running", "succeeded")
    finished(service, job_id)


def test_a_thousand_file_job_in_one_request(
    triton_server: EmbeddedTriton, database_url: str, tmp_path: Path
) -> None:
    service = Service(tmp_path / "data", database_url, triton_server.grpc_url, PALM_JOBS__FILES_IN_FLIGHT="4")
    service.start()
    try:
        thousand_files(service, tmp_path)
    finally:
        service.stop()


def thousand_files(service: Service, tmp_path: Path) -> None:
    tiles = [make_geotiff(tmp_path / f"t{i:04d}.tif", width=96, height=96, seed=i) for i in range(1000)]
    with service.client() as client:
        created = client.post(
            "/v1/jobs", files=[("files", (p.name, p.read_bytes(), "image/tiff")) for p in tiles]
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert created.json()["progress"]["files_total"] == 1000
    state = finished(service, job_id, timeout_s=600)
    assert state["status"] == "succeeded"
    assert (state["progress"]["files_done"], state["progress"]["tiles_done"]) == (1000, 1000)
    body = coco(service, job_id)
    assert [image["id"] for image in body["images"]] == list(range(1, 1001))
    assert [image["file_name"] for image in body["images"]] == [p.name for p in tiles]


def test_a_job_mixing_good_and_hostile_files_lists_each_bad_one(
    service: Service, scenes: list[Path], corpus_dir: Path, tmp_path: Path
) -> None:
    hostile = {
        "page.tif": b"<!doctype html><html>404</html>",
        "empty.tif": b"",
        "truncated.tif": scenes[0].read_bytes()[:5000],
        "vrt.tif": b'<VRTDataset rasterXSize="1" rasterYSize="1"></VRTDataset>',
    }
    files = [("files", (p.name, p.read_bytes(), "image/tiff")) for p in scenes[:2]]
    files += [("files", (name, content, "image/tiff")) for name, content in hostile.items()]
    corpus_bad = sorted(corpus_dir.rglob("*.tif"))[:12]
    files += [
        ("files", (f"corpus/{p.parent.name}/{p.name}", p.read_bytes(), "image/tiff")) for p in corpus_bad
    ]
    tile = write_geotiff(render_scene(1_000_798, size=512), tmp_path / "tile.tif").read_bytes()
    with service.client() as client:
        job_id = client.post("/v1/jobs", files=files).json()["id"]
        while (
            job(service, job_id)["status"] in ("queued", "running")
            and not job(service, job_id)["progress"]["tiles_done"]
        ):
            time.sleep(0.05)
        direct = client.post("/v1/predict", files={"file": ("tile.tif", tile, "image/tiff")})
        assert direct.status_code == 200
    state = finished(service, job_id)
    assert state["status"] == "succeeded"
    errors = {e["file"]: e for e in state["errors"]}
    for name in hostile:
        assert name in errors, name
    assert errors["page.tif"]["type"].endswith("/unsupported-media-type")
    assert errors["vrt.tif"]["type"].endswith("/unsupported-media-type")
    assert errors["truncated.tif"]["type"].endswith(("/corrupt-raster", "/unsupported-raster"))
    assert state["progress"]["files_done"] + state["progress"]["files_failed"] == len(files)
    assert state["progress"]["files_done"] >= 2
    for error in state["errors"]:
        assert error["status"] is not None
        assert 400 <= error["status"] < 500, error
        assert error["detail"]

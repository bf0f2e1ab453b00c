"""``palm-serve`` as users run it: real subprocesses, real Triton."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pycocotools.coco import COCO

from export.synth import render_scene, write_geotiff
from gateway import procfs
from gateway.triton.launcher import EmbeddedTriton

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "gateway.cli"]


def test_predict_writes_outputs_and_reports_bad_files(triton_server: EmbeddedTriton, tmp_path: Path) -> None:
    good = write_geotiff(render_scene(5101, size=700), tmp_path / "in" / "good.tif")
    other = write_geotiff(render_scene(5102, size=300), tmp_path / "in" / "other.tif")
    bad = tmp_path / "in" / "bad.tif"
    bad.write_bytes(b"<html>not a tiff</html>")
    out = tmp_path / "out"
    env = {**os.environ, "PALM_TRITON_URL": triton_server.grpc_url, "PALM_DATA_DIR": str(tmp_path / "var")}
    result = subprocess.run(
        [
            *CLI,
            "predict",
            str(good),
            str(bad),
            str(other),
            "--out",
            str(out),
            "--format",
            "coco",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "bad.tif" in result.stderr
    assert "HTML" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "good.coco.json",
        "other.coco.json",
        "predictions.coco.json",
    ]
    combined = COCO(str(out / "predictions.coco.json"))
    assert [img["file_name"] for img in combined.loadImgs(combined.getImgIds())] == ["good.tif", "other.tif"]
    single = json.loads((out / "good.coco.json").read_text())
    assert single["images"][0]["width"] == 700


def test_predict_rejects_missing_files_and_bad_bands(tmp_path: Path) -> None:
    missing = subprocess.run(
        [*CLI, "predict", str(tmp_path / "nope.tif")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
    scene = write_geotiff(render_scene(5103, size=64, populate=False), tmp_path / "s.tif")
    bands = subprocess.run(
        [*CLI, "predict", str(scene), "--bands", "a,b"], capture_output=True, text=True, timeout=60
    )
    assert bands.returncode == 2
    assert "bands" in bands.stderr


def test_serve_starts_embedded_triton_and_stops_cleanly(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PALM_DATA_DIR": str(tmp_path / "var"), "PALM_PORT": str(port)}
    env.pop("PALM_TRITON_URL", None)
    env.pop("PALM_TRITON__URL", None)
    proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "palm-serve serve exited during startup"
            time.sleep(0.2)
        assert ready is not None
        assert ready.status_code == 200
        descendants = procfs.descendants(proc.pid)
        names = {Path(f"/proc/{p}/exe").resolve().name for p in descendants if Path(f"/proc/{p}").exists()}
        assert "tritonserver" in names
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (exit status -15).
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert proc.stdout is not None
        assert "Application shutdown complete" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    time.sleep(0.5)
    alive = [p for p in descendants if procfs.alive(p)]
    assert not alive, f"processes left behind: {alive}"
    leftovers = [p.name for p in Path("/dev/shm").glob(f"*palm_{proc.pid}_*")]
    assert not leftovers, leftovers

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
from tests.factories import make_geotiff

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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--bands", "a,b"], "bands must be comma-separated band numbers"),
        (["--score-threshold", "5"], "score_threshold must be a number from 0 to 1, got 5.0"),
        (["--score-threshold", "-1"], "score_threshold must be a number from 0 to 1, got -1.0"),
        (["--score-threshold", "nan"], "score_threshold must be a number from 0 to 1, got nan"),
    ],
)
def test_predict_refuses_what_the_api_refuses(tmp_path: Path, arguments: list[str], message: str) -> None:
    scene = write_geotiff(render_scene(5103, size=64, populate=False), tmp_path / "s.tif")
    result = subprocess.run(
        [*CLI, "predict", str(scene), *arguments], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_predict_rejects_missing_files(tmp_path: Path) -> None:
    missing = subprocess.run(
        [*CLI, "predict", str(tmp_path / "nope.tif")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2
    assert "no such file or directory" in missing.stderr
    empty = subprocess.run([*CLI, "predict", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2
    assert "no .tif or .tiff file" in empty.stderr


def test_predict_reads_a_folder_and_says_why_a_file_has_no_geometry(
    triton_server: EmbeddedTriton, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    write_geotiff(render_scene(5104, size=300), folder / "a.tif")
    write_geotiff(render_scene(5105, size=300), folder / "nested" / "b.TIFF")
    (folder / "notes.txt").write_text("not an image")
    make_geotiff(folder / "plain.tif", crs=None)
    out = tmp_path / "out"
    env = {**os.environ, "PALM_TRITON_URL": triton_server.grpc_url, "PALM_DATA_DIR": str(tmp_path / "var")}
    result = subprocess.run(
        [*CLI, "predict", str(folder), "--out", str(out), "--format", "geojson", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "a.geojson",
        "b.geojson",
        "plain.geojson",
        "predictions.geojson",
    ]
    assert "plain.tif: warning: The file has no CRS" in result.stderr
    combined = json.loads((out / "predictions.geojson").read_text())
    assert any(w["file_name"] == "plain.tif" and "no CRS" in w["message"] for w in combined["warnings"])


def test_serve_refuses_a_busy_port_before_starting_triton(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PALM_DATA_DIR": str(tmp_path / "var"), "PALM_PORT": str(port)}
        env.pop("PALM_TRITON_URL", None)
        started = time.monotonic()
        result = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "PALM_PORT" in result.stderr
    assert time.monotonic() - started < 10
    assert not (tmp_path / "var" / "triton").exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_starts_embedded_triton_and_stops_cleanly(tmp_path: Path, stop: signal.Signals) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PALM_DATA_DIR": str(tmp_path / "var"), "PALM_PORT": str(port)}
    env.pop("PALM_TRITON_URL", None)
    env.pop("PALM_TRITON__URL", None)
    proc = subprocess.Popen(
        [*CLI, "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # As from a terminal: Ctrl-C's default action, whatever this test process inherited (a
        # background job of a non-interactive shell starts with SIGINT ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
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
        proc.send_signal(stop)
        # uvicorn shuts down gracefully, then re-raises the captured signal: SIGTERM ends the process
        # (exit status -15), Ctrl-C ends it with status 130 and no traceback.
        assert proc.wait(60) == (-signal.SIGTERM if stop == signal.SIGTERM else 130)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        assert "Application shutdown complete" in output
        assert "Traceback" not in output
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

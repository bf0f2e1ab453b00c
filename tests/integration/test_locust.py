"""The shipped locustfile, headless and bounded, against a real gateway and Triton on 127.0.0.1.

A short run of online and bulk users passes its SLO gate and reports tiles/s and Triton's realised
batch size; a run whose objectives cannot be met exits 1 and names them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import REPO_ROOT, DecodeSettings, JobSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests.integration.server import serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"


@pytest.fixture(scope="module")
def gateway(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("locust"),
        triton=triton_settings.model_copy(
            update={"url": triton_server.grpc_url, "metrics_url": triton_server.metrics_url}
        ),
        decode=DecodeSettings(workers=2),
        jobs=JobSettings(poll_s=0.2),
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


def locust(host: str, seconds: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        host,
        "--run-time",
        f"{seconds}s",
        "--stop-timeout",
        "30",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, cwd=REPO_ROOT)


def test_a_short_mixed_run_meets_its_slo_and_reports_throughput_and_batch_size(
    gateway: str, tmp_path: Path
) -> None:
    report = tmp_path / "locust.json"
    run = locust(
        gateway,
        30,
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--palm-job-files",
        "6",
        "--palm-sizes",
        "256:3,512:5,1024:2",
        "--palm-slo-error-ratio",
        "0.0",
        "--palm-slo-p95",
        "/v1/predict=10000,job end-to-end=60000",
        "--palm-report",
        str(report),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "SLO met" in run.stderr
    figures = json.loads(report.read_text())
    assert figures["failures"] == 0
    assert figures["slo_failures"] == []
    assert figures["routes"]["/v1/predict"]["requests"] > 10
    assert figures["routes"]["job end-to-end"]["requests"] >= 1
    assert figures["routes"]["/v1/jobs/[id]/results"]["failures"] == 0
    assert figures["tiles_per_s"] > 0
    assert figures["triton_batch_size"] >= 1.0


def test_a_run_that_misses_its_objectives_exits_1_and_names_them(gateway: str) -> None:
    run = locust(
        gateway,
        5,
        "--users",
        "2",
        "--spawn-rate",
        "2",
        "--palm-job-files",
        "2",
        "--palm-sizes",
        "256:1",
        "--palm-slo-p95",
        "/v1/predict=1,/v1/unknown=100",
    )
    assert run.returncode == 1, run.stderr[-4000:]
    assert "SLO missed: /v1/predict: p95" in run.stderr
    assert "SLO missed: /v1/unknown: no request completed" in run.stderr

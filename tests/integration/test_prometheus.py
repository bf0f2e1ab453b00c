"""A real Prometheus (Debian's binary) scraping a real gateway and Triton, with the shipped rules.

Every expression of the dashboard and every recording rule must return data after some predictions
and a job with a webhook; every metric an alert rule names must exist; the input-drift rule stays
quiet for in-distribution scenes and fires for grey ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from export.synth import render_scene, to_grey, write_geotiff
from gateway.app import create_app
from gateway.serving import listen
from gateway.settings import REPO_ROOT, DecodeSettings, JobSettings, Settings, TritonSettings, WebhookSettings
from gateway.triton.launcher import EmbeddedTriton
from gateway.webhooks.signing import new_secret
from tests.integration.server import serve_in_thread
from tests.integration.waiting import wait_for
from tests.receiver import receiving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMETHEUS = "/usr/bin/prometheus"
METRIC = re.compile(r"\b(palm:[a-z0-9_:]+|palm_[a-z0-9_]+|nv_[a-z0-9_]+)\b")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", REPO_ROOT / "deploy" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def stack(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Prometheus]]:
    if shutil.which(PROMETHEUS) is None:
        pytest.fail(f"{PROMETHEUS} is needed (apt-get install prometheus)")
    root = tmp_path_factory.mktemp("prometheus")
    settings = Settings(
        data_dir=root / "gateway",
        triton=triton_settings.model_copy(
            update={"url": triton_server.grpc_url, "metrics_url": triton_server.metrics_url}
        ),
        decode=DecodeSettings(workers=2),
        jobs=JobSettings(poll_s=0.2),
        webhook=WebhookSettings(allow_private=True, poll_s=0.2),
    )
    with serve_in_thread(create_app(settings)) as gateway, listen("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
        probe.close()
        target = gateway.removeprefix("http://")
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {REPO_ROOT / 'deploy' / 'prometheus' / 'rules.yml'}\n"
            "scrape_configs:\n"
            f"  - job_name: gateway\n    static_configs:\n      - targets: ['{target}']\n"
            "  - job_name: triton\n    metrics_path: /metrics/triton\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        with open(root / "prometheus.log", "wb") as log:
            server = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        try:
            assert wait_for(lambda: _ready(prometheus), 60), (root / "prometheus.log").read_text()[-2000:]
            assert wait_for(lambda: bool(prometheus.query('up{job="gateway"} == 1')), 30)
            yield gateway, prometheus
        finally:
            server.terminate()
            server.wait(30)


def _ready(prometheus: Prometheus) -> bool:
    try:
        return httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def post(client: httpx.Client, path: Path) -> None:
    response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/tiff")})
    assert response.status_code == 200, response.text


def test_every_dashboard_and_rule_expression_has_data_and_drift_fires_only_for_unfamiliar_input(
    stack: tuple[str, Prometheus], tmp_path: Path
) -> None:
    gateway, prometheus = stack
    scenes = [write_geotiff(render_scene(1_002_000 + i, size=768), tmp_path / f"s{i}.tif") for i in range(6)]
    with httpx.Client(base_url=gateway, timeout=120) as client:
        for path in scenes:
            post(client, path)
        files = [("files", (p.name, p.read_bytes(), "image/tiff")) for p in scenes[:2]]
        secret = new_secret()
        with receiving([secret]) as receiver:
            job = client.post(
                "/v1/jobs", files=files, data={"webhook_url": receiver.url, "webhook_secret": secret}
            ).json()
            assert wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["results"]["ready"], 120)
            assert wait_for(lambda: len(receiver.accepted) == 1, 30)
    time.sleep(8)  # a few scrapes and rule evaluations after the work

    generate = generator()
    empty, missing = [], []
    for where, expr, gpu_only in generate.expressions():
        if gpu_only:
            continue
        if where.startswith("rule Palm"):  # an alert: quiet when all is well, but every metric must exist
            for name in set(METRIC.findall(expr)):
                if not prometheus.query(f'count({{__name__="{name}"}})'):
                    missing.append(f"{where}: {name}")
        elif not prometheus.query(expr):
            empty.append(f"{where}: {expr}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    assert not missing, "metrics that do not exist:\n" + "\n".join(missing)

    drift = next(e for w, e, _ in generate.expressions() if w == "rule PalmInputDrift")
    assert prometheus.query(drift) == [], "in-distribution scenes must not look like drift"

    grey = []
    for i in range(12):
        scene = render_scene(1_002_100 + i, size=512)
        scene = dataclasses.replace(scene, pixels=to_grey(scene.pixels))
        grey.append(write_geotiff(scene, tmp_path / f"grey{i}.tif"))
    with httpx.Client(base_url=gateway, timeout=120) as client:
        for path in grey:
            post(client, path)

    def drifted() -> list[dict[str, Any]]:
        return prometheus.query(drift)

    assert wait_for(lambda: bool(drifted()), 30), prometheus.query("palm:input_drift_zscore")
    assert "colourfulness" in {series["metric"]["statistic"] for series in drifted()}
    assert np.isfinite(float(drifted()[0]["value"][1]))

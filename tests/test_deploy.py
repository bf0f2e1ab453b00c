"""The deployment files: generated ones in sync, rules that Prometheus accepts and whose unit tests pass,
a dashboard Grafana can load, compose files that name real files, settings and health checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import REPO_ROOT, Settings
from tests.test_docs import env_names

DEPLOY = REPO_ROOT / "deploy"
PROMTOOL = "/usr/bin/promtool"


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (``!reset``, ``!override``) read as their plain values."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def test_generated_files_match_their_description_and_the_model_card() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_accepts_the_rules_and_their_unit_tests_pass() -> None:
    if shutil.which(PROMTOOL) is None:
        pytest.fail(f"{PROMTOOL} is needed (apt-get install prometheus)")
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "rules.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", "rules_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    config = subprocess.run(
        [PROMTOOL, "check", "config", "--syntax-only", "prometheus.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "palm-serve.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
    provisioning = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert provisioning["datasources"][0]["uid"] == "prometheus"


def compose_files() -> list[Path]:
    return [REPO_ROOT / "docker-compose.yml", DEPLOY / "compose.cpu.yml"]


def test_compose_services_have_health_checks_and_wait_for_healthy_dependencies() -> None:
    stack = load(REPO_ROOT / "docker-compose.yml")
    services = stack["services"]
    assert set(services) == {"triton", "gateway", "proxy", "prometheus", "grafana"}
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert "image" in service or "build" in service, name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert services["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["gateway"]["environment"]["PALM_TRITON_URL"] == "triton:8001"
    cpu = load(DEPLOY / "compose.cpu.yml")["services"]
    assert cpu["triton"]["profiles"] == ["gpu"]
    assert cpu["gateway"]["build"]["target"] == "cpu"
    dockerfile = (DEPLOY / "gateway.Dockerfile").read_text()
    for target in (services["gateway"]["build"]["target"], cpu["gateway"]["build"]["target"]):
        assert f" AS {target}\n" in dockerfile, target


def test_compose_mounts_exist_and_environments_name_real_settings() -> None:
    known = set(env_names(Settings)) | {"PALM_TRITON_URL"}
    for path in compose_files():
        for name, service in (load(path)["services"] or {}).items():
            for volume in service.get("volumes") or []:
                source = str(volume).split(":", 1)[0]
                if source.startswith("."):
                    assert (REPO_ROOT / source).exists(), (path.name, name, source)
            environment = service.get("environment") or {}
            palm = [key for key in environment if key.startswith("PALM_")]
            unknown = sorted(set(palm) - known)
            assert not unknown, (path.name, name, unknown)

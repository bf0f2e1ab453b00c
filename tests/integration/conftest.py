"""Shared fixtures of the integration tests: a real embedded tritonserver and scene-like tiles.

``triton_server`` is session-scoped: the first test that asks for it starts ``tritonserver`` from the
``nvidia-pytriton`` wheel (CPU config, python backend running ``model_repository/palm/1/model.onnx``)
and the session stops it at the end. Tests that kill or stop a server start their own
:class:`~gateway.triton.launcher.EmbeddedTriton` instead (see ``make_triton``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.settings import REPO_ROOT, TritonSettings
from gateway.triton.launcher import EmbeddedTriton

MODEL_ONNX = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"


@pytest.fixture(scope="session")
def triton_settings() -> TritonSettings:
    """The repository's model with the CPU config; deadlines generous for a shared 2-core machine."""
    if not MODEL_ONNX.is_file():
        pytest.fail(f"{MODEL_ONNX} is missing; the integration tests serve the real model")
    return TritonSettings(
        model_repository=REPO_ROOT / "model_repository",
        model_config_name="cpu",
        ready_timeout_s=120.0,
        request_timeout_s=60.0,
    )


@pytest.fixture(scope="session")
def triton_server(
    triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTriton]:
    """A started, supervised embedded tritonserver; ``.grpc_url`` is what clients connect to."""
    with EmbeddedTriton(triton_settings, tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture
def make_triton(triton_settings: TritonSettings, tmp_path: Path) -> Iterator[Callable[..., EmbeddedTriton]]:
    """A factory of private servers (not started); every one is stopped after the test."""
    servers: list[EmbeddedTriton] = []

    def make(settings: TritonSettings | None = None, **kwargs: Any) -> EmbeddedTriton:
        server = EmbeddedTriton(settings or triton_settings, tmp_path / f"triton{len(servers)}", **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def scene_tiles() -> np.ndarray:
    """Eight 512x512 tiles cut from two seeded synthetic aerial scenes (palms, buildings, roads)."""
    from export.synth import render_scene

    tiles = []
    for seed in (11, 12):
        pixels = render_scene(seed, size=1024).pixels
        for y in (0, 512):
            for x in (0, 512):
                tiles.append(pixels[:, y : y + 512, x : x + 512])
    return np.ascontiguousarray(np.stack(tiles))


@pytest.fixture(scope="session")
def reference_model() -> Callable[[np.ndarray], np.ndarray]:
    """The same ONNX run in-process by onnxruntime: what Triton's answer must equal."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL_ONNX), providers=["CPUExecutionProvider"])

    def run(tiles: np.ndarray) -> np.ndarray:
        (detections,) = session.run(["detections"], {"images": tiles})
        return np.asarray(detections)

    return run

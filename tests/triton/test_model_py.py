"""``palm/1/model.py`` logic with a stand-in for ``triton_python_backend_utils``.

The real stub only exists inside tritonserver; the integration tests run it there. Here the batching
contract is pinned down: one onnxruntime call per ``execute``, answers split back in request order, a
bad request answered with its own error while the others succeed.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import secrets
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from gateway.settings import REPO_ROOT
from tests import markers
from tests.markers import Marker, build_onnx, draw

MODEL_PY = REPO_ROOT / "model_repository" / "palm" / "1" / "model.py"


class FakeError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Capsule:
    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_STUB_USED = b"used_dlpack"


class FakeModelException(Exception):
    pass


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> FakeTensor:
        """Consume like the real stub, which leaves the capsule named "used_dlpack"."""
        tensor = FakeTensor(name, np.from_dlpack(_Capsule(capsule)))
        _set_name(capsule, _STUB_USED)
        return tensor

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self.array.__dlpack_device__()


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class FakeLogger:
    messages: ClassVar[list[str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.messages.append(message)

    log_error = log_warn = log_info


def fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]
    module.TritonModelException = FakeModelException  # type: ignore[attr-defined]
    module.Logger = FakeLogger  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.get(name)  # type: ignore[attr-defined]
    return module


@pytest.fixture
def model_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location("palm_model_py", MODEL_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingSession:
    """Stands in for onnxruntime: one detection row per tile, filled with the tile's mean."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.calls: list[np.ndarray] = []
        self.fail = fail
        self.delay_s = delay_s

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        images = feeds["images"]
        self.calls.append(images)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        means = images.reshape(images.shape[0], -1).mean(axis=1, dtype=np.float64)
        return [np.broadcast_to(means[:, None, None], (len(images), 512, 6)).astype(np.float32)]


def tiles(n: int, value: int) -> np.ndarray:
    return np.full((n, 3, 512, 512), value, dtype=np.uint8)


def make_model(module: types.ModuleType, session: RecordingSession) -> Any:
    model = module.TritonPythonModel()
    model.session = session
    model.name = "palm"
    model.input_name = "images"
    model.tile_shape = (3, 512, 512)
    model.output_names = ["detections"]
    model.logger = FakeLogger
    return model


def test_requests_of_a_batch_share_one_onnxruntime_call_and_come_back_in_order(
    model_module: types.ModuleType,
) -> None:
    session = RecordingSession()
    model = make_model(model_module, session)
    requests = [{"images": FakeTensor("images", tiles(n, v))} for n, v in [(2, 10), (1, 20), (3, 30)]]

    responses = model.execute(requests)

    assert len(session.calls) == 1
    assert session.calls[0].shape == (6, 3, 512, 512)
    for response, (n, value) in zip(responses, [(2, 10), (1, 20), (3, 30)], strict=True):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.name == "detections"
        assert out.array.shape == (n, 512, 6)
        np.testing.assert_array_equal(out.array, np.float32(value))


def test_a_bad_request_fails_alone(model_module: types.ModuleType) -> None:
    session = RecordingSession()
    model = make_model(model_module, session)
    requests = [
        {"images": FakeTensor("images", tiles(1, 5))},
        {"images": FakeTensor("images", np.zeros((1, 3, 512, 512), np.float32))},
        {},
        {"images": FakeTensor("images", np.zeros((1, 3, 256, 256), np.uint8))},
        {"images": FakeTensor("images", tiles(2, 7))},
    ]

    responses = model.execute(requests)

    assert [r.error is None for r in responses] == [True, False, False, False, True]
    assert "UINT8" in responses[1].error.message()
    assert "missing" in responses[2].error.message()
    assert "[1, 3, 256, 256]" in responses[3].error.message()
    assert session.calls[0].shape[0] == 3
    np.testing.assert_array_equal(responses[4].output_tensors[0].array, np.float32(7))


def test_an_onnxruntime_failure_answers_every_request_of_the_batch(model_module: types.ModuleType) -> None:
    model = make_model(model_module, RecordingSession(fail=True))

    responses = model.execute([{"images": FakeTensor("images", tiles(1, 1))} for _ in range(3)])

    assert all(r.error is not None and "boom" in r.error.message() for r in responses)


def test_output_capsules_are_released_quietly(model_module: types.ModuleType) -> None:
    """numpy's capsule destructor must not see the stub's non-standard name (an unraisable error,
    which pytest turns into a failure here)."""
    model = make_model(model_module, RecordingSession())

    responses = model.execute([{"images": FakeTensor("images", tiles(n, 9))} for n in (2, 1)])
    gc.collect()

    for response, n in zip(responses, (2, 1), strict=True):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.array.shape == (n, 512, 6)
        np.testing.assert_array_equal(out.array, np.float32(9))


def tensors(
    input_name: str, input_dims: list[str], output_name: str, output_dims: list[str]
) -> dict[str, Any]:
    """The ``input`` and ``output`` of a model config as Triton hands it to the backend (JSON; int64
    dims as strings)."""
    return {
        "input": [{"name": input_name, "data_type": "TYPE_UINT8", "dims": input_dims}],
        "output": [{"name": output_name, "data_type": "TYPE_FP32", "dims": output_dims}],
    }


def _initialize(
    module: types.ModuleType,
    tmp_path: Path,
    parameters: dict[str, str],
    count: int = 1,
    instance: str | None = None,
) -> Any:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["detections"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 3])],
    )
    (tmp_path / "1").mkdir(exist_ok=True)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, tmp_path / "1" / "tiny.onnx")
    config = {
        **tensors("images", ["3", "512", "512"], "detections", ["512", "6"]),
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
        "instance_group": [{"count": count, "kind": "KIND_CPU"}],
    }
    args = {"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"}
    if instance is not None:
        args["model_instance_name"] = instance
    model = module.TritonPythonModel()
    model.initialize(args)
    return model


def test_initialize_uses_every_available_core_by_default(
    model_module: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})

    model = _initialize(model_module, tmp_path, {"onnx_file": "tiny.onnx", "intra_op_threads": "0"}, count=2)

    assert "with 3 intra-op threads" in FakeLogger.messages[-1]
    assert model.session.get_inputs()[0].name == "images"


def test_initialize_honours_an_explicit_thread_count(model_module: types.ModuleType, tmp_path: Path) -> None:
    _initialize(model_module, tmp_path, {"onnx_file": "tiny.onnx", "intra_op_threads": "1"})

    assert "with 1 intra-op threads" in FakeLogger.messages[-1]


def test_initialize_names_a_missing_onnx_file(model_module: types.ModuleType, tmp_path: Path) -> None:
    model = model_module.TritonPythonModel()
    config = {
        **tensors("images", ["3", "512", "512"], "detections", ["2048", "6"]),
        "parameters": {"onnx_file": {"string_value": "absent.onnx"}},
    }

    with pytest.raises(FakeModelException, match=r"absent\.onnx does not exist"):
        model.initialize(
            {"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"}
        )


@pytest.fixture
def two_instances(
    model_module: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Any, Path]]:
    """Both instances of a 2-core CPU config, sharing one busy table, sessions swapped for recorders."""
    lanes = f"palm_lanes_{os.getpid()}_test{secrets.token_hex(3)}"
    monkeypatch.setenv("PALM_LANES_NAME", lanes)
    monkeypatch.setattr(model_module.os, "sched_getaffinity", lambda pid: {0, 1})
    models = []
    for index in range(2):
        model = _initialize(
            model_module, tmp_path, {"onnx_file": "tiny.onnx"}, count=2, instance=f"palm_0_{index}"
        )
        assert "calls of <= 1 tiles on an idle server may use 2" in FakeLogger.messages[-1]
        model.session, model.solo = RecordingSession(), RecordingSession()
        models.append(model)
    table = Path("/dev/shm") / lanes
    yield models[0], models[1], table
    table.unlink(missing_ok=True)


def test_a_lone_tile_on_an_idle_server_runs_on_every_core(two_instances: tuple[Any, Any, Path]) -> None:
    first, second, table = two_instances
    assert table.exists()

    first.execute([{"images": FakeTensor("images", tiles(1, 3))}])
    first.execute([{"images": FakeTensor("images", tiles(2, 3))}])

    assert [c.shape[0] for c in first.solo.calls] == [1]
    assert [c.shape[0] for c in first.session.calls] == [2]
    assert second.solo.calls == second.session.calls == []


def test_a_lone_tile_stays_on_its_own_core_while_another_instance_computes(
    two_instances: tuple[Any, Any, Path],
) -> None:
    first, second, table = two_instances

    second.lanes.enter()  # the other instance is inside onnxruntime
    first.execute([{"images": FakeTensor("images", tiles(1, 3))}])
    second.lanes.leave()
    first.execute([{"images": FakeTensor("images", tiles(1, 4))}])

    assert [int(c[0, 0, 0, 0]) for c in first.session.calls] == [3]
    assert [int(c[0, 0, 0, 0]) for c in first.solo.calls] == [4]
    # A failed call leaves the instance marked idle.
    first.solo.fail = True
    first.execute([{"images": FakeTensor("images", tiles(1, 5))}])
    assert not second.lanes.others_busy()

    first.finalize()
    second.finalize()
    assert not table.exists()


def test_lone_tiles_move_to_the_instance_share_while_every_core_is_slower_and_back(
    two_instances: tuple[Any, Any, Path],
) -> None:
    first, _, _ = two_instances

    def lone_tiles_on_every_core(calls: int) -> int:
        before = len(first.solo.calls)
        for value in range(calls):
            first.execute([{"images": FakeTensor("images", tiles(1, value))}])
        return len(first.solo.calls) - before

    first.solo.delay_s = 0.02  # the other cores are busy: a call on all of them waits for them
    lone_tiles_on_every_core(16)  # what it takes to learn that (the first is on every core)
    assert 1 <= lone_tiles_on_every_core(16) <= 3, "lone tiles stay on the slower session, or never retry it"

    first.solo.delay_s, first.session.delay_s = 0.0, 0.02  # the cores are free again
    lone_tiles_on_every_core(16)
    assert lone_tiles_on_every_core(16) >= 13

    # Batches never take part: they stay on the instance's share whatever lone tiles measured.
    first.execute([{"images": FakeTensor("images", tiles(2, 9))}])
    assert first.session.calls[-1].shape[0] == 2


def test_without_an_instance_name_every_call_stays_on_the_instance_share(
    model_module: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module.os, "sched_getaffinity", lambda pid: {0, 1})

    model = _initialize(model_module, tmp_path, {"onnx_file": "tiny.onnx"}, count=2)

    assert model.solo is None
    assert "idle server" not in FakeLogger.messages[-1]


def test_the_tensor_names_and_tile_shape_are_the_model_configs(
    model_module: types.ModuleType, tmp_path: Path
) -> None:
    """Not palm's: another detector with other names, 256 px tiles and K = 100 runs unchanged."""
    build_onnx(tmp_path / "1" / "model.onnx")
    config = {
        "name": "markers",
        **tensors(markers.INPUT, ["3", "256", "256"], markers.OUTPUT, ["100", "6"]),
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }
    model = model_module.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"}
    )
    square = Marker(category_id=20, x=40, y=50, size=30)
    image = draw(256, 256, [square])[None]

    good, palm_sized = model.execute(
        [
            {markers.INPUT: FakeTensor(markers.INPUT, image)},
            {markers.INPUT: FakeTensor(markers.INPUT, tiles(1, 0))},
        ]
    )

    (out,) = good.output_tensors
    assert out.name == markers.OUTPUT
    assert out.array.shape == (1, 100, 6)
    assert out.array[0, 0].tolist() == pytest.approx([*square.box, 0.8, 20])
    assert not out.array[0, 1:].any()
    assert "[N, 3, 256, 256]" in palm_sized.error.message()
    assert "markers:" in palm_sized.error.message()

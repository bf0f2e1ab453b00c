"""Every ``.pbtxt`` in the model repository parses into Triton's ModelConfig and keeps the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.scheduling import Priority
from gateway.settings import REPO_ROOT
from gateway.triton.launcher import with_instances

MODEL_DIR = REPO_ROOT / "model_repository" / "palm"
CONFIG_FILES = sorted(MODEL_DIR.rglob("*.pbtxt"))
# K, the detection rows per tile, as the shipped ONNX declares it (the model card records its contract).
ROWS_PER_TILE = json.loads((MODEL_DIR / "1" / "model_card.json").read_text())["contract"]["outputs"][0][
    "shape"
][1]


def load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def by_name(name: str) -> mc.ModelConfig:
    return load(MODEL_DIR / name)


def test_the_three_configs_exist() -> None:
    names = {p.relative_to(MODEL_DIR).as_posix() for p in CONFIG_FILES}
    assert {"config.pbtxt", "configs/cpu.pbtxt", "configs/tensorrt.pbtxt"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(MODEL_DIR).as_posix())
def test_config_parses_and_keeps_the_contract(path: Path) -> None:
    config = load(path)

    assert config.name == "palm"
    assert config.max_batch_size >= 1
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("images", mc.TYPE_UINT8, [3, 512, 512])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("detections", mc.TYPE_FP32, [ROWS_PER_TILE, 6])
    ]
    assert list(config.version_policy.specific.versions) == [1]
    batching = config.dynamic_batching
    assert config.HasField("dynamic_batching")
    assert all(1 <= size <= config.max_batch_size for size in batching.preferred_batch_size)
    assert 0 < batching.max_queue_delay_microseconds <= 5000
    # One Triton priority level per lane: online (1) first; a request naming none is batch work.
    assert batching.priority_levels == len(Priority) == max(Priority)
    assert batching.default_priority_level == Priority.BATCH
    for warmup in config.model_warmup:
        assert 1 <= warmup.batch_size <= config.max_batch_size
        tensor = warmup.inputs["images"]
        assert (tensor.data_type, list(tensor.dims)) == (mc.TYPE_UINT8, [3, 512, 512])
        assert tensor.zero_data or tensor.random_data


def test_production_config_is_onnxruntime_on_gpu_with_tensorrt_fp16() -> None:
    config = by_name("config.pbtxt")

    assert config.backend == "onnxruntime"
    assert config.max_batch_size >= 32
    assert {g.kind for g in config.instance_group} == {mc.ModelInstanceGroup.KIND_GPU}
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_profile_max_shapes"] == f"images:{config.max_batch_size}x3x512x512"
    assert max(config.dynamic_batching.preferred_batch_size) == config.max_batch_size
    assert {w.batch_size for w in config.model_warmup} >= {1, config.max_batch_size}


def test_tensorrt_config_serves_a_prebuilt_plan() -> None:
    config = by_name("configs/tensorrt.pbtxt")

    assert config.platform == "tensorrt_plan"
    assert config.backend == "tensorrt"
    assert config.default_model_filename == "model.plan"
    assert {g.kind for g in config.instance_group} == {mc.ModelInstanceGroup.KIND_GPU}
    assert config.max_batch_size == by_name("config.pbtxt").max_batch_size


def test_cpu_config_runs_model_py_on_the_cpu() -> None:
    config = by_name("configs/cpu.pbtxt")

    assert config.backend == "python"
    assert {g.kind for g in config.instance_group} == {mc.ModelInstanceGroup.KIND_CPU}
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert int(config.parameters["intra_op_threads"].string_value) >= 0
    assert (MODEL_DIR / "1" / "model.py").is_file()


def test_a_misspelled_field_does_not_parse() -> None:
    """The parser is strict: the check above would catch a typo in any config."""
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "palm"\nmax_batch_sise: 8\n', mc.ModelConfig())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(MODEL_DIR).as_posix())
def test_an_instance_count_override_changes_only_the_count(path: Path) -> None:
    original = load(path)
    changed = text_format.Parse(with_instances(path.read_text(), 1), mc.ModelConfig())
    assert [group.count for group in changed.instance_group] == [1]
    assert changed.instance_group[0].kind == original.instance_group[0].kind
    changed.instance_group[0].count = original.instance_group[0].count
    assert changed == original


def test_an_instance_count_is_added_where_the_config_has_none_and_refused_where_it_is_ambiguous() -> None:
    bare = 'name: "m"\nbackend: "python"\ninstance_group [ { kind: KIND_CPU } ]\n'
    assert load_text(with_instances(bare, 3)).instance_group[0].count == 3
    assert load_text(with_instances('name: "m"\n', 2)).instance_group[0].count == 2
    for unreadable in (
        "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]",
        "instance_group [ { count: 1 }, { count: 2 } ]",
    ):
        with pytest.raises(ValueError, match="cannot read"):
            with_instances(unreadable, 2)
    with pytest.raises(ValueError, match="several"):
        with_instances("instance_group [ { count: 1 } ]\ninstance_group [ { count: 2 } ]", 2)


def load_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())

"""The committed model_repository/palm/1/model.onnx honours the contract Triton and the gateway rely on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.model import TOP_K
from export.synth import render_scene

MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "palm" / "1" / "model.onnx"
CARD = MODEL.with_name("model_card.json")
K = TOP_K


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def test_graph_declares_the_contract() -> None:
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param
    assert [d.dim_value for d in in_dims[1:]] == [3, 512, 512]
    assert out.name == "detections"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param
    assert [d.dim_value for d in out_dims[1:]] == [K, 6]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batches_return_sorted_rows_with_zero_padding(session: ort.InferenceSession, batch: int) -> None:
    scene = render_scene(1_000_003, 1024)
    offsets = [(0, 0), (512, 0), (0, 512), (512, 512), (256, 256), (128, 384), (384, 128), (200, 300)]
    tiles = np.stack([scene.pixels[:, y : y + 512, x : x + 512] for x, y in offsets[:batch]])
    (out,) = session.run(["detections"], {"images": tiles})
    assert out.shape == (batch, K, 6)
    assert out.dtype == np.float32
    scores = out[:, :, 4]
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.all((scores >= 0) & (scores <= 1))
    padding = scores == 0
    assert np.all(out[padding] == 0)
    assert set(np.unique(out[~padding][:, 5]).tolist()) <= {1.0, 2.0}
    real = out[~padding]
    assert np.all(real[:, 2] > real[:, 0])
    assert np.all(real[:, 3] > real[:, 1])


def test_each_tile_is_independent_of_its_batch(session: ort.InferenceSession) -> None:
    scene = render_scene(1_000_004, 512)
    tile = scene.pixels[None]
    (alone,) = session.run(["detections"], {"images": tile})
    (batched,) = session.run(["detections"], {"images": np.concatenate([tile, tile[:, :, ::-1].copy()])})
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-3)


def test_card_describes_this_file() -> None:
    card = json.loads(CARD.read_text())
    assert card["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert card["contract"]["inputs"][0]["name"] == "images"
    assert card["contract"]["outputs"][0]["shape"] == [-1, K, 6]
    assert card["categories"] == [
        {"id": 1, "name": "palm_tree", "supercategory": "vegetation"},
        {"id": 2, "name": "building", "supercategory": "structure"},
    ]
    assert card["architecture"]["gflop_per_tile"] <= 6.0

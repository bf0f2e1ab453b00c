"""A second detector, built at test time: "markers", three classes, 256 px tiles, ``K`` = 100.

Its graph is hand-set, so every box is predictable from the pixels: in each tile it reports, per
class, the bounding box of the pixels of one saturated colour (red, green or blue: that channel minus
the other two above 127), score-sorted, then pads with all-zero rows to ``K``. An image holding one
square of each colour is therefore detected exactly at the squares, whichever tiles they fall in.

:func:`write_repository` lays it out as a Triton model repository entry that the embedded server
serves with the python backend (``model_repository/palm/1/model.py``, copied unchanged), with a model
card whose ``contract`` and ``categories`` the gateway reads, and tensor names other than palm's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from gateway.settings import REPO_ROOT

NAME = "markers"
TILE = 256
K = 100
INPUT = "pixels"
OUTPUT = "boxes"
CATEGORIES = (
    {"id": 10, "name": "red_marker", "supercategory": "marker"},
    {"id": 20, "name": "green_marker", "supercategory": "marker"},
    {"id": 30, "name": "blue_marker", "supercategory": "marker"},
)
SCORES = (0.9, 0.8, 0.7)
"""The score of each class's box, in the order of :data:`CATEGORIES` (red, green, blue)."""
BACKGROUND = (60, 60, 60)
PALM_MODEL_PY = REPO_ROOT / "model_repository" / "palm" / "1" / "model.py"


@dataclass(frozen=True, slots=True)
class Marker:
    """A filled square of one class's colour at image pixels ``[x, x + size) x [y, y + size)``."""

    category_id: int
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``x1, y1, x2, y2`` in image pixels, as the model reports it."""
        return (float(self.x), float(self.y), float(self.x + self.size), float(self.y + self.size))


def draw(width: int, height: int, markers: list[Marker]) -> npt.NDArray[np.uint8]:
    """``uint8 [3, height, width]``: a grey image with each marker painted in its class's colour."""
    pixels = np.empty((3, height, width), np.uint8)
    pixels[:] = np.array(BACKGROUND, np.uint8)[:, None, None]
    channel = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    for m in markers:
        colour = np.zeros(3, np.uint8)
        colour[channel[m.category_id]] = 255
        pixels[:, m.y : m.y + m.size, m.x : m.x + m.size] = colour[:, None, None]
    return pixels


def build_onnx(
    path: Path, tile: int = TILE, k: int = K, input_name: str = INPUT, output_name: str = OUTPUT
) -> Path:
    """Write the markers graph: ``uint8 [N, 3, tile, tile]`` in, ``float32 [N, k, 6]`` out."""
    classes = len(CATEGORIES)
    weights = np.full((classes, 3, 1, 1), -1.0, np.float32)
    for c in range(classes):
        weights[c, c] = 1.0
    const = [
        helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel()),
        helper.make_tensor("threshold", TensorProto.FLOAT, [], [127.0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("scores", TensorProto.FLOAT, [1, classes, 1], list(SCORES)),
        helper.make_tensor("ids", TensorProto.FLOAT, [1, classes, 1], [float(c["id"]) for c in CATEGORIES]),
        helper.make_tensor("k_classes", TensorProto.INT64, [1], [classes]),
        helper.make_tensor("pads", TensorProto.INT64, [6], [0, 0, 0, 0, k - classes, 0]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
    ]
    node = helper.make_node
    nodes = [
        node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
        node("Conv", ["x", "w"], ["d"]),
        node("Greater", ["d", "threshold"], ["hit"]),
        node("Cast", ["hit"], ["mask"], to=TensorProto.FLOAT),
        node("ReduceMax", ["mask"], ["cols"], axes=[2], keepdims=0),
        node("ReduceMax", ["mask"], ["rows"], axes=[3], keepdims=0),
        node("ReduceMax", ["cols"], ["present"], axes=[2], keepdims=1),
    ]
    for axis_name, profile in (("x", "cols"), ("y", "rows")):
        nodes += [
            node("ArgMax", [profile], [f"{axis_name}1_i"], axis=2, keepdims=1, select_last_index=0),
            node("ArgMax", [profile], [f"{axis_name}2_last"], axis=2, keepdims=1, select_last_index=1),
            node("Add", [f"{axis_name}2_last", "one"], [f"{axis_name}2_i"]),
            node("Cast", [f"{axis_name}1_i"], [f"{axis_name}1"], to=TensorProto.FLOAT),
            node("Cast", [f"{axis_name}2_i"], [f"{axis_name}2"], to=TensorProto.FLOAT),
        ]
    nodes += [
        node("Concat", ["x1", "y1", "x2", "y2"], ["corners"], axis=2),
        node("Mul", ["corners", "present"], ["box"]),
        node("Mul", ["scores", "present"], ["score"]),
        node("Mul", ["ids", "present"], ["cls"]),
        node("Concat", ["box", "score", "cls"], ["rows6"], axis=2),
        node("Squeeze", ["score", "two"], ["score_flat"]),
        node("TopK", ["score_flat", "k_classes"], ["_", "order"], axis=1, largest=1, sorted=1),
        node("Unsqueeze", ["order", "two"], ["order3"]),
        node("Shape", ["rows6"], ["rows_shape"]),
        node("Expand", ["order3", "rows_shape"], ["gather_at"]),
        node("GatherElements", ["rows6", "gather_at"], ["sorted"], axis=1),
        node("Pad", ["sorted", "pads"], [output_name], mode="constant"),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["N", 3, tile, tile])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", k, 6])],
        initializer=const,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def card(tile: int = TILE, k: int = K, categories: bool = True) -> dict[str, object]:
    """The model card the gateway reads (``contract`` and ``categories``; the rest is for people)."""
    content: dict[str, object] = {
        "name": NAME,
        "version": "0.1.0",
        "sha256": "00" * 32,
        "contract": {
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, 3, tile, tile]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, k, 6]}],
            "top_k": k,
        },
    }
    if categories:
        content["categories"] = list(CATEGORIES)
    return content


def config_pbtxt(tile: int = TILE, k: int = K) -> str:
    """A CPU config for the python backend, spelled out (the embedded server does not auto-complete)."""
    return f"""name: "{NAME}"
backend: "python"
max_batch_size: 4
input [ {{ name: "{INPUT}", data_type: TYPE_UINT8, dims: [ 3, {tile}, {tile} ] }} ]
output [ {{ name: "{OUTPUT}", data_type: TYPE_FP32, dims: [ {k}, 6 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
dynamic_batching {{ }}
parameters: {{ key: "onnx_file", value: {{ string_value: "model.onnx" }} }}
"""


def write_repository(
    root: Path, *, with_card: bool = True, card_tile: int = TILE, categories: bool = True
) -> Path:
    """``root/markers/{config.pbtxt, 1/model.py, 1/model.onnx, 1/model_card.json}``; returns ``root``.

    Args:
        root: the model repository (created).
        with_card: write the model card (without one the gateway reads Triton's config).
        card_tile: the tile side the card states (another than the model's makes them disagree).
        categories: whether the card lists the categories.
    """
    version = root / NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    (root / NAME / "config.pbtxt").write_text(config_pbtxt())
    shutil.copyfile(PALM_MODEL_PY, version / "model.py")
    build_onnx(version / "model.onnx")
    if with_card:
        (version / "model_card.json").write_text(json.dumps(card(card_tile, categories=categories), indent=2))
    return root

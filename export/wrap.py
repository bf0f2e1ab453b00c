"""Bring your own detector: wrap it so it meets the gateway's contract, export it, check it, lay it out.

The gateway serves any model that takes ``uint8 [N, 3, S, S]`` RGB tiles and returns ``float32
[N, K, 6]`` rows ``(x1, y1, x2, y2, score, class_id)`` in tile pixels, score-sorted, all-zero rows as
padding (docs/bring-your-own-model.md). Most detectors take normalised float images and return a
variable number of boxes; :class:`ContractWrapper` closes the gap inside the graph:

1. ``uint8 -> float``, ``/ 255``, ``(x - mean) / std`` (the detector's own normalisation);
2. the detector, here YOLO-style: one row per anchor point, ``(cx, cy, w, h, objectness, p_1..p_C)``
   with centre and size in input pixels and probabilities already through their sigmoid
   (``[N, 5 + C, A]``, as YOLOv5/v8 heads export);
3. decoding: corners from centre and size, clipped to the tile; score ``objectness x max p_c``; the
   class's index mapped to its COCO ``category_id`` (a lookup table, so ids need not be ``1..C``);
4. a fixed ``K``: the top ``K`` rows by score (``topk`` sorts them), rows scoring below
   ``score_floor`` zeroed, and zero rows appended when the detector has fewer than ``K`` anchors.

No in-graph NMS is needed: the gateway's seam merge is class-aware NMS over every box of the image,
the boxes of one tile included. ``K`` must leave room for the duplicates a dense head reports per object
(a few per object at most anchors; measure on your data: a tile whose ``K``-th row still clears the
threshold is reported as saturated in the response's warnings).

``python -m export.wrap --out /tmp/repo --name cars --tile 256 --top-k 100 --classes 3:car,8:truck``
builds :class:`TinyYolo` with seeded random weights as a stand-in for a trained detector, exports the
wrapped model with a dynamic batch axis, checks it on onnxruntime (:func:`check_onnx`) and writes
``<out>/<name>/{config.pbtxt, configs/cpu.pbtxt, 1/model.onnx, 1/model.py, 1/model_card.json}``, laid
out like ``model_repository/palm``: ``config.pbtxt`` for NVIDIA's Triton container on a GPU,
``configs/cpu.pbtxt`` for the embedded server, which ``PALM_TRITON__MODEL_NAME=<name>
PALM_TRITON__MODEL_REPOSITORY=<out> make run`` starts. To wrap your own detector, build
``ContractWrapper(your_module, ...)`` with its trained weights loaded and call :func:`write_repository`
(or :func:`export_onnx`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from gateway.pipeline.contract import ModelContract
from gateway.settings import REPO_ROOT

PYTHON_BACKEND = REPO_ROOT / "model_repository" / "palm" / "1" / "model.py"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, slots=True)
class Category:
    """One class the wrapped detector reports: its COCO id and name."""

    id: int
    name: str
    supercategory: str = "object"


class TinyYolo(nn.Module):
    """A small YOLO-style detector (random weights): stride-8 anchor points, ``[N, 5 + C, A]`` out.

    It stands in for a trained model in the worked example and the tests; its boxes mean nothing.
    """

    def __init__(self, classes: int, width: int = 16, stride: int = 8) -> None:
        super().__init__()
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Conv2d(width * 2, 5 + classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        raw = self.head(self.body(x))  # [N, 5 + C, H/8, W/8]
        n, channels, rows, cols = raw.shape
        ys = torch.arange(rows, dtype=x.dtype, device=x.device).view(1, rows, 1).expand(1, rows, cols)
        xs = torch.arange(cols, dtype=x.dtype, device=x.device).view(1, 1, cols).expand(1, rows, cols)
        cx = (xs + torch.sigmoid(raw[:, 0])) * self.stride
        cy = (ys + torch.sigmoid(raw[:, 1])) * self.stride
        size = torch.exp(raw[:, 2:4].clamp(max=4.0)) * self.stride
        probabilities = torch.sigmoid(raw[:, 4:])
        out = torch.cat([cx.unsqueeze(1), cy.unsqueeze(1), size, probabilities], dim=1)
        return out.reshape(n, channels, rows * cols)


class ContractWrapper(nn.Module):
    """A YOLO-style detector behind the gateway's contract (steps in the module docstring).

    Args:
        detector: maps normalised ``float32 [N, 3, S, S]`` to ``[N, 5 + C, A]`` (see the docstring).
        category_ids: the COCO id of each of the detector's ``C`` classes, in its order.
        top_k: ``K``, the rows returned per tile.
        tile: ``S``, the tile side (boxes are clipped to it).
        mean: per-channel mean of the detector's normalisation (on 0..1 pixels).
        std: per-channel standard deviation of it.
        score_floor: rows scoring below this are all-zero padding.
    """

    ids: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        detector: nn.Module,
        category_ids: Sequence[int],
        top_k: int,
        tile: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        score_floor: float = 0.001,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.top_k = top_k
        self.tile = float(tile)
        self.score_floor = score_floor
        self.register_buffer("ids", torch.tensor([float(i) for i in category_ids]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        raw = self.detector(x)  # [N, 5 + C, A]
        cx, cy, w, h = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        x1 = (cx - w / 2).clamp(0.0, self.tile)
        y1 = (cy - h / 2).clamp(0.0, self.tile)
        x2 = (cx + w / 2).clamp(0.0, self.tile)
        y2 = (cy + h / 2).clamp(0.0, self.tile)
        best, index = raw[:, 5:].max(dim=1)
        score = raw[:, 4] * best
        category = self.ids[index]
        rows = torch.stack([x1, y1, x2, y2, score, category], dim=2)  # [N, A, 6]
        anchors = rows.shape[1]
        if anchors < self.top_k:  # fewer candidates than K: zero rows make up the rest
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], self.top_k - anchors, 6)], dim=1)
        top, order = rows[:, :, 4].topk(self.top_k, dim=1)  # sorted, descending
        picked = rows.gather(1, order.unsqueeze(2).expand(-1, -1, 6))
        return picked * (top >= self.score_floor).unsqueeze(2).to(picked.dtype)


def export_onnx(
    wrapper: ContractWrapper,
    path: Path,
    *,
    input_name: str = "images",
    output_name: str = "detections",
    opset: int = 18,
) -> Path:
    """Export ``wrapper`` to one ONNX file with a dynamic batch axis (``[N, 3, S, S]`` in).

    Returns:
        ``path`` (parent folders are created).
    """
    tile = int(wrapper.tile)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, tile, tile, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        wrapper.eval(),
        (example,),
        input_names=[input_name],
        output_names=[output_name],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        external_data=False,
        verbose=False,
    )
    assert program is not None
    proto = program.model_proto
    proto.producer_name = "palm-serve export.wrap"
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return path


def check_onnx(path: Path, batches: Sequence[int] = (1, 3), seed: int = 0) -> ModelContract:
    """Run the ONNX file on random tiles with onnxruntime and check it keeps the contract.

    Checked: the tensors are off no rule of the contract (uint8 ``[N, 3, S, S]`` in, float32
    ``[N, K, 6]`` out, read from the file), the output has ``K`` rows for every batch size, each tile's
    rows are sorted by score, and a zero score comes with an all-zero row.

    Returns:
        The contract the file meets (what its model card's ``contract`` must state).

    Raises:
        ContractError: the tensors are off the contract.
        AssertionError: an output breaks it.
    """
    from export.evaluate import onnx_model

    contract, run = onnx_model(path)
    rng = np.random.default_rng(seed)
    for n in batches:
        tiles = rng.integers(0, 256, (n, *contract.tile_shape), dtype=np.uint8)
        out = run(tiles)
        assert out.shape == (n, contract.top_k, 6), f"{path}: output {out.shape}, expected [{n}, K, 6]"
        scores = out[:, :, 4]
        assert (np.diff(scores, axis=1) <= 0).all(), f"{path}: rows are not sorted by score"
        padding = scores == 0
        assert not out[padding].any(), f"{path}: a zero-score row is not all zero"
    return contract


def card(
    contract: ModelContract, categories: Sequence[Category], onnx_path: Path, *, name: str, version: str
) -> dict[str, Any]:
    """The model card the gateway reads: identity, ``contract`` and ``categories``."""
    s, k = contract.tile_size, contract.top_k
    return {
        "name": name,
        "version": version,
        "file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "contract": {
            "inputs": [
                {
                    "name": contract.input_name,
                    "datatype": "UINT8",
                    "shape": [-1, 3, s, s],
                    "layout": "NCHW, RGB, 0..255; normalisation happens in the graph",
                }
            ],
            "outputs": [
                {
                    "name": contract.output_name,
                    "datatype": "FP32",
                    "shape": [-1, k, 6],
                    "layout": "(x1, y1, x2, y2, score, class_id) in tile pixels, score-sorted descending; "
                    "all-zero rows are padding; class_id is the COCO category id as a float",
                }
            ],
            "top_k": k,
        },
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in categories],
    }


def cpu_config(name: str, contract: ModelContract, onnx_file: str = "model.onnx") -> str:
    """``configs/cpu.pbtxt`` for the embedded (CPU) server: the python backend runs ``model.onnx`` on
    onnxruntime through ``1/model.py``."""
    s, k = contract.tile_size, contract.top_k
    return f"""name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "{contract.input_name}", data_type: TYPE_UINT8, dims: [ 3, {s}, {s} ] }} ]
output [ {{ name: "{contract.output_name}", data_type: TYPE_FP32, dims: [ {k}, 6 ] }} ]
version_policy: {{ specific: {{ versions: [ 1 ] }} }}
instance_group [ {{ count: 2, kind: KIND_CPU }} ]
dynamic_batching {{
  preferred_batch_size: [ 4 ]
  max_queue_delay_microseconds: 2000
  priority_levels: 2
  default_priority_level: 2
}}
parameters: {{ key: "onnx_file", value: {{ string_value: "{onnx_file}" }} }}
"""


def gpu_config(name: str, contract: ModelContract) -> str:
    """``config.pbtxt`` for NVIDIA's Triton container: the onnxruntime backend with TensorRT in FP16."""
    s, k, image = contract.tile_size, contract.top_k, contract.input_name
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: 32
default_model_filename: "model.onnx"
input [ {{ name: "{image}", data_type: TYPE_UINT8, format: FORMAT_NCHW, dims: [ 3, {s}, {s} ] }} ]
output [ {{ name: "{contract.output_name}", data_type: TYPE_FP32, dims: [ {k}, 6 ] }} ]
version_policy: {{ specific: {{ versions: [ 1 ] }} }}
instance_group [ {{ count: 2, kind: KIND_GPU }} ]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 500
  priority_levels: 2
  default_priority_level: 2
}}
optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "tensorrt"
        parameters {{ key: "precision_mode" value: "FP16" }}
        parameters {{ key: "trt_profile_min_shapes" value: "{image}:1x3x{s}x{s}" }}
        parameters {{ key: "trt_profile_opt_shapes" value: "{image}:16x3x{s}x{s}" }}
        parameters {{ key: "trt_profile_max_shapes" value: "{image}:32x3x{s}x{s}" }}
        parameters {{ key: "trt_engine_cache_enable" value: "1" }}
        parameters {{ key: "trt_engine_cache_path" value: "/tmp/triton-trt-cache/{name}" }}
      }}
    ]
  }}
}}
"""


def write_repository(
    out: Path,
    name: str,
    wrapper: ContractWrapper,
    categories: Sequence[Category],
    *,
    version: str = "0.1.0",
    input_name: str = "images",
    output_name: str = "detections",
) -> ModelContract:
    """Export, check and lay out ``<out>/<name>`` as a Triton model repository entry (module docstring).

    Returns:
        The contract the exported model meets.
    """
    entry = out / name
    onnx_path = export_onnx(
        wrapper, entry / "1" / "model.onnx", input_name=input_name, output_name=output_name
    )
    contract = check_onnx(onnx_path)
    shutil.copyfile(PYTHON_BACKEND, entry / "1" / "model.py")
    content = card(contract, categories, onnx_path, name=name, version=version)
    (entry / "1" / "model_card.json").write_text(json.dumps(content, indent=2) + "\n")
    (entry / "config.pbtxt").write_text(gpu_config(name, contract))
    (entry / "configs").mkdir(exist_ok=True)
    (entry / "configs" / "cpu.pbtxt").write_text(cpu_config(name, contract))
    return contract


def parse_classes(text: str) -> list[Category]:
    """``3:car,8:truck`` -> categories with those ids and names."""
    categories = []
    for part in text.split(","):
        ident, _, label = part.partition(":")
        if not label:
            raise ValueError(f"--classes takes id:name pairs, got {part!r}")
        categories.append(Category(int(ident), label.strip()))
    return categories


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m export.wrap", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the model repository to write into")
    parser.add_argument("--name", default="yolo_demo", help="the model's name on Triton")
    parser.add_argument("--tile", type=int, default=256, help="S, the tile side in pixels")
    parser.add_argument("--top-k", type=int, default=100, help="K, the rows returned per tile")
    parser.add_argument("--classes", default="1:car,2:truck,3:bus", help="id:name pairs, in the head's order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in detector's random weights")
    args = parser.parse_args(argv)
    categories = parse_classes(args.classes)
    torch.manual_seed(args.seed)
    wrapper = ContractWrapper(TinyYolo(len(categories)), [c.id for c in categories], args.top_k, args.tile)
    contract = write_repository(args.out, args.name, wrapper, categories)
    print(f"wrote {args.out / args.name}: {contract.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

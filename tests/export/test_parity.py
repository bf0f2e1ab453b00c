"""Torch and onnxruntime compute the same detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.model import PalmNet, PalmNetConfig, conv_flops, fold_batchnorm
from export.onnx import load_torch_twin, parity, row_distance, session
from export.synth import render_scene

MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "palm" / "1" / "model.onnx"


def _tiles() -> np.ndarray:
    scene = render_scene(1_000_010, 1024)
    noise = np.random.default_rng(0).integers(0, 256, (1, 3, 512, 512), dtype=np.uint8)
    real = np.stack([scene.pixels[:, y : y + 512, x : x + 512] for x, y in ((0, 0), (512, 512))])
    return np.concatenate([noise, real])


def test_committed_onnx_matches_its_torch_twin() -> None:
    twin = load_torch_twin(MODEL)
    figures = parity(twin, session(MODEL), _tiles())
    assert figures["max_abs_diff"] < 1e-2


def test_batchnorm_folding_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = PalmNet(PalmNetConfig(widths=(8, 16, 16, 16), stem=8, neck=16, head=8, top_k=64))
    for m in model.modules():  # non-trivial statistics, so folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    images = torch.from_numpy(_tiles()[1:])
    with torch.no_grad():
        raw = model.raw(images)
        folded = fold_batchnorm(model).raw(images)
    for a, b in zip(raw, folded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_row_distance_ignores_order_and_cut_off_rows_but_not_values() -> None:
    a = np.array([[1, 2, 3, 4, 0.9, 1], [5, 6, 7, 8, 0.5, 2], [9, 9, 9, 9, 0.0105, 1]], np.float32)
    assert row_distance(a, a[::-1].copy()) == 0.0
    dropped = a.copy()
    dropped[2] = 0  # the row at the score floor fell below it on the other runtime
    assert row_distance(a, dropped) == 0.0
    moved = a.copy()
    moved[1, 0] += 3.0
    assert row_distance(a, moved) == pytest.approx(3.0)
    missing = a.copy()
    missing[0] = 0
    assert row_distance(a, missing) > 1.0


def test_budget_is_under_six_gflop_per_tile() -> None:
    assert conv_flops(PalmNet()) / 1e9 <= 6.0

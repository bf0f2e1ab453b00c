"""A short training run lowers the loss, deterministically, on training seeds only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.model import PalmNetConfig
from export.train import TrainConfig, _dihedral, _photometric, train

TINY = TrainConfig(
    scenes=4,
    scene_size=256,
    val_scenes=0,
    crop=128,
    batch=4,
    steps=40,
    lr=3e-3,
    warmup=5,
    log_every=1,
    render_workers=1,
    model=PalmNetConfig(widths=(8, 16, 16, 16), stem=8, neck=16, head=8, top_k=64),
)


def test_short_run_lowers_the_loss_and_is_deterministic(tmp_path: Path) -> None:
    model, records = train(TINY, tmp_path)
    losses = [r["total"] for r in records if "total" in r]
    assert len(losses) == TINY.steps
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert json.loads((tmp_path / "config.json").read_text()) == TINY.to_json()
    blob = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert blob["train_config"]["train_scene_seeds"] == [0, 3]
    again, _ = train(TINY)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides", [{"data_seed": 899_999, "scenes": 2}, {"val_seed": 1_000_000, "val_scenes": 1}]
)
def test_refuses_seeds_outside_the_training_ranges(overrides: dict[str, int]) -> None:
    cfg = TrainConfig(**{**TINY.to_json(), "model": TINY.model, **overrides})
    with pytest.raises(ValueError, match="seeds"):
        cfg.check()


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_moves_boxes_with_pixels(k: int, flip: bool) -> None:
    img = np.zeros((3, 32, 32), np.uint8)
    img[:, 5:20, 3:10] = 1
    pixels, boxes = _dihedral(img, np.array([[3, 5, 10, 20]], np.float32), k, flip)
    ys, xs = np.nonzero(pixels[0])
    assert boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_photometric_grey_is_the_luma_in_every_channel_and_jitter_stays_near() -> None:
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    grey = _photometric(np.random.default_rng(1), crop, grey_prob=1.0, jitter=0.0)
    assert np.array_equal(grey[0], grey[1])
    assert np.array_equal(grey[1], grey[2])
    luma = 0.299 * crop[0].astype(float) + 0.587 * crop[1] + 0.114 * crop[2]
    assert np.abs(grey[0].astype(float) - luma).max() <= 0.5 + 1e-6

    jittered = _photometric(np.random.default_rng(2), crop, grey_prob=0.0, jitter=0.1)
    assert not np.array_equal(jittered, crop)
    ratio = jittered[crop > 50].astype(float) / crop[crop > 50]
    assert ratio.min() > 0.88
    assert ratio.max() < 1.12

    assert _photometric(np.random.default_rng(3), crop, grey_prob=0.0, jitter=0.0) is crop


# torch's ONNX exporter calls a pytree API it has itself deprecated (a FutureWarning from inside torch).
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_fine_tuning_starts_from_the_exported_model(tmp_path: Path) -> None:
    """``init`` rebuilds an exported model with identity batch norms (the same function) and trains it
    with frozen statistics; the run records the file's sha256."""
    from export.model import PalmNet, unfold_batchnorm
    from export.onnx import export_onnx, load_torch_twin, sha256

    torch.manual_seed(5)
    base = PalmNet(TINY.model).eval()
    onnx = export_onnx(base, tmp_path / "base.onnx")
    twin = load_torch_twin(onnx)
    unfolded = unfold_batchnorm(twin)
    tiles = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(twin.raw(tiles), unfolded.raw(tiles), strict=True):
            assert torch.allclose(a, b, atol=1e-4)
    cfg = TrainConfig(**{**TINY.to_json(), "model": TINY.model, "init": str(onnx), "steps": 3})
    model, _ = train(cfg, tmp_path / "run")
    blob = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert blob["train_config"]["init_sha256"] == sha256(onnx)
    stats = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert stats
    assert all(torch.all(v == 0) for k, v in stats.items() if k.endswith("running_mean"))
    assert all(torch.all(v == 1) for k, v in stats.items() if k.endswith("running_var"))

"""export.wrap: a YOLO-style detector behind the gateway's contract, exported, checked and laid out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.evaluate import onnx_model
from export.wrap import Category, ContractWrapper, TinyYolo, main, write_repository
from gateway.model_card import load_model_info
from gateway.pipeline.contract import ModelContract
from gateway.settings import TritonSettings

IDS = (3, 8, 11)


def wrapped(tile: int, top_k: int, seed: int = 0) -> ContractWrapper:
    torch.manual_seed(seed)
    return ContractWrapper(TinyYolo(len(IDS)), IDS, top_k=top_k, tile=tile).eval()


def run(wrapper: ContractWrapper, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = wrapper(torch.from_numpy(tiles)).numpy()
    return out


def test_uint8_tiles_become_k_sorted_rows_in_tile_pixels_with_the_cards_ids() -> None:
    tiles = np.random.default_rng(1).integers(0, 256, (2, 3, 128, 128), dtype=np.uint8)

    out = run(wrapped(128, 50), tiles)

    assert out.shape == (2, 50, 6)
    assert out.dtype == np.float32
    assert (np.diff(out[:, :, 4], axis=1) <= 0).all()
    live = out[:, :, 4] > 0
    assert live.any()
    assert set(out[live][:, 5].tolist()) <= set(map(float, IDS))
    assert (out[live][:, :4] >= 0).all()
    assert (out[live][:, :4] <= 128).all()
    assert (out[live][:, 2] >= out[live][:, 0]).all()


def test_fewer_candidates_than_k_are_padded_with_zero_rows() -> None:
    tiles = np.random.default_rng(2).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)

    out = run(wrapped(64, 100), tiles)  # 8 x 8 = 64 anchor points at stride 8

    assert out.shape == (1, 100, 6)
    assert not out[0, 64:].any()
    assert (out[0, :64, 4] > 0).all()


def test_the_normalisation_is_inside_the_graph() -> None:
    wrapper = wrapped(64, 10)
    tiles = np.full((1, 3, 64, 64), 200, np.uint8)
    expected_input = (torch.full((1, 3, 64, 64), 200 / 255.0) - wrapper.mean) / wrapper.std
    seen: list[torch.Tensor] = []
    wrapper.detector.register_forward_hook(lambda module, args, out: seen.append(args[0]))

    run(wrapper, tiles)

    torch.testing.assert_close(seen[0], expected_input)


# The exporter (torch.onnx, dynamo) calls a pytree API that torch itself deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.slow
def test_the_export_keeps_the_contract_and_lays_out_a_servable_entry(tmp_path: Path) -> None:
    wrapper = wrapped(128, 300, seed=5)  # 16 x 16 anchors, all of them within K
    categories = [Category(i, f"class{i}") for i in IDS]

    contract = write_repository(tmp_path, "yolo", wrapper, categories, input_name="pixels")

    entry = tmp_path / "yolo"
    assert contract == ModelContract(tile_size=128, top_k=300, input_name="pixels", output_name="detections")
    assert sorted(p.name for p in entry.iterdir()) == ["1", "config.pbtxt", "configs"]
    assert 'backend: "onnxruntime"' in (entry / "config.pbtxt").read_text()
    assert 'name: "pixels"' in (entry / "config.pbtxt").read_text()
    assert "dims: [ 3, 128, 128 ]" in (entry / "configs" / "cpu.pbtxt").read_text()
    assert 'backend: "python"' in (entry / "configs" / "cpu.pbtxt").read_text()
    onnx_contract, run_onnx = onnx_model(entry / "1" / "model.onnx")
    assert onnx_contract == contract
    tiles = np.random.default_rng(3).integers(0, 256, (3, 3, 128, 128), dtype=np.uint8)
    # Rows of nearly equal score may swap places between the two runtimes: compare each tile's rows
    # as a set, ordered by their (rounded) corners.
    got, expected = run_onnx(tiles), run(wrapper, tiles)
    for mine, theirs in zip(got, expected, strict=True):
        mine_sorted = mine[np.lexsort(np.round(mine[:, 3::-1], 1).T)]
        theirs_sorted = theirs[np.lexsort(np.round(theirs[:, 3::-1], 1).T)]
        np.testing.assert_allclose(mine_sorted, theirs_sorted, rtol=1e-4, atol=1e-3)
    model = load_model_info(TritonSettings(model_name="yolo", model_repository=tmp_path), contract)
    assert model.contract == contract
    assert [(c.id, c.name) for c in model.categories] == [(3, "class3"), (8, "class8"), (11, "class11")]
    card = json.loads((entry / "1" / "model_card.json").read_text())
    assert card["contract"]["outputs"][0]["shape"] == [-1, 300, 6]


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.slow
def test_the_cli_writes_the_worked_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--name", "cars", "--tile", "128", "--top-k", "40"]) == 0

    assert "images UINT8 [N, 3, 128, 128] -> detections FP32 [N, 40, 6]" in capsys.readouterr().out
    assert (tmp_path / "cars" / "1" / "model.py").is_file()

"""export.evaluate: the CLI end to end, the held-out guard, and the COCO arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.evaluate import SeedOverlap, check_heldout, coco_metrics, coco_results, detect_scene, main
from export.synth import coco_dataset, render_scene
from gateway.pipeline.merge import Detections
from tests import markers
from tests.factories import make_geotiff
from tests.markers import Marker, build_onnx, draw

MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "palm" / "1" / "model.onnx"


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    args = ["--onnx", str(MODEL), "--scenes", "2", "--size", "640", "--seed", "1000000", "--json", str(out)]
    assert main(args) == 0
    figures = json.loads(out.read_text())
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= figures[key] <= 1.0
        for name in ("palm_tree", "building"):
            assert key in figures["per_class"][name]
    assert figures["protocol"]["scene_seeds"] == [1_000_000, 1_000_001]
    # The shipped model scores ~0.99 here; an untrained or mis-exported one scores ~0.
    assert figures["AP50"] >= 0.8
    assert "palm_tree" in capsys.readouterr().out


def test_cli_refuses_training_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--onnx", str(MODEL), "--scenes", "2", "--seed", "999999"]) == 2
    assert "held-out" in capsys.readouterr().err
    with pytest.raises(SeedOverlap):
        check_heldout([5])


def _truth(scene_seed: int, size: int) -> tuple[dict[str, object], Detections]:
    scene = render_scene(scene_seed, size)
    n = len(scene.boxes)
    det = Detections(scene.boxes.copy(), np.linspace(1.0, 0.5, n, dtype=np.float32), scene.categories.copy())
    return coco_dataset([(scene, "s.tif")]), det


def test_ground_truth_scores_one_and_shifted_boxes_score_less() -> None:
    gt, det = _truth(1_000_020, 512)
    perfect = coco_metrics(gt, coco_results([det]))
    assert perfect["AP"] == pytest.approx(1.0)
    assert perfect["per_class"]["palm_tree"]["AP75"] == pytest.approx(1.0)
    shifted = Detections(det.boxes + 3.0, det.scores, det.class_ids)
    worse = coco_metrics(gt, coco_results([shifted]))
    assert worse["AP"] < 0.9
    assert worse["AP75"] < worse["AP50"]


def test_detect_scene_tiles_and_merges_into_image_coordinates() -> None:
    """A fake model that reports one box at each tile's centre: one merged box per tile, placed at the
    tile's centre in image pixels (tiles of a 1024 px image start at 0, 384 and 512)."""

    def centre_box(tiles: np.ndarray) -> np.ndarray:
        out = np.zeros((len(tiles), 512, 6), np.float32)
        out[:, 0] = [246, 246, 266, 266, 0.9, 1]
        return out

    det = detect_scene(np.zeros((3, 1024, 1024), np.uint8), centre_box, tile=512)
    centres = sorted(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in det.boxes.tolist())
    expected = sorted((x + 256.0, y + 256.0) for x in (0, 384, 512) for y in (0, 384, 512))
    assert centres == expected


def squares_truth(tmp_path: Path, shift: float = 0.0) -> tuple[Path, Path]:
    """Two GeoTIFFs of coloured squares (tests/markers.py) and a COCO file naming the squares."""
    images = tmp_path / "images"
    images.mkdir(parents=True)
    scenes = {
        "a.tif": [Marker(10, 170, 30, 50), Marker(20, 400, 300, 40), Marker(30, 20, 420, 30)],
        "sub/b.tif": [Marker(20, 60, 60, 24)],
    }
    truth: dict[str, list[dict[str, object]]] = {
        "images": [],
        "annotations": [],
        "categories": [dict(c) for c in markers.CATEGORIES],
    }
    for image_id, (name, squares) in enumerate(scenes.items(), start=1):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        make_geotiff(images / name, 600, 500, data=draw(600, 500, squares), photometric="RGB")
        truth["images"].append({"id": image_id, "file_name": name, "width": 600, "height": 500})
        for square in squares:
            x, y = square.x + shift, square.y + shift
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": square.category_id,
                    "bbox": [x, y, square.size, square.size],
                    "area": square.size**2,
                    "iscrowd": 0,
                }
            )
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(truth))
    return path, images


def test_cli_scores_a_users_coco_ground_truth_on_their_geotiffs(tmp_path: Path) -> None:
    """Another model (256 px tiles, K = 100, its own tensor names) on the user's files and classes."""
    onnx = build_onnx(tmp_path / "markers.onnx")
    truth, images = squares_truth(tmp_path)
    out = tmp_path / "eval.json"

    assert main(["--onnx", str(onnx), "--coco", str(truth), "--images", str(images), "--json", str(out)]) == 0

    figures = json.loads(out.read_text())
    assert figures["AP"] == pytest.approx(1.0)
    assert set(figures["per_class"]) == {"red_marker", "green_marker", "blue_marker"}
    assert figures["num_gt"] == {"red_marker": 1, "green_marker": 2, "blue_marker": 1}
    assert figures["protocol"]["tiling"]["tile"] == 256
    assert figures["protocol"]["tiling"]["overlap"] == 64

    shifted, _ = squares_truth(tmp_path / "shifted", shift=6.0)
    main(["--onnx", str(onnx), "--coco", str(shifted), "--images", str(images), "--json", str(out)])
    assert json.loads(out.read_text())["AP75"] < 0.9


def test_cli_refuses_a_coco_file_whose_image_sizes_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = build_onnx(tmp_path / "markers.onnx")
    truth, images = squares_truth(tmp_path)
    content = json.loads(truth.read_text())
    content["images"][0]["width"] = 1200
    truth.write_text(json.dumps(content))

    assert main(["--onnx", str(onnx), "--coco", str(truth), "--images", str(images)]) == 2
    assert "a.tif is 600 x 500 px but the COCO file says 1200 x 500" in capsys.readouterr().err


def test_operating_point_counts_matches_above_the_threshold() -> None:
    """Two palms; detections: a hit at 0.9, a miss at 0.6 (false positive), a hit at 0.2 (below 0.3)."""
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "palm_tree"}, {"id": 2, "name": "building"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [80, 80, 10, 10], "score": 0.6},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.2},
    ]
    op = coco_metrics(gt, results, operating=0.3)["at_threshold"]
    assert op["score_threshold"] == 0.3
    palm = op["per_class"]["palm_tree"]
    assert (palm["tp"], palm["fp"]) == (1, 1)
    assert palm["precision"] == 0.5
    assert palm["recall"] == 0.5
    assert palm["max_fp_score"] == 0.6
    low = coco_metrics(gt, results, operating=0.1)["at_threshold"]["per_class"]["palm_tree"]
    assert (low["tp"], low["fp"], low["recall"]) == (2, 1, 1.0)

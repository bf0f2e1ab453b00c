"""loadtest.bench_peers: the plain loop's tiling and NMS, and the COCO plumbing every method is scored by."""

from __future__ import annotations

import numpy as np
import pytest

from export.evaluate import coco_metrics
from export.synth import coco_dataset, render_scene
from gateway.pipeline import tiling
from loadtest.bench_peers import as_rows, axis_offsets, coco_rows, from_gateway_json, nms


@pytest.mark.parametrize("length", [300, 512, 513, 1000, 4096, 20_000])
def test_plain_loop_cuts_the_gateways_tiles(length: int) -> None:
    assert axis_offsets(length) == tiling.axis_offsets(length, 512, 128)


def test_nms_suppresses_same_class_overlaps_only() -> None:
    rows = as_rows(
        [
            [0, 0, 10, 10, 0.6, 1],  # IoU 0.82 with the next, same class: suppressed
            [0, 0, 10, 11, 0.9, 1],
            [0, 0, 10, 10, 0.8, 2],  # same place, other class: kept
            [6, 0, 16, 10, 0.7, 1],  # IoU 0.29 with the best: kept
        ]
    )
    kept = nms(rows)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert kept[:, 5].tolist() == [1, 2, 1]
    assert nms(as_rows([])).shape == (0, 6)


def test_gateway_bbox_is_converted_to_corners() -> None:
    body = {"detections": [{"bbox": [10.0, 20.0, 5.0, 6.0], "score": 0.5, "category_id": 2}]}
    assert from_gateway_json(body).tolist() == [[10.0, 20.0, 15.0, 26.0, 0.5, 2.0]]


def test_rows_are_scored_against_the_image_at_the_same_position() -> None:
    scenes = [render_scene(1_000_030, 512), render_scene(1_000_031, 512)]
    truth = coco_dataset((s, f"s{i}.tif") for i, s in enumerate(scenes))
    perfect = [
        np.column_stack([s.boxes, np.ones(len(s.boxes)), s.categories]).astype(np.float32) for s in scenes
    ]
    assert coco_metrics(truth, coco_rows(perfect))["AP"] == pytest.approx(1.0)
    assert coco_metrics(truth, coco_rows(perfect[::-1]))["AP"] < 0.2

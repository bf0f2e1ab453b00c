"""Accuracy of the shipped model on imagery finer and coarser than it was trained for, with and without
the gateway's resampling.

The same held-out seeds (``--seed``, ``--scenes``) are rendered by :func:`export.synth.render_scene` at
each GSD over the same ground extent (``--extent`` metres a side: 3,072 px at 0.1 m, 1,024 px at
0.3 m). The renderer draws every object in metres (palms 3 to 8 m, buildings 7 to 26 m), so each GSD
shows the same kinds and sizes of objects on the ground, in different layouts (its random draws depend
on the image size). Each scene is written as a GeoTIFF and read by the gateway's reader
(:func:`gateway.pipeline.raster.open_raster`) with the model card's GSD range, either as the gateway
reads it (``resample=auto``: finer scenes resampled to the range's finest GSD) or as it is
(``resample=off``); tiles are cut by :func:`~gateway.pipeline.tiling.tile_grid`, run by onnxruntime,
merged by :mod:`gateway.pipeline.merge`, mapped back to the file's pixels
(:func:`~gateway.pipeline.resolution.to_source_boxes`) and scored against the scene's ground truth in
its own pixels with :func:`export.evaluate.coco_metrics` (score threshold 0.05, as ``export.evaluate``).

The native rows are scenes rendered inside the model's range (``--native``, 0.3 m by default: what
finer scenes are resampled to); coarser rows (``--coarse``) are read as they are, since the gateway
never upsamples (beyond twice the range's top it refuses them; here they are read with ``off``).

Run: ``python -m loadtest.bench_resolution [--scenes 12] [--extent 307.2] [--gsd 0.1 0.25] [--json out]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.evaluate import DEFAULT_SCORE_THRESHOLD, TileRunner, coco_metrics, coco_results, onnx_runner
from export.synth import HELDOUT_MIN_SEED, Scene, coco_dataset, render_scene, write_geotiff
from gateway.model_card import load_model_info
from gateway.pipeline.merge import Detections, merge_tiles
from gateway.pipeline.raster import ReadOptions, open_raster
from gateway.pipeline.resolution import GsdRange, ResampleMode, ResolutionRequest, to_source_boxes
from gateway.pipeline.tiling import tile_grid
from gateway.settings import REPO_ROOT, LimitSettings, TritonSettings

MODEL_ONNX = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"
TILE = 512  # the Palm model's tile side (its card's contract)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: scenes at one GSD, read one way."""

    gsd_m: float
    mode: ResampleMode
    label: str


def detect_file(
    path: Path, request: ResolutionRequest, runner: TileRunner, batch: int = 8
) -> tuple[Detections, int, float]:
    """The gateway's reading, tiling and merge of one file: detections in its pixels, tiles, factor."""
    with open_raster(path, LimitSettings(), ReadOptions(resolution=request)) as reader:
        info = reader.info
        outputs: list[tuple[Any, Any, Any]] = []
        pending: list[Any] = []

        def flush() -> None:
            pixels = np.stack([tile.pixels for tile in pending])
            raw = runner(pixels)
            outputs.extend((tile.spec, raw[i], tile.valid) for i, tile in enumerate(pending))
            pending.clear()

        for tile in reader.tiles(tile_grid(*info.read_size, TILE, TILE // 4)):
            pending.append(tile)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        tiles = len(outputs) + reader.skipped
    merged = merge_tiles(outputs, score_threshold=DEFAULT_SCORE_THRESHOLD)
    boxes = to_source_boxes(merged.boxes, (info.width, info.height), info.read_size)
    return Detections(boxes, merged.scores, merged.class_ids), tiles, info.resample_factor


def measure(
    row: Row, seeds: range, extent_m: float, model: GsdRange, runner: TileRunner, folder: Path
) -> dict[str, Any]:
    size = round(extent_m / row.gsd_m)
    started = time.perf_counter()
    scenes: list[Scene] = []
    detections: list[Detections] = []
    tiles = 0
    factor = 1.0
    for seed in seeds:
        scene = render_scene(seed, size, row.gsd_m)
        path = write_geotiff(scene, folder / f"scene_{seed}_{row.gsd_m:g}.tif")
        found, cut, factor = detect_file(path, ResolutionRequest(model, row.mode), runner)
        path.unlink()
        scenes.append(scene)
        detections.append(found)
        tiles += cut
    truth = coco_dataset((s, f"scene_{s.seed}.tif") for s in scenes)
    metrics = coco_metrics(truth, coco_results(detections))
    return {
        "gsd_m": row.gsd_m,
        "read": row.label,
        "resample": row.mode.value,
        "size_px": size,
        "resample_factor": round(factor, 4),
        "scenes": len(scenes),
        "objects": sum(metrics["num_gt"].values()),
        "tiles": tiles,
        "AP50": metrics["AP50"],
        "AP": metrics["AP"],
        "per_class_AP50": {name: m["AP50"] for name, m in metrics["per_class"].items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def rows(
    native: list[float], fine: list[float], coarse: list[float], model: GsdRange, modes: list[str]
) -> list[Row]:
    out = [Row(g, ResampleMode.AUTO, "native (in range)") for g in native]
    for g in fine:
        if ResampleMode.AUTO in modes:
            out.append(Row(g, ResampleMode.AUTO, f"resampled to {model.resample_to_m:g} m"))
        if ResampleMode.OFF in modes:
            out.append(Row(g, ResampleMode.OFF, "as it is (resample=off)"))
    out += [Row(g, ResampleMode.OFF, "as it is (coarser)") for g in coarse]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED, help="first held-out scene seed")
    parser.add_argument("--extent", type=float, default=307.2, help="scene side on the ground, metres")
    parser.add_argument("--native", type=float, nargs="*", default=[0.3], help="GSDs inside the range")
    parser.add_argument("--gsd", type=float, nargs="*", default=[0.1, 0.25], help="finer GSDs")
    parser.add_argument("--coarse", type=float, nargs="*", default=[], help="coarser GSDs, read as they are")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("auto", "off"),
        default=["auto", "off"],
        help="how finer scenes are read",
    )
    parser.add_argument(
        "--resample-to", type=float, help="resample finer scenes to this GSD instead of the card's choice"
    )
    parser.add_argument("--onnx", type=Path, default=MODEL_ONNX)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    model = load_model_info(TritonSettings(model_repository=REPO_ROOT / "model_repository")).resolution
    if model is None:
        print("the model card states no GSD range", file=sys.stderr)
        return 2
    if args.resample_to is not None:
        model = replace(model, resample_to_m=args.resample_to)
    seeds = range(args.seed, args.seed + args.scenes)
    runner = onnx_runner(args.onnx, args.threads)
    print(
        f"model range {model.describe()}, finer imagery resampled to {model.resample_to_m:g} m; "
        f"{args.scenes} scenes (seeds {seeds.start}-{seeds.stop - 1}) of {args.extent:g} m a side; "
        f"{TILE} px tiles; score threshold {DEFAULT_SCORE_THRESHOLD}"
    )
    header = f"{'GSD m':>6}  {'read':<26} {'px':>5} {'factor':>6} {'objects':>7} {'tiles':>5}"
    print(f"{header} {'AP50':>6} {'AP':>6}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-resolution-") as tmp:
        for row in rows(args.native, args.gsd, args.coarse, model, args.modes):
            figures = measure(row, seeds, args.extent, model, runner, Path(tmp))
            results.append(figures)
            print(
                f"{figures['gsd_m']:>6g}  {figures['read']:<26} {figures['size_px']:>5} "
                f"{figures['resample_factor']:>6g} {figures['objects']:>7} {figures['tiles']:>5} "
                f"{figures['AP50']:6.3f} {figures['AP']:6.3f}  ({figures['seconds']:.0f} s)",
                flush=True,
            )
    reference = next((r for r in results if r["read"].startswith("native")), None)
    if reference is not None:
        print(f"\nAP50 against native {reference['gsd_m']:g} m ({reference['AP50']:.3f}):")
        for figures in results:
            if figures is not reference:
                delta = figures["AP50"] - reference["AP50"]
                print(f"  {figures['gsd_m']:>5g} m {figures['read']:<26} {delta:+.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

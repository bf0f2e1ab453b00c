"""Held-out accuracy of an exported model, measured the way the gateway serves it.

Two sources of ground truth:

* ``python -m export.evaluate --onnx model_repository/palm/1/model.onnx --scenes 24 --seed 1000000``
  renders held-out synthetic scenes (seeds ``K .. K+N-1``, all ``>= HELDOUT_MIN_SEED`` so never used in
  training) and keeps their pixels in memory;
* ``python -m export.evaluate --onnx my/1/model.onnx --coco truth.json --images DIR`` takes a user's
  COCO file and the rasters it names (``DIR/<file_name>``, GeoTIFF or anything else the gateway reads)
  and reads each through the gateway's own reader (band choice, scaling, nodata masks), as
  ``/v1/predict`` would; the categories are the COCO file's.

Either way the image is cut with the gateway's :func:`~gateway.pipeline.tiling.tile_grid` at the
model's tile side (read from the ONNX input, e.g. 512 px) and the gateway's default overlap (a quarter
of the tile, or ``--overlap``), the ONNX runs on onnxruntime tile by tile (its tensor names also read
from the file), the gateway's :func:`~gateway.pipeline.merge.merge_tiles` merges the tiles (default IoU
and fragment rules), detections scoring below ``--score-threshold`` (0.05 by default, low on purpose:
COCO AP integrates over the whole precision/recall curve) are dropped and the rest are scored with
pycocotools' COCOeval.

COCOeval's default limit of 100 detections per image would cap recall on plantation scenes with
hundreds of palms, so the limit is raised to ``MAX_DETS``; AP is the mean precision over IoU
thresholds 0.50:0.05:0.95 and 101 recall points, for all object areas (the only area range evaluated).

The operating point is what a user gets at the gateway's default score threshold
(``tiling.score_threshold``, :data:`OPERATING_THRESHOLD`): per class, of the detections scoring at least
that, how many COCOeval matched to an object at IoU 0.5 (true positives) and how many it did not
(false positives); precision ``TP / (TP + FP)``, recall ``TP / objects``, and the highest score of a false
positive. ``--distractors`` renders the scenes with the generator's distractors (round things that are
not palms; same objects and ground truth as without), where false positives on clutter show.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from export.synth import HELDOUT_MIN_SEED, Scene, coco_dataset, render_scene, to_grey
from gateway.pipeline.contract import ModelContract, TensorSpec
from gateway.pipeline.merge import Detections, merge_tiles
from gateway.pipeline.raster import ReadOptions, open_raster
from gateway.pipeline.tiling import TileSpec, choose_overlap, tile_grid
from gateway.settings import LimitSettings, TilingSettings

log = logging.getLogger(__name__)

#: Runs a batch of ``uint8 [B, 3, S, S]`` tiles and returns the model's ``[B, K, 6]`` rows.
TileRunner = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]
#: onnxruntime's element types as Triton names them (the contract's vocabulary).
ORT_DATATYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(float16)": "FP16"}
DEFAULT_SCORE_THRESHOLD = 0.05
MAX_DETS = 10_000
OPERATING_THRESHOLD = TilingSettings().score_threshold


class SeedOverlap(ValueError):
    """An evaluation seed falls inside the range reserved for training and validation scenes."""


def check_heldout(seeds: Iterable[int]) -> None:
    """Refuse any seed below :data:`~export.synth.HELDOUT_MIN_SEED` (training/validation range).

    Raises:
        SeedOverlap: naming the first offending seed.
    """
    for seed in seeds:
        if seed < HELDOUT_MIN_SEED:
            raise SeedOverlap(
                f"scene seed {seed} is in the training/validation range [0, {HELDOUT_MIN_SEED}); "
                f"held-out evaluation needs seeds >= {HELDOUT_MIN_SEED}"
            )


def detect_scene(
    pixels: npt.NDArray[np.uint8],
    runner: TileRunner,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    batch: int = 8,
    *,
    tile: int,
    overlap: int | None = None,
) -> Detections:
    """Detections for one ``uint8 [3, H, W]`` image: gateway tiling (``tile`` px, the model's side, and
    ``overlap``, a quarter of it unless given), the model per tile, gateway merge."""
    _, height, width = pixels.shape
    specs = tile_grid(width, height, tile, choose_overlap(tile, overlap))
    outputs: list[tuple[Any, npt.NDArray[np.float32], None]] = []
    for start in range(0, len(specs), batch):
        group = specs[start : start + batch]
        tiles = np.zeros((len(group), 3, tile, tile), np.uint8)
        for i, spec in enumerate(group):
            tiles[i, :, : spec.height, : spec.width] = pixels[
                :, spec.y : spec.y + spec.height, spec.x : spec.x + spec.width
            ]
        raw = runner(tiles)
        outputs += [(spec, raw[i], None) for i, spec in enumerate(group)]
    return merge_tiles(outputs, score_threshold=score_threshold)


def detect_file(
    path: Path,
    runner: TileRunner,
    contract: ModelContract,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    batch: int = 8,
    *,
    overlap: int | None = None,
    bands: tuple[int, ...] | None = None,
) -> tuple[Detections, tuple[int, int]]:
    """Detections for one raster read as the gateway reads it, and its ``(width, height)``.

    The gateway's reader turns the file into uint8 RGB tiles with their validity masks (nodata, alpha,
    padding), cut at the model's tile side; boxes whose centre lies on an invalid pixel are dropped by
    the same merge rules as ``/v1/predict``.
    """
    tile = contract.tile_size
    outputs: list[tuple[TileSpec, npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]] = []
    with open_raster(path, LimitSettings(), ReadOptions(bands=bands)) as reader:
        width, height = reader.info.width, reader.info.height
        specs = tile_grid(width, height, tile, choose_overlap(tile, overlap))
        pending: list[Any] = []

        def flush() -> None:
            raw = runner(np.stack([t.pixels for t in pending]))
            outputs.extend((t.spec, raw[i], t.valid) for i, t in enumerate(pending))
            pending.clear()

        for cut in reader.tiles(specs):
            pending.append(cut)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    return merge_tiles(outputs, score_threshold=score_threshold), (width, height)


def evaluate_coco(
    ground_truth: dict[str, Any],
    images: Path,
    runner: TileRunner,
    contract: ModelContract,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    *,
    overlap: int | None = None,
    bands: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Score a model on a user's COCO ground truth; each image is ``images / file_name``.

    Raises:
        FileNotFoundError: an image the COCO file names is not in ``images``.
        ValueError: an image's size differs from the COCO file's ``width`` and ``height``.
    """
    rows: list[dict[str, Any]] = []
    for image in ground_truth["images"]:
        path = images / image["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} (named by image {image['id']} of the COCO file) does not exist")
        det, size = detect_file(path, runner, contract, score_threshold, overlap=overlap, bands=bands)
        stated = (image.get("width", size[0]), image.get("height", size[1]))
        if stated != size:
            raise ValueError(
                f"{path} is {size[0]} x {size[1]} px but the COCO file says {stated[0]} x {stated[1]}"
            )
        rows += coco_results([det], image_ids=[int(image["id"])])
    return coco_metrics(ground_truth, rows)


def coco_results(
    detections: Sequence[Detections], image_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """COCO result rows; ``image_id`` counts from 1 (matching :func:`~export.synth.coco_dataset`) unless
    ``image_ids`` gives each one."""
    rows: list[dict[str, Any]] = []
    ids = image_ids if image_ids is not None else range(1, len(detections) + 1)
    for image_id, det in zip(ids, detections, strict=True):
        for (x1, y1, x2, y2), score, cat in zip(
            det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist(), strict=True
        ):
            rows.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return rows


def coco_metrics(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], operating: float = OPERATING_THRESHOLD
) -> dict[str, Any]:
    """AP, AP50, AP75 overall and per category from COCOeval, and the operating point at score
    ``operating`` (see the module docstring).

    Returns:
        ``{"AP", "AP50", "AP75", "per_class": {name: {"AP", "AP50", "AP75"}}, "num_gt", "num_dets",
        "at_threshold": {"score_threshold", "iou", "per_class": {name: {"precision", "recall", "tp",
        "fp", "max_fp_score"}}}}``.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = [1, 100, MAX_DETS]
        # Only the "all" area range is reported; matching the small/medium/large ranges as well would
        # triple the time COCOeval spends in its per-detection Python loop, for figures never read.
        ev.params.areaRng = ev.params.areaRng[:1]
        ev.params.areaRngLbl = ev.params.areaRngLbl[:1]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T IoU, R recall, K category, A area, M maxDets]
    ious = list(np.round(ev.params.iouThrs, 2))

    def mean_ap(p: npt.NDArray[np.float64]) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else float("nan")

    def figures(k: slice | int) -> dict[str, float]:
        p = precision[:, :, k, 0, -1]
        return {
            "AP": mean_ap(p),
            "AP50": mean_ap(p[ious.index(0.5)]),
            "AP75": mean_ap(p[ious.index(0.75)]),
        }

    names = {int(c["id"]): str(c["name"]) for c in ground_truth["categories"]}
    out: dict[str, Any] = figures(slice(None))
    out["per_class"] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        out["per_class"][names[cat_id]] = figures(k)
    anns = ground_truth["annotations"]
    out["num_gt"] = {name: sum(a["category_id"] == i for a in anns) for i, name in names.items()}
    out["num_dets"] = len(results)
    out["at_threshold"] = _operating_point(ev, operating, ious.index(0.5), names)
    return out


def _operating_point(ev: COCOeval, threshold: float, iou_index: int, names: dict[int, str]) -> dict[str, Any]:
    """Precision and recall of the detections scoring at least ``threshold``, from COCOeval's matches.

    COCOeval matches detections greedily by descending score, so a detection's match depends only on
    the higher-scoring ones: matching everything above 0.05 matches those above ``threshold`` exactly as
    matching them alone would.
    """
    per: dict[str, dict[str, float | int | None]] = {}
    for cat_id in ev.params.catIds:
        tp = fp = objects = 0
        max_fp: float | None = None
        for e in ev.evalImgs:
            if e is None or e["category_id"] != cat_id:
                continue
            objects += int(np.count_nonzero(~np.asarray(e["gtIgnore"], bool)))
            scores = np.asarray(e["dtScores"], np.float64)
            matched = np.asarray(e["dtMatches"])[iou_index] > 0
            ignored = np.asarray(e["dtIgnore"])[iou_index].astype(bool)
            kept = (scores >= threshold) & ~ignored
            tp += int(np.count_nonzero(kept & matched))
            false = kept & ~matched
            fp += int(np.count_nonzero(false))
            if false.any():
                max_fp = max(max_fp or 0.0, float(scores[false].max()))
        per[names[cat_id]] = {
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / objects if objects else float("nan"),
            "tp": tp,
            "fp": fp,
            "max_fp_score": None if max_fp is None else round(max_fp, 4),
        }
    return {"score_threshold": threshold, "iou": 0.5, "per_class": per}


def evaluate_scenes(
    scenes: Sequence[Scene],
    runner: TileRunner,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    *,
    tile: int,
    overlap: int | None = None,
) -> dict[str, Any]:
    """Run :func:`detect_scene` over ``scenes`` and score them with :func:`coco_metrics`."""
    dets = [detect_scene(s.pixels, runner, score_threshold, tile=tile, overlap=overlap) for s in scenes]
    gt = coco_dataset((s, f"scene_{s.seed}.tif") for s in scenes)
    return coco_metrics(gt, coco_results(dets))


def onnx_model(path: Path, threads: int = 2) -> tuple[ModelContract, TileRunner]:
    """The contract an ONNX file meets (its input and output as the gateway would serve them) and a
    :data:`TileRunner` over an onnxruntime CPU session of it.

    Raises:
        ContractError: the file's tensors are off the contract (naming what is wrong).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def spec(t: Any) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else -1 for d in t.shape)
        return TensorSpec(t.name, ORT_DATATYPES.get(t.type, t.type), dims)

    contract = ModelContract.from_tensors(
        [spec(t) for t in sess.get_inputs()], [spec(t) for t in sess.get_outputs()], source=str(path)
    )
    outputs, name = [contract.output_name], contract.input_name

    def run(tiles: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = sess.run(outputs, {name: tiles})[0]
        return out

    return contract, run


def onnx_runner(path: Path, threads: int = 2) -> TileRunner:
    """A :data:`TileRunner` over an onnxruntime CPU session (see :func:`onnx_model`)."""
    return onnx_model(path, threads)[1]


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small plain-text table of the figures."""
    lines = [f"{'':12s} {'AP':>7s} {'AP50':>7s} {'AP75':>7s}"]
    lines.append(f"{'overall':12s} {metrics['AP']:7.4f} {metrics['AP50']:7.4f} {metrics['AP75']:7.4f}")
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:12s} {m['AP']:7.4f} {m['AP50']:7.4f} {m['AP75']:7.4f}")
    op = metrics.get("at_threshold")
    if op:
        lines.append(f"at score >= {op['score_threshold']:g}, IoU 0.5:")
        for name, m in op["per_class"].items():
            top = "-" if m["max_fp_score"] is None else f"{m['max_fp_score']:.2f}"
            lines.append(
                f"{name:12s} precision {m['precision']:.4f} recall {m['recall']:.4f} "
                f"(TP {m['tp']}, FP {m['fp']}, highest FP score {top})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=Path("model_repository/palm/1/model.onnx"))
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED, help="first held-out scene seed")
    parser.add_argument("--size", type=int, default=1024, help="scene width and height in pixels")
    parser.add_argument(
        "--coco",
        type=Path,
        help="score on this COCO ground truth instead of synthetic scenes (needs --images)",
    )
    parser.add_argument("--images", type=Path, help="folder holding the COCO file's images (by file_name)")
    parser.add_argument("--bands", help="source bands for R,G,B of the --coco images, e.g. 3,2,1")
    parser.add_argument(
        "--overlap", type=int, help="tile overlap in pixels (default: a quarter of the model's tile side)"
    )
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument(
        "--card", action="store_true", help="store the figures in the model card next to --onnx"
    )
    parser.add_argument(
        "--grey", action="store_true", help="score the grey (luma) version of each scene, as a 1-band sensor"
    )
    parser.add_argument(
        "--distractors", action="store_true", help="render the scenes with distractors (export.synth)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.coco is None) != (args.images is None):
        parser.error("--coco and --images go together")
    started = time.perf_counter()
    contract, runner = onnx_model(args.onnx, args.threads)
    overlap = choose_overlap(contract.tile_size, args.overlap)
    tiling = {"tile": contract.tile_size, "overlap": overlap, "merge": "gateway.pipeline.merge defaults"}
    protocol: dict[str, Any] = {"onnx": str(args.onnx)}
    if args.coco is not None:
        truth = json.loads(args.coco.read_text())
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
        try:
            metrics = evaluate_coco(
                truth, args.images, runner, contract, args.score_threshold, overlap=overlap, bands=bands
            )
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        protocol.update(coco=str(args.coco), images=len(truth["images"]), reader="gateway.pipeline.raster")
        count = len(truth["images"])
    else:
        seeds = range(args.seed, args.seed + args.scenes)
        try:
            check_heldout(seeds)
        except SeedOverlap as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        scenes = [render_scene(s, args.size, distractors=args.distractors) for s in seeds]
        if args.grey:
            scenes = [replace(s, pixels=to_grey(s.pixels)) for s in scenes]
        metrics = evaluate_scenes(
            scenes, runner, args.score_threshold, tile=contract.tile_size, overlap=overlap
        )
        protocol.update(
            scene_seeds=[seeds.start, seeds.stop - 1],
            scene_size=args.size,
            colour="grey (luma in all bands)" if args.grey else "rgb",
            distractors=args.distractors,
        )
        count = len(scenes)
    protocol.update(
        tiling=tiling,
        score_threshold=args.score_threshold,
        max_dets_per_image=MAX_DETS,
        iou_thresholds="0.50:0.05:0.95",
        operating_threshold=OPERATING_THRESHOLD,
    )
    metrics["protocol"] = protocol
    print(format_metrics(metrics))
    objects = sum(metrics["num_gt"].values())
    print(f"{count} images, {objects} objects, {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.card:
        from gateway.model_card import update_card

        card = args.onnx.with_name("model_card.json")
        section = "evaluation" + ("_distractors" if args.distractors else "") + ("_grey" if args.grey else "")
        update_card(card, **{section: metrics})
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

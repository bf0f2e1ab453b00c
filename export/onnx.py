"""ONNX export of PalmNet, torch-vs-onnxruntime parity, and the model card.

``python -m export.onnx --checkpoint runs/palmnet/checkpoint.pt`` writes ``runs/palmnet/model.onnx`` (one
file, opset 18, dynamic batch) and ``model_card.json`` next to it; ``--out
model_repository/palm/1/model.onnx`` replaces the served model. Batch norms are folded into the
convolutions before export so the ONNX initializers carry the torch ``state_dict`` names one-to-one;
the architecture config rides along as ONNX metadata, so :func:`load_torch_twin` can rebuild the exact
torch model behind any exported file.

Parity is measured as an order-insensitive distance between the two ``[K, 6]`` outputs of each tile:
``max_i min_j max_c |a_ic - b_jc|`` taken both ways, because two peaks whose scores differ by float
noise may swap places in the top-K order without changing the result; rows at a cut-off (score floor
or K-th score) are only required on both sides when they score clearly above it
(:func:`row_distance`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from export.model import (
    TILE,
    TOP_K,
    PalmNet,
    PalmNetConfig,
    conv_flops,
    fold_batchnorm,
    folded_skeleton,
)
from export.synth import GSD_RANGE, PALM_CATEGORIES
from gateway.pipeline.resolution import COARSER_FACTOR, GsdRange

log = logging.getLogger(__name__)

OPSET = 18
SERVED_ONNX = Path("model_repository/palm/1/model.onnx")
RANDOM_INIT_ONNX = Path("runs/random-init/model.onnx")
MODEL_NAME = "palm"
CONFIG_KEY = "palmnet_config"


def export_onnx(model: PalmNet, path: Path, opset: int = OPSET) -> Path:
    """Export ``model`` (batch norms folded) to a single ONNX file with a dynamic batch axis.

    Args:
        model: a trained or untrained PalmNet (left unchanged).
        path: where to write the ``.onnx`` file; parent folders are created.
        opset: ONNX opset, at least 17.

    Returns:
        ``path``.
    """
    folded = fold_batchnorm(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, TILE, TILE, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        folded,
        (example,),
        input_names=["images"],
        output_names=["detections"],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        external_data=False,
        verbose=False,
    )
    assert program is not None
    proto = program.model_proto
    proto.producer_name = "palm-serve export.onnx"
    meta = proto.metadata_props.add()
    meta.key = CONFIG_KEY
    meta.value = json.dumps(model.config.to_json(), sort_keys=True)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return path


def load_torch_twin(path: Path) -> PalmNet:
    """Rebuild the (batch-norm-folded, eval-mode) torch model that an exported ONNX file came from.

    Raises:
        ValueError: if the file lacks the PalmNet config metadata or its weights do not fit it.
    """
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in props:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata; not exported by export.onnx")
    model = folded_skeleton(PalmNetConfig.from_json(json.loads(props[CONFIG_KEY])))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    # The exporter's optimiser deduplicates identical initializers and drops all-zero biases, so a
    # bias is found through the Conv node that consumes the named weight, and a missing one is zero.
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[1].endswith(".weight") and node.input[1] in inits:
            bias_name = node.input[1][: -len("weight")] + "bias"
            if len(node.input) > 2 and node.input[2] in inits:
                inits.setdefault(bias_name, inits[node.input[2]])
            else:
                inits.setdefault(bias_name, torch.zeros(inits[node.input[1]].shape[0]))
    state = model.state_dict()
    missing = [k for k in state if k not in inits]
    if missing:
        raise ValueError(f"{path} lacks weights {missing[:5]}...")
    model.load_state_dict({k: inits[k] for k in state})
    return model.eval()


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def row_distance(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], margin: float = 1e-3) -> float:
    """Order-insensitive L-inf distance between two ``[K, 6]`` outputs (see the module docstring).

    Rows scoring within ``margin`` of a cut-off (the score floor, or the K-th score when all ``K`` rows
    are used) may legitimately be present on one side only, so only rows scoring above
    ``max(min positive score of a, of b) + margin`` must find a partner; partners are searched among
    all rows of the other side.
    """
    pos_a, pos_b = a[a[:, 4] > 0], b[b[:, 4] > 0]
    if len(pos_a) == 0 or len(pos_b) == 0:
        return 0.0 if len(pos_a) == len(pos_b) else float("inf")
    cut = max(float(pos_a[:, 4].min()), float(pos_b[:, 4].min())) + margin
    worst = 0.0
    for mine, theirs in ((pos_a, pos_b), (pos_b, pos_a)):
        sure = mine[mine[:, 4] > cut]
        if len(sure):
            d = np.abs(sure[:, None, :] - theirs[None, :, :]).max(axis=2)
            worst = max(worst, float(d.min(axis=1).max()))
    return worst


def parity(model: PalmNet, sess: ort.InferenceSession, tiles: npt.NDArray[np.uint8]) -> dict[str, float]:
    """Compare torch and onnxruntime on ``uint8`` tiles ``[N, 3, T, T]``.

    Returns:
        ``max_abs_diff_ordered`` (row by row) and ``max_abs_diff`` (order-insensitive, see module
        docstring) over all tiles.
    """
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(tiles)).numpy()
    out = sess.run(["detections"], {"images": tiles})[0]
    return {
        "max_abs_diff_ordered": float(np.abs(ref - out).max()),
        "max_abs_diff": max(row_distance(r, o) for r, o in zip(ref, out, strict=True)),
    }


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def contract(config: PalmNetConfig) -> dict[str, Any]:
    """The input/output contract that Triton and the gateway rely on."""
    return {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [-1, 3, TILE, TILE],
                "layout": "NCHW, RGB, 0..255; normalisation happens in the graph",
            }
        ],
        "outputs": [
            {
                "name": "detections",
                "datatype": "FP32",
                "shape": [-1, config.top_k, 6],
                "layout": "(x1, y1, x2, y2, score, class_id) in tile pixels, score-sorted descending; "
                f"rows scoring below {config.score_floor} are all-zero padding; class_id is the COCO "
                "category id as a float",
            }
        ],
        "top_k": config.top_k,
        "opset": OPSET,
        "dynamic_batch": True,
    }


def resolution(training: dict[str, Any] | None) -> dict[str, Any]:
    """The card's ``resolution`` section, which the gateway reads (:class:`GsdRange`).

    The range is the one the training scenes were rendered at: the training record's ``gsd_range``
    where it has one, else :data:`export.synth.GSD_RANGE`, which every training and validation scene
    draws its GSD from. Finer imagery is resampled to the range's finest GSD (the measurement behind
    that choice is in docs/model.md, "Resolution"), and imagery more than :data:`COARSER_FACTOR` times
    coarser than its coarsest is refused.
    """
    low, high = (float(v) for v in (training or {}).get("gsd_range", GSD_RANGE))
    card = GsdRange(low, high, resample_to_m=low, max_coarser_factor=COARSER_FACTOR).to_card()
    source = "training record" if training and "gsd_range" in training else "export.synth.GSD_RANGE"
    return {**card, "source": f"GSD of the training scenes ({source})"}


def write_card(
    onnx_path: Path,
    model: PalmNet,
    *,
    version: str,
    training: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    parity_figures: dict[str, Any] | None,
    throughput: dict[str, Any] | None = None,
    card_path: Path | None = None,
) -> Path:
    """Write ``model_card.json`` next to the ONNX file (or at ``card_path``) and return its path."""
    card: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": version,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "architecture": {
            "family": "PalmNet (CenterNet-style: heatmap + size + offset at stride 4, FPN neck)",
            "config": model.config.to_json(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_tile": round(conv_flops(model) / 1e9, 3),
            "gflop_counting": "2 x multiply-accumulates of every conv/linear layer, one 512x512 tile",
        },
        "contract": contract(model.config),
        "categories": [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in PALM_CATEGORIES
        ],
        "resolution": resolution(training),
        "training": training,
        "reproduce": reproduce(version, training),
        "limitations": [
            "Trained on synthetic scenes only (export.synth); accuracy on real imagery is unmeasured.",
            f"At most {model.config.top_k} detections per 512 px tile (a plantation at 7.5 m triangular "
            "spacing puts ~1,900 palms in a tile at 0.6 m GSD); the training and evaluation scenes keep "
            "plantation blocks under 400 palms per tile, so very dense coarse-GSD plantations are "
            "unmeasured.",
            "Objects up to ~110 px (buildings <= 110 px, palms 3-8 m at 0.3-0.6 m GSD).",
            "Grey (1-band) imagery: trained with 20% grey crops; buildings are found less well without "
            "their roof colours (evaluation_grey scores the luma of the same held-out scenes).",
        ],
        "evaluation": evaluation,
        "parity": parity_figures,
        "throughput": throughput,
    }
    out = card_path or onnx_path.with_name("model_card.json")
    out.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return out


def reproduce(version: str, training: dict[str, Any] | None) -> list[str]:
    """The commands that rebuild this model and its card: training (for a fine-tune, its base first,
    with the defaults, then the fine-tune with the flags it ran with), export, evaluation, baselines."""
    served = "model_repository/palm/1/model.onnx"
    if training and training.get("init"):
        from export.train import TrainConfig

        defaults = TrainConfig().to_json()
        changed = {
            key: value
            for key, value in training.items()
            if key in defaults and key not in ("init", "model") and value != defaults[key]
        }
        flags = " ".join(_flag(key, value) for key, value in changed.items())
        steps = [
            "python -m export.train --out runs/palmnet  # the base model: the defaults",
            "python -m export.onnx --checkpoint runs/palmnet/checkpoint.pt --out runs/palmnet/model.onnx"
            f"  # the base; the shipped run started from sha256 {training.get('init_sha256')}",
            f"python -m export.train --init runs/palmnet/model.onnx {flags} --out runs/palmnet-finetune",
            f"python -m export.onnx --checkpoint runs/palmnet-finetune/checkpoint.pt --out {served} "
            f"--version {version}",
        ]
    else:
        steps = [
            "python -m export.train --out runs/palmnet  # flags from training (defaults = shipped run)",
            "python -m export.onnx --checkpoint runs/palmnet/checkpoint.pt "
            f"--out {served} --version {version}",
        ]
    return [
        *steps,
        f"python -m export.evaluate --onnx {served} --scenes 40 --seed 1000000 --card",
        f"python -m export.evaluate --onnx {served} --scenes 40 --seed 1000000 --grey --card",
        f"python -m export.evaluate --onnx {served} --scenes 40 --seed 1000000 --distractors --card",
        "python -m export.baseline --scenes 40 --seed 1000000 --grey --card",
        "python -m export.domain --calibrate-scenes 150 --scenes 300 --card",
        "python -m export.bench --card",
    ]


def _flag(key: str, value: Any) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"--no-{key.replace('_', '-')}"
    return f"{name} {value}"


def load_checkpoint(path: Path) -> tuple[PalmNet, dict[str, Any]]:
    """Load a checkpoint written by ``export.train``: the model and its recorded training config."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = PalmNet(PalmNetConfig.from_json(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), dict(blob["train_config"])


def _parity_tiles(seed: int) -> npt.NDArray[np.uint8]:
    """Random noise tiles plus tiles cut from a rendered scene."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (2, 3, TILE, TILE), dtype=np.uint8)
    try:
        from export.synth import render_scene
    except ImportError:  # pragma: no cover - synth lands after the first export
        return noise
    scene = render_scene(seed, 1024)
    real = np.stack(
        [scene.pixels[:, y : y + TILE, x : x + TILE] for y, x in ((0, 0), (256, 512), (512, 128))]
    )
    return np.concatenate([noise, real]).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint from export.train")
    parser.add_argument("--random-init", action="store_true", help="export untrained weights (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init and parity tiles")
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the ONNX and its card (default: next to the checkpoint, or "
        f"{RANDOM_INIT_ONNX} with --random-init; {SERVED_ONNX} replaces the served model)",
    )
    parser.add_argument("--version", default="0.0.0-untrained")
    parser.add_argument("--evaluation", type=Path, help="JSON written by export.evaluate, for the card")
    parser.add_argument("--throughput", type=Path, help="JSON written by export.bench, for the card")
    parser.add_argument(
        "--top-k", type=int, default=TOP_K, help="detection rows per tile (decode only; weights unchanged)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    torch.set_num_threads(2)

    if args.checkpoint is not None:
        model, training = load_checkpoint(args.checkpoint)
    elif args.random_init:
        torch.manual_seed(args.seed)
        model, training = PalmNet().eval(), None
    else:
        parser.error("give --checkpoint CHECKPOINT (from export.train) or --random-init")
    if args.out is None:
        args.out = args.checkpoint.parent / "model.onnx" if args.checkpoint is not None else RANDOM_INIT_ONNX
    args.out.parent.mkdir(parents=True, exist_ok=True)

    if args.top_k != model.config.top_k:
        weights = model.state_dict()
        model = PalmNet(replace(model.config, top_k=args.top_k))
        model.load_state_dict(weights)
        model.eval()
    export_onnx(model, args.out)
    twin = load_torch_twin(args.out)
    sess = session(args.out)
    figures = parity(model, sess, _parity_tiles(args.seed))
    twin_figures = parity(twin, sess, _parity_tiles(args.seed + 1))
    figures["max_abs_diff_folded_twin"] = twin_figures["max_abs_diff"]
    print(f"torch vs onnxruntime max abs diff: {figures['max_abs_diff']:.3g} (order-insensitive)")
    print(f"torch vs onnxruntime max abs diff: {figures['max_abs_diff_ordered']:.3g} (row by row)")
    print(f"folded torch twin vs onnxruntime max abs diff: {twin_figures['max_abs_diff']:.3g}")
    evaluation = json.loads(args.evaluation.read_text()) if args.evaluation else None
    throughput = json.loads(args.throughput.read_text()) if args.throughput else None
    card = write_card(
        args.out,
        model,
        version=args.version,
        training=training,
        evaluation=evaluation,
        parity_figures=figures,
        throughput=throughput,
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, sha256 {sha256(args.out)[:16]}...)")
    print(f"wrote {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train PalmNet on synthetic scenes, deterministically, on a CPU.

``python -m export.train --out runs/palmnet`` renders a cached pool of training scenes (seeds
``data_seed .. data_seed + scenes - 1`` inside :data:`~export.synth.TRAIN_SEEDS`), samples random
``crop x crop`` windows with a random dihedral transform (rotation by k * 90 degrees, optional flip)
and a random photometric change (:func:`_photometric`: with probability ``grey_prob`` the crop becomes
grey, ``Y = 0.299 R + 0.587 G + 0.114 B`` in all three channels, as the gateway reads a 1-band image;
otherwise each channel is scaled by a factor in ``1 +- jitter``), and minimises the CenterNet
objective at stride ``S = 4``. With ``distractors`` the training scenes also carry the generator's
round non-palm objects (``render_scene(..., distractors=True)``: orchards, bushes, tanks, parasols,
roundabout islands) as hard negatives; their other content and ground truth are unchanged.

With ``init`` (an ONNX exported by ``export.onnx``) the run fine-tunes that model instead of starting
from random weights: :func:`~export.model.unfold_batchnorm` rebuilds it with identity batch norms, which
stay in eval mode throughout (their scale and shift still learn); the file's sha256 is recorded.

* heatmap: penalty-reduced focal loss (alpha 2, beta 4) against a Gaussian per object centred on the
  integer cell ``floor(c / S)`` of its box centre ``c``, with ``sigma = max(0.54 * size / (6 S), 0.5)``
  cells along each axis, normalised by the number of objects;
* size: L1 on ``log(w / S)`` and ``log(h / S)`` at each object's centre cell;
* offset: L1 on ``c / S - floor(c / S)`` at the centre cell;
* plus ``giou_weight`` times the GIoU loss of the decoded box at the centre cell.

Every ``eval_every`` steps the model is scored on validation scenes (seeds in
:data:`~export.synth.VAL_SEEDS`) through the gateway's tiling and merge, exactly like
``export.evaluate``. The run writes ``config.json`` (the exact configuration), ``log.jsonl`` (loss and
validation AP as it goes) and ``checkpoint.pt`` (weights, model config, training config) under
``--out``. Same config and thread count, same weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from export.evaluate import evaluate_scenes
from export.model import STRIDE, TILE, PalmNet, PalmNetConfig, conv_flops, freeze_batchnorm, unfold_batchnorm
from export.synth import TRAIN_SEEDS, VAL_SEEDS, Scene, render_scene, to_grey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run depends on (recorded verbatim in ``config.json`` and the model card)."""

    seed: int = 0
    data_seed: int = 0
    scenes: int = 400
    scene_size: int = 512
    val_seed: int = VAL_SEEDS.start
    val_scenes: int = 6
    val_size: int = 1024
    crop: int = 320
    batch: int = 12
    steps: int = 5000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 150
    giou_weight: float = 1.0
    grey_prob: float = 0.2
    jitter: float = 0.12
    distractors: bool = False
    init: str = ""
    eval_every: int = 500
    log_every: int = 50
    threads: int = 2
    render_workers: int = 2
    model: PalmNetConfig = field(default_factory=PalmNetConfig)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON view."""
        data = asdict(self)
        data["model"] = self.model.to_json()
        return data

    def check(self) -> None:
        """Refuse scene seeds outside the training / validation ranges of :mod:`export.synth`.

        Raises:
            ValueError: naming the offending range.
        """
        train = range(self.data_seed, self.data_seed + self.scenes)
        val = range(self.val_seed, self.val_seed + self.val_scenes)
        if train.start < TRAIN_SEEDS.start or train.stop > TRAIN_SEEDS.stop:
            raise ValueError(f"training scene seeds {train} must lie in {TRAIN_SEEDS}")
        if val.start < VAL_SEEDS.start or val.stop > VAL_SEEDS.stop:
            raise ValueError(f"validation scene seeds {val} must lie in {VAL_SEEDS}")


# ------------------------------------------------------------------------------------------- data


def render_pool(seeds: Sequence[int], size: int, workers: int, distractors: bool = False) -> list[Scene]:
    """Render scenes (in ``workers`` processes when > 1); the order follows ``seeds``."""
    render = functools.partial(render_scene, size=size, distractors=distractors)
    if workers <= 1:
        return [render(s) for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(render, seeds, chunksize=4))


def _dihedral(
    pixels: npt.NDArray[np.uint8], boxes: npt.NDArray[np.float32], k: int, flip: bool
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Rotate a ``[3, n, n]`` crop by ``k`` quarter turns (counter-clockwise) then mirror left-right."""
    n = pixels.shape[1]
    b = boxes.copy()
    for _ in range(k % 4):
        pixels = np.rot90(pixels, 1, axes=(1, 2))
        # (x, y) -> (y, n - x) for a counter-clockwise quarter turn of the array.
        b = np.stack([b[:, 1], n - b[:, 2], b[:, 3], n - b[:, 0]], axis=1)
    if flip:
        pixels = pixels[:, :, ::-1]
        b = np.stack([n - b[:, 2], b[:, 1], n - b[:, 0], b[:, 3]], axis=1)
    return np.ascontiguousarray(pixels), b.astype(np.float32)


def _photometric(
    rng: np.random.Generator, pixels: npt.NDArray[np.uint8], grey_prob: float, jitter: float
) -> npt.NDArray[np.uint8]:
    """Grey (probability ``grey_prob``) or per-channel gain jitter of a ``[3, n, n]`` crop."""
    if grey_prob > 0 and rng.random() < grey_prob:
        return to_grey(pixels)
    if jitter > 0:
        gain = rng.uniform(1 - jitter, 1 + jitter, size=(3, 1, 1)).astype(np.float32)
        jittered: npt.NDArray[np.uint8] = np.clip(np.rint(pixels * gain), 0, 255).astype(np.uint8)
        return jittered
    return pixels


@dataclass(frozen=True, slots=True)
class Batch:
    """A training batch: ``uint8`` crops and, per crop, boxes ``[M, 4]`` and class indices ``[M]``."""

    images: Tensor
    boxes: list[Tensor]
    classes: list[Tensor]


def sample_batch(
    rng: np.random.Generator,
    pool: Sequence[Scene],
    batch: int,
    crop: int,
    grey_prob: float = 0.0,
    jitter: float = 0.0,
) -> Batch:
    """Random crops with random dihedral and photometric transforms; boxes clipped to the crop.

    A box cut by the crop edge is kept (clipped) when at least 40% of its area stays inside, as the
    gateway's tiles also show cut objects at their edges; smaller slivers are dropped.
    """
    images = np.empty((batch, 3, crop, crop), np.uint8)
    boxes: list[Tensor] = []
    classes: list[Tensor] = []
    for i in range(batch):
        scene = pool[int(rng.integers(len(pool)))]
        x0 = int(rng.integers(0, scene.width - crop + 1))
        y0 = int(rng.integers(0, scene.height - crop + 1))
        pix = scene.pixels[:, y0 : y0 + crop, x0 : x0 + crop]
        b = scene.boxes - np.array([x0, y0, x0, y0], np.float32)
        clipped = np.clip(b, 0, crop)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (
            (kept_area >= 0.4 * area)
            & (clipped[:, 2] - clipped[:, 0] >= 2)
            & (clipped[:, 3] - clipped[:, 1] >= 2)
        )
        pix, bx = _dihedral(pix, clipped[keep], int(rng.integers(4)), bool(rng.integers(2)))
        images[i] = _photometric(rng, pix, grey_prob, jitter)
        boxes.append(torch.from_numpy(bx))
        classes.append(torch.from_numpy(scene.categories[keep].astype(np.int64) - 1))
    return Batch(torch.from_numpy(images), boxes, classes)


# ------------------------------------------------------------------------------------------- loss


@dataclass(frozen=True, slots=True)
class Targets:
    """Dense heatmap targets and, per object, its flat cell index and regression targets."""

    heat: Tensor  # [N, C, H, W]
    batch_index: Tensor  # [M]
    cell: Tensor  # [M] flat index y * W + x
    reg: Tensor  # [M, 4] log w, log h, offset x, offset y
    boxes: Tensor  # [M, 4] in input pixels


def build_targets(batch: Batch, num_classes: int, height: int, width: int) -> Targets:
    """CenterNet targets at stride ``S`` (formulas in the module docstring)."""
    n = len(batch.boxes)
    heat = torch.zeros(n, num_classes, height, width)
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    b_idx, cells, regs, boxes = [], [], [], []
    for i, (bx, cl) in enumerate(zip(batch.boxes, batch.classes, strict=True)):
        if bx.shape[0] == 0:
            continue
        w = (bx[:, 2] - bx[:, 0]).clamp(min=1.0)
        h = (bx[:, 3] - bx[:, 1]).clamp(min=1.0)
        cx = (bx[:, 0] + bx[:, 2]) / 2 / STRIDE
        cy = (bx[:, 1] + bx[:, 3]) / 2 / STRIDE
        ix = cx.floor().clamp(0, width - 1)
        iy = cy.floor().clamp(0, height - 1)
        sx = (0.54 * w / (6 * STRIDE)).clamp(min=0.5)
        sy = (0.54 * h / (6 * STRIDE)).clamp(min=0.5)
        gx = torch.exp(-((xs[None, :] - ix[:, None]) ** 2) / (2 * sx[:, None] ** 2))
        gy = torch.exp(-((ys[None, :] - iy[:, None]) ** 2) / (2 * sy[:, None] ** 2))
        g = gy[:, :, None] * gx[:, None, :]  # [M, H, W]
        for c in range(num_classes):
            sel = cl == c
            if bool(sel.any()):
                heat[i, c] = g[sel].amax(dim=0)
        b_idx.append(torch.full_like(cl, i))
        cells.append((iy * width + ix).long())
        regs.append(torch.stack([torch.log(w / STRIDE), torch.log(h / STRIDE), cx - ix, cy - iy], dim=1))
        boxes.append(bx)
    if not cells:
        empty = torch.zeros(0, dtype=torch.long)
        return Targets(heat, empty, empty, torch.zeros(0, 4), torch.zeros(0, 4))
    return Targets(heat, torch.cat(b_idx), torch.cat(cells), torch.cat(regs), torch.cat(boxes))


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, summed (normalise outside)."""
    pred = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = (1 - target) ** 4
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = torch.log(1 - pred) * pred**2 * neg_weight * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


def giou_loss(a: Tensor, b: Tensor) -> Tensor:
    """Mean ``1 - GIoU`` between matching rows of two ``[M, 4]`` box tensors."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    cw = torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])
    ch = torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    hull = cw * ch
    giou = inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)
    return (1 - giou).mean()


def losses(model: PalmNet, batch: Batch, giou_weight: float) -> dict[str, Tensor]:
    """The training objective's terms and their weighted ``total``."""
    logits, reg = model.raw(batch.images)
    n, c, h, w = logits.shape
    t = build_targets(batch, c, h, w)
    num = max(int(t.cell.numel()), 1)
    heat = focal_loss(logits, t.heat) / num
    if t.cell.numel() == 0:
        zero = reg.sum() * 0
        return {"total": heat + zero, "heat": heat, "size": zero, "offset": zero, "giou": zero}
    pred = reg.reshape(n, 4, h * w)[t.batch_index, :, t.cell]  # [M, 4]
    size = F.l1_loss(pred[:, :2], t.reg[:, :2])
    offset = F.l1_loss(pred[:, 2:], t.reg[:, 2:])
    cells_x = (t.cell % w).float()
    cells_y = torch.div(t.cell, w, rounding_mode="floor").float()
    half = torch.exp(pred[:, :2].clamp(max=6.0)) * STRIDE / 2
    cx = (cells_x + pred[:, 2]) * STRIDE
    cy = (cells_y + pred[:, 3]) * STRIDE
    decoded = torch.stack([cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], dim=1)
    giou = giou_loss(decoded, t.boxes)
    total = heat + size + offset + giou_weight * giou
    return {"total": total, "heat": heat, "size": size, "offset": offset, "giou": giou}


# ------------------------------------------------------------------------------------------- loop


def torch_runner(model: PalmNet) -> Any:
    """A tile runner over the torch model (eval mode, no grad) for validation."""

    def run(tiles: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            out: npt.NDArray[np.float32] = model(torch.from_numpy(tiles)).numpy()
        return out

    return run


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the scene renderers), all threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2% of ``lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: Path | None = None) -> tuple[PalmNet, list[dict[str, Any]]]:
    """Run one training; returns the trained model (eval mode) and the log records.

    Args:
        cfg: the configuration (checked with :meth:`TrainConfig.check`).
        out: folder for ``config.json``, ``log.jsonl`` and ``checkpoint.pt``; nothing is written if None.
    """
    cfg.check()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    logfile = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
        logfile = (out / "log.jsonl").open("w")

    def emit(record: dict[str, Any]) -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        record["cpu_s"] = round(cpu_seconds(), 1)
        records.append(record)
        if logfile is not None:
            logfile.write(json.dumps(record) + "\n")
            logfile.flush()

    pool = render_pool(
        range(cfg.data_seed, cfg.data_seed + cfg.scenes), cfg.scene_size, cfg.render_workers, cfg.distractors
    )
    val = (
        render_pool(range(cfg.val_seed, cfg.val_seed + cfg.val_scenes), cfg.val_size, cfg.render_workers)
        if cfg.val_scenes
        else []
    )
    log.info("rendered %d training and %d validation scenes in %.1f s", len(pool), len(val),
             time.perf_counter() - started)  # fmt: skip
    emit({"event": "data", "train_scenes": len(pool), "val_scenes": len(val)})

    init_sha256 = None
    if cfg.init:
        from export.onnx import load_torch_twin, sha256

        model = unfold_batchnorm(load_torch_twin(Path(cfg.init)))
        if model.config != cfg.model:
            raise ValueError(f"{cfg.init} is a {model.config}, not the configured {cfg.model}")
        init_sha256 = sha256(Path(cfg.init))
        log.info("fine-tuning %s (sha256 %s) with frozen batch-norm statistics", cfg.init, init_sha256)
    else:
        model = PalmNet(cfg.model)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    running: dict[str, float] = {}
    for step in range(cfg.steps):
        model.train()
        if cfg.init:
            freeze_batchnorm(model)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = sample_batch(rng, pool, cfg.batch, cfg.crop, cfg.grey_prob, cfg.jitter)
        terms = losses(model, batch, cfg.giou_weight)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % cfg.log_every == 0 or step == 0:
            count = 1 if step == 0 else cfg.log_every
            rec = {
                "step": step + 1,
                "lr": lr_at(step, cfg),
                **{k: round(v / count, 4) for k, v in running.items()},
            }
            emit(rec)
            log.info("step %d loss %.4f (heat %.4f size %.4f offset %.4f giou %.4f) %.0f s", step + 1,
                     rec["total"], rec["heat"], rec["size"], rec["offset"], rec["giou"],
                     time.perf_counter() - started)  # fmt: skip
            running = {}
        if val and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            metrics = evaluate_scenes(val, torch_runner(model), tile=TILE)
            emit({"step": step + 1, "val": metrics})
            per = metrics["per_class"]
            log.info("step %d validation AP %.4f AP50 %.4f AP75 %.4f | palm AP50 %.4f building AP50 %.4f",
                     step + 1, metrics["AP"], metrics["AP50"], metrics["AP75"],
                     per["palm_tree"]["AP50"], per["building"]["AP50"])  # fmt: skip
    model.eval()
    wall = time.perf_counter() - started
    emit({"event": "done", "wall_s": round(wall, 1)})
    if out is not None:
        assert logfile is not None
        logfile.close()
        torch.save(
            {
                "state_dict": model.state_dict(),
                "model_config": cfg.model.to_json(),
                "train_config": {
                    **cfg.to_json(),
                    "wall_s": round(wall, 1),
                    "cpu_s": round(cpu_seconds(), 1),
                    "train_scene_seeds": [cfg.data_seed, cfg.data_seed + cfg.scenes - 1],
                    "val_scene_seeds": [cfg.val_seed, cfg.val_seed + cfg.val_scenes - 1],
                    "init_sha256": init_sha256,
                    "final_val": next((r["val"] for r in reversed(records) if "val" in r), None),
                    "torch": str(torch.__version__),
                    "gflop_per_tile": round(conv_flops(model) / 1e9, 3),
                },
            },
            out / "checkpoint.pt",
        )
    return model, records


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; every :class:`TrainConfig` field is a ``--flag``."""
    parser = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/palmnet"))
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if name == "model":
            continue
        if isinstance(value, bool):
            parser.add_argument(
                f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value
            )
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = {k: getattr(args, k) for k in asdict(defaults) if k != "model"}
    cfg = replace(defaults, **overrides)
    try:
        cfg.check()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("config %s (pid %d)", json.dumps(cfg.to_json()), os.getpid())
    train(cfg, args.out)
    print(f"wrote {args.out / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

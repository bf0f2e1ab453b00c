"""Throughput of the exported model with onnxruntime on this machine's CPU.

``python -m export.bench [--onnx PATH] [--batches 1 8] [--seconds 10] [--threads 2]`` prints tiles/s per
batch size (median of timed runs after warm-up, on tiles cut from a synthetic scene) and the GFLOP per
512x512 tile (2 x conv/linear multiply-accumulates of the torch twin rebuilt from the ONNX).
``--json OUT`` writes the figures; ``--card`` also stores them as the model card's ``throughput``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.model import TILE, conv_flops
from export.onnx import load_torch_twin, session
from export.synth import HELDOUT_MIN_SEED, render_scene
from gateway.model_card import update_card


def bench_tiles(seed: int = HELDOUT_MIN_SEED) -> npt.NDArray[np.uint8]:
    """Sixteen realistic 512x512 tiles (a 2048 px scene cut in a 4x4 grid)."""
    scene = render_scene(seed, 4 * TILE)
    return np.stack(
        [
            scene.pixels[:, y : y + TILE, x : x + TILE]
            for y in range(0, 4 * TILE, TILE)
            for x in range(0, 4 * TILE, TILE)
        ]
    )


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), else the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(onnx_path: Path, batches: Sequence[int], seconds: float, threads: int) -> dict[str, Any]:
    """Tiles/s per batch size; each batch size runs for about ``seconds`` after two warm-up calls."""
    sess = session(onnx_path, threads)
    pool = bench_tiles()
    out: dict[str, Any] = {}
    for b in batches:
        tiles = np.ascontiguousarray(np.resize(pool, (b, *pool.shape[1:])))
        for _ in range(2):
            sess.run(["detections"], {"images": tiles})
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            sess.run(["detections"], {"images": tiles})
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[str(b)] = {
            "tiles_per_s": round(b / med, 2),
            "ms_per_batch": round(med * 1e3, 2),
            "runs": len(times),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=Path("model_repository/palm/1/model.onnx"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--card", action="store_true", help="store the figures in the model card")
    args = parser.parse_args(argv)

    gflop = conv_flops(load_torch_twin(args.onnx)) / 1e9
    figures = measure(args.onnx, args.batches, args.seconds, args.threads)
    print(f"GFLOP per 512x512 tile: {gflop:.3f}")
    for b, f in figures.items():
        print(f"batch {b:>3s}: {f['tiles_per_s']:8.2f} tiles/s  ({f['ms_per_batch']:.1f} ms per batch)")
    result = {
        "onnxruntime_cpu": {
            "by_batch": figures,
            "threads": args.threads,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "command": "python -m export.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "gflop_per_tile": round(gflop, 3),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.card:
        card = args.onnx.with_name("model_card.json")
        current = json.loads(card.read_text()).get("throughput") or {}
        current.update(result)
        update_card(card, throughput=current)
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

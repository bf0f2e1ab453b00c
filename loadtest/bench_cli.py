"""How long ``palm-serve predict`` takes for one 512x512 tile, start to exit, against doing it by hand.

Both sides run as fresh processes, timed from spawn to exit, alternating so that the machine's drift
hits both alike:

1. ``palm-serve predict tile.tif`` (embedded ``tritonserver`` started and stopped, one decode worker,
   the seam merge, georeferencing and a JSON file written);
2. a script a user would write instead: import rasterio and onnxruntime, read the tile, run the model
   once in-process, print the box count (no server, no isolation).

Run: ``python -m loadtest.bench_cli [--runs 7]``; prints each run and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export.synth import render_scene, write_geotiff
from gateway.settings import REPO_ROOT

MODEL = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"
BY_HAND = """
import sys
import numpy as np, onnxruntime as ort, rasterio
with rasterio.open(sys.argv[1]) as src:
    tile = src.read()[None]
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
(rows,) = session.run(["detections"], {"images": np.ascontiguousarray(tile)})
print(int((rows[0, :, 4] >= 0.3).sum()))
"""


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        tile = write_geotiff(render_scene(1_000_321, size=512), work / "tile.tif")
        env = {**os.environ, "PALM_DATA_DIR": str(work / "state")}
        env.pop("PALM_TRITON_URL", None)
        cli = [
            sys.executable,
            "-m",
            "gateway.cli",
            "predict",
            str(tile),
            "--out",
            str(work / "out"),
            "--no-progress",
        ]
        by_hand = [sys.executable, "-c", BY_HAND, str(tile), str(MODEL)]
        timed(cli, env)  # warm the page cache and the python backend's links
        ours: list[float] = []
        theirs: list[float] = []
        for run in range(args.runs):
            ours.append(timed(cli, env))
            theirs.append(timed(by_hand, env))
            print(
                f"run {run + 1}: palm-serve predict {ours[-1]:.2f} s, by hand {theirs[-1]:.2f} s", flush=True
            )
    mine, baseline = statistics.median(ours), statistics.median(theirs)
    print(
        f"\nmedian of {args.runs}: palm-serve predict {mine:.2f} s (min {min(ours):.2f}), "
        f"rasterio + onnxruntime by hand {baseline:.2f} s (min {min(theirs):.2f}); "
        f"ratio {mine / baseline:.1f}x"
    )


if __name__ == "__main__":
    main()

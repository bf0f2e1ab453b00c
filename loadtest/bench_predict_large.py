"""``palm-serve predict`` on a 20,000 x 20,000 RGB GeoTIFF: wall time and peak RSS of every process.

For a DEFLATE-tiled and a striped variant (generated once and cached by ``loadtest.bench_raster``), runs
the real command line (embedded Triton, decode workers, merge, COCO output) as a subprocess, samples
``/proc/<pid>/status`` of the whole process tree every 100 ms, and prints per process its peak RSS
(``VmHWM``) and CPU seconds, then end-to-end tiles/s and the decode-only tiles/s of the same file
through the same decode pool, so the two compare on one machine in one run.

Targets (issue 4): peak RSS on the gateway side (the ``palm-serve`` process and its decode workers)
under 1 GiB whatever the image size; decode at least 5x faster than the model.

Run: ``python -m loadtest.bench_predict_large [--size 20000] [--cache DIR] [--only tiled|striped]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway import procfs
from gateway.decode import DecodePool
from gateway.pipeline.tiling import tile_count
from gateway.settings import DecodeSettings, LimitSettings
from loadtest.bench_raster import decode, large_profile

PAGE = 1024


@dataclass
class ProcessPeak:
    pid: int
    name: str
    peak_kib: int = 0
    cpu_s: float = 0.0
    role: str = ""
    seen: list[int] = field(default_factory=list)


def sample(pid: int, peaks: dict[int, ProcessPeak]) -> None:
    status, cpu_s, cmdline = procfs.status(pid), procfs.cpu_seconds(pid), procfs.command_line(pid)
    if status is None or cpu_s is None or cmdline is None:
        return
    peak = peaks.get(pid)
    if peak is None:
        peak = peaks[pid] = ProcessPeak(pid, status.get("Name", "?"), role=role_of(cmdline))
    peak.peak_kib = max(peak.peak_kib, int(status.get("VmHWM", "0 kB").split()[0]))
    peak.cpu_s = cpu_s


def role_of(cmdline: str) -> str:
    if "gateway.decode.worker" in cmdline:
        return "decode worker (gateway side)"
    if "gateway.cli" in cmdline or "palm-serve" in cmdline:
        return "palm-serve predict (gateway side)"
    if "tritonserver" in cmdline:
        return "tritonserver (inference side)"
    if "triton_python_backend_stub" in cmdline:
        return "python backend stub: onnxruntime (inference side)"
    return cmdline[:60]


def run_predict(path: Path, out: Path, work: Path) -> tuple[float, dict[int, ProcessPeak], int]:
    env = {**os.environ, "PALM_DATA_DIR": str(work / "var"), "PALM_LOG_LEVEL": "WARNING"}
    env.pop("PALM_TRITON_URL", None)
    env.pop("PALM_TRITON__URL", None)
    command = [sys.executable, "-m", "gateway.cli", "predict", str(path), "--out", str(out), "--no-progress"]
    peaks: dict[int, ProcessPeak] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env)
    while proc.poll() is None:
        for pid in [proc.pid, *procfs.descendants(proc.pid)]:
            sample(pid, peaks)
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    return elapsed, peaks, proc.returncode


def write_mosaic(path: Path, side: int, *, tiled: bool, scene_size: int = 2048) -> None:
    """A ``side``-pixel GeoTIFF tiled from four rendered synthetic scenes, so the model finds real palms
    and buildings everywhere (hundreds of thousands of detections on 20,000 px) and the merge and the
    output are exercised at scale. Written one band of scenes at a time (bounded memory)."""
    import numpy as np
    import rasterio

    from export.synth import render_scene

    scenes = [render_scene(424_242 + i, size=scene_size, gsd=0.4).pixels for i in range(4)]
    profile = large_profile(side, tiled=tiled, gsd=0.4)
    with rasterio.open(path, "w", **profile) as dst:
        for row, y in enumerate(range(0, side, scene_size)):
            height = min(scene_size, side - y)
            band = np.empty((3, height, side), np.uint8)
            for col, x in enumerate(range(0, side, scene_size)):
                width = min(scene_size, side - x)
                band[:, :, x : x + width] = scenes[(row * 3 + col) % 4][:, :height, :width]
            dst.write(band, window=rasterio.windows.Window(0, y, side, height))


async def decode_only(path: Path, batch: int) -> float:
    async with DecodePool(DecodeSettings(workers=1), LimitSettings(), tile_size=512) as pool:
        tiles, seconds = await decode(pool, path, batch)
    return tiles / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "palm-serve-bench-raster")
    parser.add_argument("--only", choices=["tiled", "striped"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {}
    tiles = tile_count(args.size, args.size, 512, 128)
    for layout in ("tiled", "striped"):
        if args.only and layout != args.only:
            continue
        path = args.cache / f"palms_{args.size}_{layout}.tif"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_mosaic(path, args.size, tiled=layout == "tiled")
        work = Path(tempfile.mkdtemp(prefix="palm-bench-large-"))
        elapsed, peaks, code = run_predict(path, work / "out", work)
        rate = tiles / elapsed
        decode_rate = asyncio.run(decode_only(path, 8))
        print(
            f"\n{layout}: {args.size}x{args.size}, {tiles} tiles, {path.stat().st_size / 1e6:.0f} MB on disk"
        )
        print(
            f"  palm-serve predict: exit {code}, {elapsed:.1f} s wall (Triton start included), "
            f"{rate:.1f} tiles/s"
        )
        print(
            f"  decode only (one worker): {decode_rate:.0f} tiles/s = "
            f"{decode_rate / rate:.1f}x the end-to-end rate"
        )
        print(f"  {'pid':>7}  {'peak RSS':>10}  {'CPU s':>7}  process")
        gateway_side = 0
        for peak in sorted(peaks.values(), key=lambda p: -p.peak_kib):
            if peak.peak_kib == 0:
                continue
            print(f"  {peak.pid:>7}  {peak.peak_kib / 1024:>7.0f} MiB  {peak.cpu_s:>7.1f}  {peak.role}")
            if "gateway side" in peak.role:
                gateway_side += peak.peak_kib
        print(f"  gateway side, sum of peaks: {gateway_side / 1024:.0f} MiB (target < 1024 MiB)")
        figures[layout] = {
            "wall_s": elapsed,
            "tiles": tiles,
            "tiles_per_s": rate,
            "decode_only_tiles_per_s": decode_rate,
            "gateway_side_peak_mib": gateway_side / 1024,
            "processes": {f"{p.role} [{p.pid}]": p.peak_kib / 1024 for p in peaks.values() if p.peak_kib},
            "exit_code": code,
        }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

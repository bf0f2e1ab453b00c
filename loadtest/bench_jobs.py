"""Bulk jobs on this machine, in one run, against baselines measured in the same run.

1. **Throughput**: tiles/s of a job of ``--scenes`` generated 4096x4096 GeoTIFFs (8 by default, 121
   tiles each), from the job's start to its end as the service reports them, against
   * the in-process onnxruntime ceiling on pre-decoded tiles that ``bench_serving`` measures (batch 4,
     the better of its two layouts of the cores, measured before and after; the higher is used), and
   * a naive loop a user might write: rasterio reads each 512x512 window, onnxruntime runs it alone
     (batch 1, all cores), boxes above the threshold are kept and merged by NMS.
   Targets: >= 0.80x the ceiling, >= 2x the naive loop.
2. **Upload**: seconds until ``POST /v1/jobs`` with 1,000 files (512x512 GeoTIFFs) answers 202, and
   the gateway process's peak RSS meanwhile (sampled every 20 ms). Targets: < 30 s, < 300 MiB.
3. **Online latency under a job**: p50 of one 512x512 ``/v1/predict`` while that 1,000-file job runs,
   against the same calls on the idle service. Target: < 2x.

The service is ``palm-serve serve`` with its embedded Triton (CPU config), started by this script.
Run: ``python -m loadtest.bench_jobs [--scenes 8] [--files 1000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import rasterio
from rasterio.windows import Window

from export.synth import render_scene, write_geotiff
from gateway import procfs
from gateway.pipeline.merge import merge_tiles
from gateway.pipeline.tiling import tile_grid
from loadtest.bench_serving import MODEL, ceiling, free_port, scene_tiles

SCORE_THRESHOLD = 0.3


def start_service(data_dir: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PALM_DATA_DIR": str(data_dir),
        "PALM_PORT": str(port),
        "PALM_LOG_LEVEL": "WARNING",
        **extra,
    }
    env.pop("PALM_TRITON_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not get ready")


def naive_loop(path: Path) -> float:
    """Tiles/s of read window → onnxruntime batch 1 → NMS, over one scene."""
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    with rasterio.open(path) as src:
        specs = tile_grid(src.width, src.height, 512, 128)
        outputs = []
        for spec in specs:
            tile = src.read(window=Window(spec.x, spec.y, 512, 512), boundless=True)
            (rows,) = session.run(["detections"], {"images": np.ascontiguousarray(tile[None])})
            outputs.append((spec, rows[0], None))
        merge_tiles(outputs, SCORE_THRESHOLD)
    return len(specs) / (time.perf_counter() - started)


def peak_rss(pid: int, stop: threading.Event, into: list[int]) -> None:
    while not stop.is_set():
        fields = procfs.status(pid)
        if fields is not None:
            into.append(int(fields["VmRSS"].split()[0]) * 1024)
        time.sleep(0.02)


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") and job["results"]["ready"]:
            return dict(job)
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not end")


def parse_time(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def latencies(client: httpx.Client, tile: bytes, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        response = client.post("/v1/predict", files={"file": ("tile.tif", tile, "image/tiff")})
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--ceiling-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--set", action="append", default=[], metavar="PALM_X=V", help="a setting for the service, repeatable"
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    figures: dict[str, Any] = {"settings": extra}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        print("generating scenes ...", flush=True)
        scenes = [
            write_geotiff(render_scene(1_000_900 + i, size=4096), work / f"scene{i}.tif")
            for i in range(args.scenes)
        ]
        chips = [
            write_geotiff(render_scene(1_001_000 + i, size=512), work / f"chip{i}.tif") for i in range(50)
        ]
        chip_bytes = [p.read_bytes() for p in chips]
        tiles = scene_tiles(render_scene(1_000_900, size=1024).pixels)

        before = ceiling(tiles, 4, args.ceiling_seconds)
        naive = naive_loop(scenes[0])
        print(f"ceiling before: {before}; naive loop: {naive:.1f} tiles/s", flush=True)

        process, url = start_service(work / "state", extra)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                idle = latencies(client, chip_bytes[0], 30)

                files = [("files", (p.name, p.read_bytes(), "image/tiff")) for p in scenes]
                submitted = time.perf_counter()
                job_id = client.post("/v1/jobs", files=files).json()["id"]
                job = wait_job(client, job_id)
                wall = time.perf_counter() - submitted
                span = parse_time(job["finished_at"]) - parse_time(job["started_at"])
                job_rate = job["progress"]["tiles_done"] / span
                figures["job"] = {
                    "tiles": job["progress"]["tiles_done"],
                    "seconds_start_to_end": round(span, 2),
                    "seconds_submit_to_results": round(wall, 2),
                    "tiles_per_second": round(job_rate, 1),
                }
                print(f"job of {args.scenes} scenes: {figures['job']}", flush=True)

                many = [
                    ("files", (f"chip{i:04d}.tif", chip_bytes[i % len(chip_bytes)], "image/tiff"))
                    for i in range(args.files)
                ]
                samples: list[int] = []
                stop = threading.Event()
                sampler = threading.Thread(target=peak_rss, args=(process.pid, stop, samples))
                baseline_rss = (
                    int((procfs.status(process.pid) or {"VmRSS": "0 kB"})["VmRSS"].split()[0]) * 1024
                )
                sampler.start()
                started = time.perf_counter()
                created = client.post("/v1/jobs", files=many)
                accept = time.perf_counter() - started
                stop.set()
                sampler.join()
                assert created.status_code == 202, created.text
                big_id = created.json()["id"]
                figures["upload"] = {
                    "files": args.files,
                    "bytes": sum(len(f[1][1]) for f in many),
                    "seconds_to_202": round(accept, 2),
                    "gateway_rss_before_mib": round(baseline_rss / 2**20, 1),
                    "gateway_peak_rss_mib": round(max(samples) / 2**20, 1),
                }
                print(f"upload: {figures['upload']}", flush=True)

                time.sleep(2)  # the job is under way
                busy = latencies(client, chip_bytes[1], 30)
                still_running = client.get(f"/v1/jobs/{big_id}").json()["status"] == "running"
                figures["latency"] = {
                    "idle_p50_ms": round(statistics.median(idle) * 1000, 1),
                    "under_job_p50_ms": round(statistics.median(busy) * 1000, 1),
                    "ratio": round(statistics.median(busy) / statistics.median(idle), 2),
                    "job_still_running_after": still_running,
                }
                print(f"online latency: {figures['latency']}", flush=True)
                client.post(f"/v1/jobs/{big_id}/cancel")
        finally:
            process.terminate()
            process.wait(60)
        after = ceiling(tiles, 4, args.ceiling_seconds)
    best = max(max(before.values()), max(after.values()))
    figures["ceiling"] = {"before": before, "after": after, "best": round(best, 1)}
    figures["naive_loop_tiles_per_second"] = round(naive, 1)
    rate = figures["job"]["tiles_per_second"]
    print(f"\nceiling (best of before/after, both layouts): {best:.1f} tiles/s")
    print(f"naive loop (rasterio window, onnxruntime batch 1, NMS): {naive:.1f} tiles/s")
    print(
        f"job: {rate:.1f} tiles/s = {rate / best:.2f}x the ceiling (target >= 0.80), "
        f"{rate / naive:.2f}x the naive loop (target >= 2)"
    )
    upload = figures["upload"]
    print(
        f"upload of {args.files} files: {upload['seconds_to_202']} s (target < 30), "
        f"gateway peak RSS {upload['gateway_peak_rss_mib']} MiB (target < 300)"
    )
    print(f"/v1/predict p50 under a job: {figures['latency']['ratio']}x idle (target < 2)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Serving benchmark: how close the gateway gets to the hardware's ceiling, in one run on this machine.

Prints, for the shipped ONNX on this CPU:

1. the ceiling: onnxruntime in-process, batch 8, all cores (no serialisation, no decode);
2. Triton over gRPC from Python (embedded ``tritonserver``, CPU config), batch 8, 2 requests in flight;
3. ``/v1/predict`` end to end for a 2048x2048 GeoTIFF (upload, decode, 25 tiles, merge, georeference),
   counting the tiles the gateway cut, sequential requests; also with 2 concurrent clients;
4. p50/p99 latency of ``/v1/predict`` with one 512x512 tile against a direct Triton call of one tile.

Targets (issue 3): (3) reaches at least 0.85x of (1) in tiles/s; (4) adds under 10 ms at p50.

The gateway runs as its own process (``palm-serve serve`` with ``PALM_TRITON_URL`` set), as deployed.
Run: ``python -m loadtest.bench_serving [--seconds 20] [--json out.json]``.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from export.synth import render_scene, write_geotiff
from gateway.pipeline.tiling import tile_grid
from gateway.settings import REPO_ROOT, TritonSettings
from gateway.triton.client import TritonClient
from gateway.triton.launcher import EmbeddedTriton

MODEL = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed_loop(step: Callable[[], int], seconds: float, warmup: int = 2) -> tuple[float, int]:
    """Run ``step`` (returns items done) repeatedly for ``seconds``; returns (items/s, calls)."""
    for _ in range(warmup):
        step()
    done = calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
        calls += 1
    return done / (time.perf_counter() - start), calls


def scene_tiles(pixels: np.ndarray) -> np.ndarray:
    specs = tile_grid(pixels.shape[2], pixels.shape[1])
    return np.ascontiguousarray(np.stack([pixels[:, s.y : s.y + 512, s.x : s.x + 512] for s in specs]))


def ceiling(tiles: np.ndarray, batch: int, seconds: float) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(np.resize(tiles, (batch, *tiles.shape[1:])))

    def step() -> int:
        session.run(["detections"], {"images": feed})
        return batch

    rate, _ = timed_loop(step, seconds)
    return rate


async def triton_throughput(url: str, tiles: np.ndarray, batch: int, inflight: int, seconds: float) -> float:
    feed = np.ascontiguousarray(np.resize(tiles, (batch, *tiles.shape[1:])))
    async with TritonClient(url, TritonSettings(request_timeout_s=120)) as client:
        for _ in range(2):
            await client.infer(feed)
        done = 0
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() - start < seconds:
                await client.infer(feed)
                done += batch

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return done / (time.perf_counter() - start)


async def triton_latency(url: str, tile: np.ndarray, calls: int) -> list[float]:
    async with TritonClient(url, TritonSettings(request_timeout_s=60)) as client:
        one = np.ascontiguousarray(tile[None])
        for _ in range(3):
            await client.infer(one)
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            await client.infer(one)
            latencies.append(time.perf_counter() - start)
        return latencies


def start_gateway(triton_url: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PALM_TRITON_URL": triton_url,
        "PALM_DATA_DIR": str(data_dir),
        "PALM_PORT": str(port),
        "PALM_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited during startup")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the gateway did not become ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def predict_loop(
    base: str, path: Path, tiles_per_call: int, seconds: float, clients: int
) -> tuple[float, int]:
    data = path.read_bytes()

    def one(client: httpx.Client) -> int:
        response = client.post("/v1/predict", files={"file": (path.name, data, "image/tiff")})
        response.raise_for_status()
        return tiles_per_call

    with httpx.Client(base_url=base, timeout=300) as warm:
        one(warm)
        one(warm)
    start = time.perf_counter()
    counts = [0] * clients

    def worker(i: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as client:
            while time.perf_counter() - start < seconds:
                counts[i] += one(client)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, sum(counts) // tiles_per_call


def predict_latency(base: str, path: Path, calls: int) -> list[float]:
    data = path.read_bytes()
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(3):
            client.post("/v1/predict", files={"file": (path.name, data, "image/tiff")}).raise_for_status()
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            client.post("/v1/predict", files={"file": (path.name, data, "image/tiff")}).raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each throughput run")
    parser.add_argument("--latency-calls", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="palm-bench-"))
    big = write_geotiff(render_scene(123_456, size=2048, gsd=0.4), work / "scene2048.tif")
    small_scene = render_scene(123_457, size=512, gsd=0.4)
    small = write_geotiff(small_scene, work / "tile512.tif")
    import rasterio

    with rasterio.open(big) as src:
        pixels = src.read()
    tiles = scene_tiles(pixels)
    per_scene = len(tiles)
    print(
        f"cpu cores: {len(os.sched_getaffinity(0))}; model: {MODEL.name}; 2048x2048 scene = {per_scene} tiles"
    )

    figures: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "tiles_per_2048_scene": per_scene}
    figures["ceiling_tiles_per_s"] = ceiling(tiles, args.batch, args.seconds)
    print(
        f"1. onnxruntime in-process, batch {args.batch}:      {figures['ceiling_tiles_per_s']:7.1f} tiles/s"
    )

    settings = TritonSettings(model_config_name="cpu", ready_timeout_s=120, request_timeout_s=120)
    with EmbeddedTriton(settings, work / "triton") as triton:
        url = triton.grpc_url
        figures["triton_grpc_tiles_per_s"] = asyncio.run(
            triton_throughput(url, tiles, args.batch, 2, args.seconds)
        )
        print(
            f"2. Triton gRPC, batch {args.batch}, 2 in flight:     "
            f"{figures['triton_grpc_tiles_per_s']:7.1f} tiles/s"
        )

        port = free_port()
        gateway = start_gateway(url, work / "gateway", port)
        base = f"http://127.0.0.1:{port}"
        try:
            rate, calls = predict_loop(base, big, per_scene, args.seconds, clients=1)
            figures["predict_2048_tiles_per_s"] = rate
            print(f"3. /v1/predict 2048x2048, 1 client:       {rate:7.1f} tiles/s ({calls} requests)")
            rate2, calls2 = predict_loop(base, big, per_scene, args.seconds, clients=2)
            figures["predict_2048_tiles_per_s_2_clients"] = rate2
            print(f"   /v1/predict 2048x2048, 2 clients:      {rate2:7.1f} tiles/s ({calls2} requests)")

            direct = asyncio.run(triton_latency(url, scene_tiles(small_scene.pixels)[0], args.latency_calls))
            http = predict_latency(base, small, args.latency_calls)
        finally:
            gateway.terminate()
            gateway.wait(30)
    figures["triton_1tile_p50_ms"] = percentile(direct, 50) * 1000
    figures["triton_1tile_p99_ms"] = percentile(direct, 99) * 1000
    figures["predict_1tile_p50_ms"] = percentile(http, 50) * 1000
    figures["predict_1tile_p99_ms"] = percentile(http, 99) * 1000
    figures["gateway_ratio"] = figures["predict_2048_tiles_per_s"] / figures["ceiling_tiles_per_s"]
    figures["gateway_added_p50_ms"] = figures["predict_1tile_p50_ms"] - figures["triton_1tile_p50_ms"]
    print(
        f"4. one 512x512 tile, p50/p99: Triton direct {figures['triton_1tile_p50_ms']:.1f}/"
        f"{figures['triton_1tile_p99_ms']:.1f} ms, /v1/predict {figures['predict_1tile_p50_ms']:.1f}/"
        f"{figures['predict_1tile_p99_ms']:.1f} ms"
    )
    print(
        f"gateway / ceiling = {figures['gateway_ratio']:.2f} (target >= 0.85); "
        f"gateway adds {figures['gateway_added_p50_ms']:.1f} ms at p50 (target < 10)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: how close the gateway gets to the hardware's ceiling, in one run on this machine.

Prints, for the shipped ONNX on this CPU:

1. the ceiling: onnxruntime in-process on pre-decoded tiles, batch 4, in both layouts of the cores
   (one session using all of them; one single-threaded session per core, each driven by its own
   thread), measured before and after everything else; the best layout's higher figure is used;
2. the ceiling of the whole job without serving: each core's thread decodes the same GeoTIFF
   in-process (``open_raster``, no isolation) and feeds its own single-threaded session;
3. Triton over gRPC from Python (embedded ``tritonserver``, CPU config), batch 4, 2 requests in flight,
   with the tiles in the request and with the tiles in a shared-memory region the server reads;
4. ``/v1/predict`` end to end for a 2048x2048 GeoTIFF (upload, isolated decode, 25 tiles, seam merge,
   georeferencing, JSON), counting the tiles the gateway cut, 1 sequential client and 2 concurrent
   ones, with the CPU seconds per tile of every process and the system-wide idle share;
5. p50/p99 latency of ``/v1/predict`` with one 512x512 GeoTIFF against a direct Triton call of the
   same tile, with the p50 of each stage from the ``Server-Timing`` header.

Targets (issue 3): (4) reaches at least 0.85x of (1) in tiles/s; (5) adds under 10 ms at p50.

The gateway runs as its own process (``palm-serve serve`` with ``PALM_TRITON_URL`` set), as deployed.
The clients post a multipart body encoded once over keep-alive connections (:class:`Uploader`).
The scene is DEFLATE-compressed like most GeoTIFFs; ``--compress zstd|none`` rewrites it, to show what
decompression costs the gateway path on a machine where decoding and the model share the cores.
Run: ``python -m loadtest.bench_serving [--seconds 20] [--compress deflate] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import socket
import statistics
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
from gateway import procfs
from gateway.pipeline.raster import open_raster
from gateway.pipeline.tiling import tile_grid
from gateway.settings import REPO_ROOT, LimitSettings, TritonSettings
from gateway.triton.client import TritonClient
from gateway.triton.launcher import EmbeddedTriton

MODEL = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def scene_tiles(pixels: np.ndarray) -> np.ndarray:
    specs = tile_grid(pixels.shape[2], pixels.shape[1], 512, 128)
    return np.ascontiguousarray(np.stack([pixels[:, s.y : s.y + 512, s.x : s.x + 512] for s in specs]))


def session(threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def in_parallel(steps: list[Callable[[], int]], seconds: float, warmup: int = 2) -> float:
    """Run each ``step`` in its own thread for ``seconds`` (onnxruntime and GDAL release the GIL);
    returns the items/s of all of them together."""
    for step in steps:
        for _ in range(warmup):
            step()
    done = [0] * len(steps)
    start = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - start < seconds:
            done[i] += steps[i]()

    with ThreadPoolExecutor(len(steps)) as pool:
        list(pool.map(loop, range(len(steps))))
    return sum(done) / (time.perf_counter() - start)


def layouts(cores: int) -> dict[str, list[int]]:
    """The two ways to spend the cores in one process: intra-op threads per session, one per session."""
    return {"one session on all cores": [cores], "one single-threaded session per core": [1] * cores}


def ceiling(tiles: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """Tiles/s of onnxruntime in this process on pre-decoded tiles, for each layout of the cores."""
    feed = np.ascontiguousarray(np.resize(tiles, (batch, *tiles.shape[1:])))
    rates = {}
    for name, threads in layouts(len(os.sched_getaffinity(0))).items():
        sessions = [session(t) for t in threads]

        def step(sess: ort.InferenceSession) -> Callable[[], int]:
            return lambda: len(sess.run(["detections"], {"images": feed})[0])

        rates[name] = in_parallel([step(s) for s in sessions], seconds)
    return rates


def decode_and_model(path: Path, batch: int, seconds: float) -> float:
    """No serving: each core's thread decodes the GeoTIFF tile by tile and runs its own single-threaded
    onnxruntime session on batches."""

    def job(sess: ort.InferenceSession) -> Callable[[], int]:
        def step() -> int:
            done = 0
            with open_raster(path, LimitSettings()) as reader:
                specs = tile_grid(reader.info.width, reader.info.height, 512, 128)
                pending: list[np.ndarray] = []
                for tile in reader.tiles(specs):
                    pending.append(tile.pixels)
                    if len(pending) == batch:
                        sess.run(["detections"], {"images": np.stack(pending)})
                        done += len(pending)
                        pending = []
                if pending:
                    sess.run(["detections"], {"images": np.stack(pending)})
                    done += len(pending)
            return done

        return step

    cores = len(os.sched_getaffinity(0))
    return in_parallel([job(session(1)) for _ in range(cores)], seconds, warmup=1)


async def triton_throughput(
    url: str, tiles: np.ndarray, batch: int, inflight: int, seconds: float, *, shared: bool = False
) -> float:
    """Tiles/s of ``inflight`` concurrent calls of ``batch`` tiles; with ``shared`` the server reads
    each batch from a shared-memory slot (what the gateway sends), else it travels in the request."""
    from gateway.decode.arena import TileRegion, new_pool_token, region_name

    region = TileRegion(region_name(new_pool_token(), 0), inflight, batch, tile_size=512)
    try:
        for slot in range(inflight):
            region.pixels(slot, batch)[:] = np.resize(tiles, (batch, *tiles.shape[1:]))
        async with TritonClient(url, TritonSettings(request_timeout_s=120)) as client:

            async def call(slot: int) -> None:
                where = region.shared(slot, batch) if shared else None
                await client.infer(region.pixels(slot, batch), shared=where)

            for _ in range(2):
                await call(0)
            done = 0
            start = time.perf_counter()

            async def worker(slot: int) -> None:
                nonlocal done
                while time.perf_counter() - start < seconds:
                    await call(slot)
                    done += batch

            await asyncio.gather(*(worker(slot) for slot in range(inflight)))
            return done / (time.perf_counter() - start)
    finally:
        region.close()


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process, with a short label."""
    found = {}
    for pid in procfs.pids():
        seconds, cmdline = procfs.cpu_seconds(pid), procfs.command_line(pid)
        if seconds is not None and cmdline is not None:
            found[pid] = (label(cmdline), seconds)
    return found


def label(cmdline: str) -> str:
    for needle, name in (
        ("triton_python_backend_stub", "model (python backend stub, onnxruntime)"),
        ("tritonserver", "tritonserver"),
        ("gateway.decode.worker", "decode workers"),
        ("gateway.cli serve", "gateway (palm-serve serve)"),
        ("loadtest.bench_serving", "load generator (this process)"),
    ):
        if needle in cmdline:
            return name
    return "other"


def system_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


class Uploader:
    """A lean HTTP/1.1 keep-alive client posting one file to ``/v1/predict`` again and again.

    The multipart body is encoded once, as a load generator should: building it per call (httpx's
    ``files=``) costs the load generator about 0.4 ms of CPU per 512x512 tile of a 9 MB upload, CPU
    that on a 2-core machine the server under test then lacks.
    """

    def __init__(self, base: str, path: Path, timeout_s: float = 300.0) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        boundary = f"palm-bench-{secrets.token_hex(8)}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: image/tiff\r\n\r\n"
        ).encode()
        self.body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        self.headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def post(self) -> http.client.HTTPResponse:
        """One call; the response is read to the end and must be 200."""
        self.connection.request("POST", "/v1/predict", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        content = response.read()
        if response.status != 200:
            raise RuntimeError(f"/v1/predict answered {response.status}: {content[:300]!r}")
        return response

    def close(self) -> None:
        self.connection.close()


def predict_loop(base: str, path: Path, tiles_per_call: int, seconds: float, clients: int) -> dict[str, Any]:
    warm = Uploader(base, path)
    warm.post()
    warm.post()
    warm.close()
    cpu_before, sys_before = cpu_seconds(), system_times()
    start = time.perf_counter()
    counts = [0] * clients

    def worker(i: int) -> None:
        client = Uploader(base, path)
        try:
            while time.perf_counter() - start < seconds:
                client.post()
                counts[i] += tiles_per_call
        finally:
            client.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    cpu_after, sys_after = cpu_seconds(), system_times()
    tiles = sum(counts)
    per_role: dict[str, float] = {}
    for pid, (role, after) in cpu_after.items():
        before = cpu_before.get(pid, (role, after))[1] if pid in cpu_before else 0.0
        per_role[role] = per_role.get(role, 0.0) + after - before
    delta = [b - a for a, b in zip(sys_before, sys_after, strict=True)]
    return {
        "tiles_per_s": tiles / elapsed,
        "requests": tiles // tiles_per_call,
        "cpu_ms_per_tile": {k: 1000 * v / tiles for k, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
        "idle_share": delta[3] / sum(delta),
    }


def predict_latency(base: str, path: Path, calls: int) -> tuple[list[float], dict[str, float]]:
    stages: dict[str, list[float]] = {}
    client = Uploader(base, path, timeout_s=60)
    try:
        for _ in range(3):
            client.post()
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            response = client.post()
            latencies.append(time.perf_counter() - start)
            for part in response.headers["Server-Timing"].split(","):
                name, _, value = part.strip().partition(";dur=")
                stages.setdefault(name, []).append(float(value))
    finally:
        client.close()
    return latencies, {name: statistics.median(values) for name, values in stages.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each throughput run")
    parser.add_argument("--latency-calls", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4, help="tiles per call (the CPU config takes 4)")
    parser.add_argument("--compress", choices=["deflate", "zstd", "none"], default="deflate")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="palm-bench-"))
    big = write_geotiff(render_scene(123_456, size=2048, gsd=0.4), work / "scene2048.tif")
    if args.compress != "deflate":
        from rasterio.shutil import copy as copy_raster

        recompressed = work / f"scene2048-{args.compress}.tif"
        copy_raster(
            big,
            recompressed,
            driver="GTiff",
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress=args.compress,
        )
        big = recompressed
    small_scene = render_scene(123_457, size=512, gsd=0.4)
    small = write_geotiff(small_scene, work / "tile512.tif")
    import rasterio

    with rasterio.open(big) as src:
        pixels = src.read()
    tiles = scene_tiles(pixels)
    per_scene = len(tiles)
    cores = len(os.sched_getaffinity(0))
    print(
        f"cpu cores: {cores}; model: {MODEL.name}; 2048x2048 {args.compress.upper()} GeoTIFF "
        f"({big.stat().st_size / 1e6:.1f} MB) = {per_scene} tiles"
    )

    figures: dict[str, Any] = {"cores": cores, "tiles_per_2048_scene": per_scene, "compress": args.compress}
    first = ceiling(tiles, args.batch, args.seconds)
    figures["decode_and_model_tiles_per_s"] = decode_and_model(big, args.batch, args.seconds)

    settings = TritonSettings(model_config_name="cpu", ready_timeout_s=120, request_timeout_s=120)
    with EmbeddedTriton(settings, work / "triton") as triton:
        url = triton.grpc_url
        figures["triton_grpc_tiles_per_s"] = asyncio.run(
            triton_throughput(url, tiles, args.batch, 2, args.seconds)
        )
        figures["triton_shm_tiles_per_s"] = asyncio.run(
            triton_throughput(url, tiles, args.batch, 2, args.seconds, shared=True)
        )
        port = free_port()
        gateway = start_gateway(url, work / "gateway", port)
        base = f"http://127.0.0.1:{port}"
        try:
            one = predict_loop(base, big, per_scene, args.seconds, clients=1)
            two = predict_loop(base, big, per_scene, args.seconds, clients=2)
            direct = asyncio.run(triton_latency(url, scene_tiles(small_scene.pixels)[0], args.latency_calls))
            http, stages = predict_latency(base, small, args.latency_calls)
        finally:
            gateway.terminate()
            gateway.wait(30)
    last = ceiling(tiles, args.batch, args.seconds)
    figures["ceiling_runs_tiles_per_s"] = {name: [first[name], last[name]] for name in first}
    best = max(first, key=lambda name: max(first[name], last[name]))
    figures["ceiling_layout"] = best
    figures["ceiling_tiles_per_s"] = ceiling_rate = max(first[best], last[best])
    figures["predict_2048_1_client"] = one
    figures["predict_2048_2_clients"] = two
    figures["triton_1tile_p50_ms"] = percentile(direct, 50) * 1000
    figures["triton_1tile_p99_ms"] = percentile(direct, 99) * 1000
    figures["predict_1tile_p50_ms"] = percentile(http, 50) * 1000
    figures["predict_1tile_p99_ms"] = percentile(http, 99) * 1000
    figures["predict_1tile_stage_p50_ms"] = stages
    figures["gateway_ratio"] = one["tiles_per_s"] / ceiling_rate
    figures["gateway_ratio_2_clients"] = two["tiles_per_s"] / ceiling_rate
    figures["gateway_added_p50_ms"] = figures["predict_1tile_p50_ms"] - figures["triton_1tile_p50_ms"]

    print(
        f"1. onnxruntime in-process, batch {args.batch} (ceiling):  {ceiling_rate:6.1f} tiles/s, {best} "
        "(runs before/after: "
        + "; ".join(f"{name} {first[name]:.1f}/{last[name]:.1f}" for name in first)
        + ")"
    )
    serial, grpc = figures["decode_and_model_tiles_per_s"], figures["triton_grpc_tiles_per_s"]
    print(
        f"2. decode + onnxruntime in one process:        {serial:6.1f} tiles/s "
        f"({serial / ceiling_rate:.2f}x; a thread and a single-threaded session per core)"
    )
    shm = figures["triton_shm_tiles_per_s"]
    print(
        f"3. Triton gRPC, batch {args.batch}, 2 in flight:          {grpc:6.1f} tiles/s "
        f"({grpc / ceiling_rate:.2f}x); tiles in shared memory {shm:6.1f} ({shm / ceiling_rate:.2f}x)"
    )
    for name, run in (("1 client ", one), ("2 clients", two)):
        print(
            f"4. /v1/predict 2048x2048, {name}:          {run['tiles_per_s']:6.1f} tiles/s "
            f"({run['requests']} requests, CPU idle {100 * run['idle_share']:.0f}%)"
        )
    print(
        "   CPU ms per tile (1 client): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in one["cpu_ms_per_tile"].items() if ms >= 0.05)
    )
    print(
        f"5. one 512x512 tile, p50/p99: Triton direct {figures['triton_1tile_p50_ms']:.1f}/"
        f"{figures['triton_1tile_p99_ms']:.1f} ms, /v1/predict {figures['predict_1tile_p50_ms']:.1f}/"
        f"{figures['predict_1tile_p99_ms']:.1f} ms"
    )
    print("   stage p50 (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print(
        f"gateway / ceiling = {figures['gateway_ratio']:.2f} with 1 client, "
        f"{figures['gateway_ratio_2_clients']:.2f} with 2 (target >= 0.85); "
        f"gateway adds {figures['gateway_added_p50_ms']:.1f} ms at p50 (target < 10)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

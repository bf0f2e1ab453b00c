"""Triton load generator: tiles/s of onnxruntime in-process (the ceiling) against Triton over gRPC.

For each batch size it prints the ceiling (one onnxruntime session in this process, every core, the
session options ``model.py`` uses; measured before and after the Triton runs, as the machine may be
shared and drift), then
Triton over gRPC from ``gateway.triton.client.TritonClient`` against an embedded ``tritonserver`` (CPU
config, python backend), at each concurrency, with glibc malloc untuned and tuned. Every malloc mode
runs in a fresh worker process, because ``mallopt`` cannot be undone; "tuned" tunes both the client
process (``tune_malloc``) and the server (``MALLOC_*_`` environment). ``--client stock`` adds the
stock ``tritonclient.grpc.aio`` client as a baseline for the zero-copy request encoder; it is the
one import of ``tritonclient`` outside ``gateway/triton``, and only for that comparison. ``--client shm``
puts each batch in a shared-memory slot once (as the decode workers do) and sends only its name and
offset, the gateway's path when Triton can map its ``/dev/shm``.

``encode`` rows time the client alone: turning a batch into request bytes, the part of a call that
glibc's malloc settings affect most (the stock path copies the tiles four times, ours once).

Columns: tiles/s; ratio to the ceiling at that batch; p50/p99 latency of one call; client CPU
milliseconds per tile (on a small machine, CPU the client burns is CPU the model does not get).

The model is the repository's ``palm/1/model.onnx`` unless ``--model-repository`` points elsewhere
(e.g. a trivial model with the same contract, to measure transport alone).

Run: ``python -m loadtest.bench_triton [--batch 1 4] [--concurrency 1 4] [--seconds 10]
[--malloc off on] [--client palm stock] [--rounds 2]``.
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.settings import REPO_ROOT, TritonSettings

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"


@dataclass(frozen=True, slots=True)
class Result:
    """One measured configuration."""

    path: str  # "onnxruntime" or "triton"
    client: str
    malloc: str
    batch: int
    concurrency: int
    tiles_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_ms_per_tile: float
    startup_s: float = 0.0


def scene_tiles(count: int) -> npt.NDArray[np.uint8]:
    """``count`` scene-like tiles cut from seeded synthetic aerial scenes."""
    from export.synth import render_scene

    tiles: list[npt.NDArray[np.uint8]] = []
    seed = 100
    while len(tiles) < count:
        pixels = render_scene(seed, size=1024).pixels
        tiles.extend(pixels[:, y : y + 512, x : x + 512] for y in (0, 512) for x in (0, 512))
        seed += 1
    return np.ascontiguousarray(np.stack(tiles[:count]))


def measure_onnxruntime(model: Path, tiles: npt.NDArray[np.uint8], batch: int, seconds: float) -> Result:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # As in model.py: spinning threads halve throughput as soon as anything else wants the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(tiles[:batch])
    session.run(None, {"images": x})
    latencies: list[float] = []
    cpu0, start = time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    done = len(latencies) * batch
    return Result(
        path="onnxruntime",
        client="in-process",
        malloc="-",
        batch=batch,
        concurrency=1,
        tiles_per_s=done / elapsed,
        p50_ms=float(np.percentile(latencies, 50)) * 1e3,
        p99_ms=float(np.percentile(latencies, 99)) * 1e3,
        client_cpu_ms_per_tile=(time.process_time() - cpu0) * 1e3 / done,
    )


def stock_infer(url: str, settings: TritonSettings) -> tuple[Callable[[Any], Awaitable[Any]], Any]:
    """The stock ``tritonclient.grpc.aio`` path, as a baseline for the zero-copy encoder."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)

    async def infer(x: npt.NDArray[np.uint8]) -> Any:
        tensor = grpcclient.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        result = await client.infer(settings.model_name, [tensor], model_version=settings.model_version)
        return result.as_numpy("detections")

    return infer, client


def shm_infer(
    url: str, settings: TritonSettings, batch: int, slots: int
) -> tuple[Callable[[Any], Awaitable[Any]], Any]:
    """Our client reading from shared memory: each input array is written into a slot on first use."""
    from gateway.decode.arena import TileRegion, new_pool_token, region_name
    from gateway.triton.client import TritonClient

    region = TileRegion(region_name(new_pool_token(), 0), slots, batch, tile_size=512)
    client = TritonClient(url, settings)
    placed: dict[int, int] = {}

    async def infer(x: npt.NDArray[np.uint8]) -> Any:
        slot = placed.get(id(x))
        if slot is None:
            slot = placed[id(x)] = len(placed)
            region.pixels(slot, x.shape[0])[:] = x
        view = region.pixels(slot, x.shape[0])
        return await client.infer(view, shared=region.shared(slot, x.shape[0]))

    class Closer:
        async def close(self) -> None:
            await client.close()
            region.close()

    return infer, Closer()


async def drive(
    infer: Callable[[Any], Awaitable[Any]],
    tiles: npt.NDArray[np.uint8],
    batch: int,
    concurrency: int,
    seconds: float,
) -> tuple[float, list[float], float]:
    """``concurrency`` tasks each sending ``batch`` tiles back to back; (tiles/s, latencies, cpu s)."""
    inputs = [np.ascontiguousarray(np.roll(tiles, i, axis=0)[:batch]) for i in range(concurrency)]
    for x in inputs:
        await infer(x)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(x: npt.NDArray[np.uint8]) -> int:
        done = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await infer(x)
            latencies.append(time.perf_counter() - t0)
            done += batch
        return done

    cpu0, start = time.process_time(), time.perf_counter()
    done = sum(await asyncio.gather(*(worker(x) for x in inputs)))
    return done / (time.perf_counter() - start), latencies, (time.process_time() - cpu0) / max(done, 1)


def measure_encode(kind: str, malloc: str, tiles: npt.NDArray[np.uint8], batch: int) -> Result:
    """Client-side serialisation of one request, as ``kind`` does it before gRPC sends it."""
    from tritonclient.grpc import service_pb2

    from gateway.triton.codecs import InferRequestEncoder

    x = np.ascontiguousarray(tiles[:batch])
    encoder = InferRequestEncoder("palm", "1")

    def stock() -> bytes:  # what InferInput.set_data_from_numpy + the stub's serialiser do
        request = service_pb2.ModelInferRequest(model_name="palm", model_version="1")
        tensor = request.inputs.add(name="images", datatype="UINT8")
        tensor.shape.extend(x.shape)
        request.raw_input_contents.append(x.tobytes())
        return request.SerializeToString()

    encode = (lambda: encoder.encode(x)) if kind == "palm" else stock
    for _ in range(3):
        encode()
    latencies: list[float] = []
    cpu0, start = time.process_time(), time.perf_counter()
    while time.perf_counter() - start < 2.0:
        t0 = time.perf_counter()
        encode()
        latencies.append(time.perf_counter() - t0)
    done = len(latencies) * batch
    return Result(
        path="encode",
        client=kind,
        malloc=malloc,
        batch=batch,
        concurrency=1,
        tiles_per_s=done / (time.perf_counter() - start),
        p50_ms=float(np.percentile(latencies, 50)) * 1e3,
        p99_ms=float(np.percentile(latencies, 99)) * 1e3,
        client_cpu_ms_per_tile=(time.process_time() - cpu0) * 1e3 / done,
    )


async def measure_triton(args: argparse.Namespace, url: str, settings: TritonSettings) -> list[Result]:
    from gateway.triton.client import TritonClient

    # Loaded, not rendered here: rendering frees big temporaries, and glibc's dynamic mmap threshold
    # would then rise on its own, hiding what an untuned process pays.
    tiles = np.load(args.tiles)
    results = [
        measure_encode(kind, args.worker_malloc, tiles, batch)
        for kind in args.client
        if kind != "shm"
        for batch in args.batch
    ]
    for kind in args.client:
        closer: Any
        if kind == "palm":
            client = TritonClient(url, settings, malloc_tuning=args.worker_malloc == "on")
            infer, closer = client.infer, client
        elif kind == "shm":
            infer, closer = shm_infer(url, settings, max(args.batch), max(args.concurrency))
        else:
            infer, closer = stock_infer(url, settings)
        try:
            for batch in args.batch:
                for concurrency in args.concurrency:
                    rate, latencies, cpu = await drive(infer, tiles, batch, concurrency, args.seconds)
                    results.append(
                        Result(
                            path="triton",
                            client=kind,
                            malloc=args.worker_malloc,
                            batch=batch,
                            concurrency=concurrency,
                            tiles_per_s=rate,
                            p50_ms=float(np.percentile(latencies, 50)) * 1e3,
                            p99_ms=float(np.percentile(latencies, 99)) * 1e3,
                            client_cpu_ms_per_tile=cpu * 1e3,
                        )
                    )
        finally:
            await closer.close()
    return results


def worker(args: argparse.Namespace) -> int:
    """One malloc mode in this fresh process: start the server, measure, print JSON lines."""
    from gateway.triton.launcher import EmbeddedTriton
    from gateway.triton.malloc import tune_malloc

    tuned = args.worker_malloc == "on"
    if tuned:
        tune_malloc()
    settings = TritonSettings(
        model_repository=args.model_repository, request_timeout_s=120.0, ready_timeout_s=120.0
    )
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as state:
        started = time.perf_counter()
        with EmbeddedTriton(settings, Path(state), tune_malloc=tuned) as server:
            startup = time.perf_counter() - started
            results = asyncio.run(measure_triton(args, server.grpc_url, settings))
    for result in results:
        print(json.dumps({**asdict(result), "startup_s": startup}), flush=True)
    return 0


def run_worker(args: argparse.Namespace, malloc: str) -> list[Result]:
    command = [
        sys.executable,
        "-m",
        "loadtest.bench_triton",
        "--worker-malloc",
        malloc,
        "--tiles",
        str(args.tiles),
        "--seconds",
        str(args.seconds),
        "--model-repository",
        str(args.model_repository),
        "--batch",
        *map(str, args.batch),
        "--concurrency",
        *map(str, args.concurrency),
        "--client",
        *args.client,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    return [Result(**json.loads(line)) for line in out.stdout.splitlines() if line.startswith("{")]


def report(ceilings: list[Result], results: list[Result], model: Path) -> None:
    ceiling = {r.batch: r for r in ceilings}
    load = os.getloadavg()
    print(f"model {model} ({model.stat().st_size / 1e6:.1f} MB)")
    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = f"{'path':<12}{'client':<11}{'malloc':<7}{'batch':>6}{'conc':>6}{'tiles/s':>10}{'x ceil':>8}"
    header += f"{'p50 ms':>9}{'p99 ms':>9}{'cpu ms/tile':>13}"
    print(header)
    rows = list(ceiling.values()) + sorted(
        results, key=lambda r: (r.batch, r.path, r.client, r.concurrency, r.malloc)
    )
    for r in rows:
        ratio = r.tiles_per_s / ceiling[r.batch].tiles_per_s if r.path != "encode" else float("nan")
        print(
            f"{r.path:<12}{r.client:<11}{r.malloc:<7}{r.batch:>6}{r.concurrency:>6}{r.tiles_per_s:>10.1f}"
            f"{ratio:>8.2f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.client_cpu_ms_per_tile:>13.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1, 4], help="tiles per request (CPU config: at most 4)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--malloc", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--client", nargs="+", choices=["palm", "stock", "shm"], default=["palm"])
    parser.add_argument("--rounds", type=int, default=2, help="workers per malloc mode, in ABBA order")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--worker-malloc", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_malloc:
        return worker(args)

    model = args.model_repository / "palm" / "1" / "model.onnx"
    tiles = scene_tiles(max(args.batch) + max(args.concurrency))
    # ABBA order (off, on, on, off, ...) with the ceiling re-measured between workers: on a shared
    # machine the load drifts, and a fixed order would hand the drift to one mode.
    order = [mode for r in range(args.rounds) for mode in (args.malloc if r % 2 == 0 else args.malloc[::-1])]
    ceilings: list[Result] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as scratch:
        args.tiles = Path(scratch) / "tiles.npy"
        np.save(args.tiles, tiles)
        for mode in order:
            ceilings += [measure_onnxruntime(model, tiles, b, args.seconds) for b in args.batch]
            results += run_worker(args, mode)
    ceilings += [measure_onnxruntime(model, tiles, b, args.seconds) for b in args.batch]
    for batch in args.batch:
        rates = ", ".join(f"{r.tiles_per_s:.1f}" for r in ceilings if r.batch == batch)
        print(f"ceiling batch {batch}, each time it was measured: {rates} tiles/s")
    startups = ", ".join(f"{s:.2f}s" for s in sorted({r.startup_s for r in results}))
    print(f"embedded tritonserver, start() to model ready, each worker: {startups}")
    report(_average(ceilings), _average(results), model)
    return 0


def _average(results: list[Result]) -> list[Result]:
    """One row per configuration: mean rates and p50s, worst p99, over the rounds."""
    groups: dict[tuple[str, str, str, int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.path, r.client, r.malloc, r.batch, r.concurrency), []).append(r)
    return [
        Result(
            path=path,
            client=client,
            malloc=malloc,
            batch=batch,
            concurrency=concurrency,
            tiles_per_s=float(np.mean([r.tiles_per_s for r in rs])),
            p50_ms=float(np.mean([r.p50_ms for r in rs])),
            p99_ms=max(r.p99_ms for r in rs),
            client_cpu_ms_per_tile=float(np.mean([r.client_cpu_ms_per_tile for r in rs])),
            startup_s=float(np.mean([r.startup_s for r in rs])),
        )
        for (path, client, malloc, batch, concurrency), rs in groups.items()
    ]


if __name__ == "__main__":
    sys.exit(main())

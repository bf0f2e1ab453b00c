"""Decode-only benchmark of the raster reading path on a 20,000 x 20,000 RGB GeoTIFF.

Generates (once, cached) a DEFLATE-tiled and a DEFLATE-striped variant of the same image, then for
each decodes every model tile through the isolated decode pool (the path ``/v1/predict`` and
``palm-serve predict`` use) and prints tiles/s, the peak RSS (VmHWM) and CPU time of every process
involved (the gateway process and each decode worker), plus the time to refuse a 100,000 x 100,000
dimension bomb. Run::

    .venv/bin/python -m loadtest.bench_raster [--size 20000] [--cache DIR] [--workers 2] [--batch 8]

Speed and memory targets (issue 4): gateway-side peak RSS under 1 GiB whatever the image size; decode
at least 5x faster than the model (tens of tiles/s on 2 cores), i.e. 150+ tiles/s.

``--gsd 0.05`` writes the images at 5 cm pixels (drone imagery) and reads them as ``/v1/predict`` does,
with the served model card's GSD range: resampled while reading to the range's finest GSD (so a
20,000 px side becomes about 3,333 px); ``--overviews`` adds internal overviews (2, 4, 8, 16), which
the resampled reads are served from; ``--layouts tiled`` limits the run to one layout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from gateway import procfs
from gateway.decode import DecodePool
from gateway.errors import RasterTooLarge
from gateway.model_card import load_model_info
from gateway.pipeline.raster import ReadOptions, open_raster
from gateway.pipeline.resolution import ResolutionRequest
from gateway.pipeline.tiling import tile_grid
from gateway.settings import DecodeSettings, LimitSettings, TritonSettings
from tests.factories import sparse_bomb


def large_profile(side: int, *, tiled: bool, gsd: float = 0.3) -> dict[str, Any]:
    """Creation profile of the large benchmark GeoTIFFs: RGB, DEFLATE, 512 px tiles or 8-row strips."""
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(gsd, 0.0, 500_000.0, 0.0, -gsd, 4_000_000.0),
        "compress": "deflate",
        "photometric": "RGB",
        "tiled": tiled,
        "blockysize": 512 if tiled else 8,
        "BIGTIFF": "IF_SAFER",
    }
    if tiled:
        profile["blockxsize"] = 512
    return profile


def write_scene(
    path: Path, side: int, *, tiled: bool, seed: int = 0, gsd: float = 0.3, overviews: bool = False
) -> None:
    """A compressible RGB GeoTIFF written 512 rows at a time (smooth fields plus noise, like imagery)."""
    profile = large_profile(side, tiled=tiled, gsd=gsd)
    rng = np.random.default_rng(seed)
    xs = np.arange(side, dtype=np.float32)
    partial = path.with_suffix(".partial")
    with rasterio.Env(GDAL_PAM_ENABLED=False), rasterio.open(partial, "w", **profile) as dst:
        for y0 in range(0, side, 512):
            h = min(512, side - y0)
            ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
            block = np.empty((3, h, side), np.uint8)
            for b in range(3):
                field = 110 + 60 * np.sin(xs / (90 + 20 * b)) * np.cos(ys / (70 + 15 * b))
                block[b] = (field + rng.integers(0, 6, size=(h, side), dtype=np.uint8)).astype(np.uint8)
            dst.write(block, window=Window(0, y0, side, h))
    if overviews:
        with rasterio.Env(GDAL_PAM_ENABLED=False), rasterio.open(partial, "r+") as dst:
            dst.build_overviews([2, 4, 8, 16], Resampling.average)
    partial.rename(path)


def cached_name(side: int, layout: str, gsd: float, overviews: bool) -> str:
    """The cached image of these parameters (the 0.3 m images keep their original names)."""
    suffix = "" if gsd == 0.3 else f"_gsd{gsd:g}"
    return f"rgb_{side}_{layout}_deflate{suffix}{'_ovr' if overviews else ''}.tif"


def bomb(path: Path) -> Path:
    return path if path.exists() else sparse_bomb(path)


def report_processes(pool: DecodePool) -> None:
    print(f"  {'process':24} {'pid':>7} {'peak RSS (VmHWM)':>17} {'RSS now':>10} {'CPU s':>7}")
    for role, pid in [("gateway (this process)", os.getpid())] + [
        (f"decode worker {i}", p) for i, p in enumerate(pool.pids)
    ]:
        status = procfs.status(pid) or {}
        hwm, rss, cpu_s = status.get("VmHWM", "?"), status.get("VmRSS", "?"), procfs.cpu_seconds(pid) or 0.0
        print(f"  {role:24} {pid:7} {hwm:>17} {rss:>10} {cpu_s:7.1f}")


async def decode(
    pool: DecodePool, path: Path, batch: int, options: ReadOptions | None = None
) -> tuple[int, float]:
    started = time.perf_counter()
    tiles = 0
    async with pool.open(path, options) as session:
        specs = tile_grid(*session.info.read_size, 512, 128)
        async for b in session.batches(specs, batch):
            tiles += len(b.specs)
        tiles += session.skipped
    return tiles, time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    files = {
        layout: cache / cached_name(args.size, layout, args.gsd, args.overviews) for layout in args.layouts
    }
    if not all(path.exists() for path in files.values()):
        # In a child process, so generating does not count in this (the gateway's) peak RSS.
        print(f"generating test images in {cache} (once) ...", flush=True)
        command = [sys.executable, "-m", "loadtest.bench_raster", "--generate", "--size", str(args.size)]
        command += ["--gsd", str(args.gsd), "--layouts", *args.layouts] + (["--overviews"] * args.overviews)
        subprocess.run([*command, "--cache", str(cache)], check=True)
    for layout, path in files.items():
        size = path.stat().st_size / 1e9
        print(f"{layout:8} {path} {size:.2f} GB on disk, {args.size**2 * 3 / 1e9:.2f} GB decoded")
    options = ReadOptions(resolution=ResolutionRequest(load_model_info(TritonSettings()).resolution))
    with open_raster(next(iter(files.values())), LimitSettings(), options) as reader:
        info = reader.info
        print(
            f"GSD {info.gsd_m} m, read at {info.inference_gsd_m} m: {info.width:,} x {info.height:,} px "
            f"become {info.read_width:,} x {info.read_height:,} (factor {info.resample_factor:.4g})"
        )

    settings = DecodeSettings(workers=args.workers)
    print(
        f"\ndecode pool: {settings.workers} workers, batch {args.batch}, RLIMIT_AS "
        f"{settings.memory_limit_bytes / 1024**3:.1f} GiB per worker"
    )
    async with DecodePool(settings, LimitSettings(), tile_size=512) as pool:
        for layout, path in files.items():
            for attempt in range(args.repeat):
                tiles, seconds = await decode(pool, path, args.batch, options)
                rate = tiles / seconds
                print(
                    f"  {layout:8} run {attempt + 1}: {tiles} tiles in {seconds:6.2f} s = {rate:6.0f} tiles/s"
                )
        if args.workers > 1:
            started = time.perf_counter()
            results = await asyncio.gather(*(decode(pool, p, args.batch, options) for p in files.values()))
            seconds = time.perf_counter() - started
            total = sum(t for t, _ in results)
            print(f"  both files at once: {total} tiles in {seconds:6.2f} s = {total / seconds:6.0f} tiles/s")

        target = bomb(cache / "bomb_100k.tif")
        started = time.perf_counter()
        try:
            async with pool.open(target, ReadOptions(max_pixels=LimitSettings().max_predict_pixels)):
                pass
        except RasterTooLarge as exc:
            print(
                f"\n100,000 x 100,000 bomb ({target.stat().st_size} bytes) refused through the pool in "
                f"{(time.perf_counter() - started) * 1000:.1f} ms: {exc.detail[:80]}"
            )
        print("\nprocesses (peaks over the whole run):")
        report_processes(pool)

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"largest peak RSS of any exited child (RUSAGE_CHILDREN): {children.ru_maxrss / 1024:.0f} MiB")

    print("\nreference, no isolation (open_raster in this process; raises this process's RSS):")
    started = time.perf_counter()
    try:
        open_raster(target, LimitSettings(), ReadOptions(max_pixels=64_000_000)).close()
    except RasterTooLarge:
        print(f"  bomb refused in {(time.perf_counter() - started) * 1000:.1f} ms")
    for layout, path in files.items():
        started = time.perf_counter()
        with open_raster(path, LimitSettings(), options) as reader:
            tiles = sum(1 for _ in reader.tiles(tile_grid(*reader.info.read_size, 512, 128)))
        seconds = time.perf_counter() - started
        print(f"  {layout:8} {tiles} tiles in {seconds:6.2f} s = {tiles / seconds:6.0f} tiles/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=20_000, help="image side in pixels")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "palm-serve-bench-raster",
        help="where the generated images are kept between runs",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="tiles per batch (Triton batch size)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per file")
    parser.add_argument("--generate", action="store_true", help="only write the cached images")
    parser.add_argument("--gsd", type=float, default=0.3, help="pixel size of the images, metres")
    parser.add_argument("--overviews", action="store_true", help="images with internal overviews")
    parser.add_argument("--layouts", nargs="+", choices=("tiled", "striped"), default=["tiled", "striped"])
    args = parser.parse_args()
    if args.generate:
        args.cache.mkdir(parents=True, exist_ok=True)
        for layout in args.layouts:
            path = args.cache / cached_name(args.size, layout, args.gsd, args.overviews)
            if not path.exists():
                started = time.perf_counter()
                write_scene(path, args.size, tiled=layout == "tiled", gsd=args.gsd, overviews=args.overviews)
                print(f"  wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

"""``palm-serve``: ``serve`` runs the HTTP gateway; ``predict`` runs the same pipeline on local files.

Modules beyond the standard library load inside the commands, after the embedded Triton has been
spawned (see :mod:`gateway.runtime`), so a one-file ``predict`` pays for them while the server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palm_serve import cli as jobs_cli

if TYPE_CHECKING:
    from gateway.pipeline.render import OutputFormat
    from gateway.settings import Settings

logger = logging.getLogger("palm_serve")

FORMATS = ("json", "coco", "geojson")
RASTER_SUFFIXES = (".tif", ".tiff")
DEFAULT_OUT = Path("predictions")

DESCRIPTION = """\
Palm Serve: palm-tree and building detection on GeoTIFFs, served by NVIDIA Triton.

  palm-serve serve      serve the HTTP API (what `make run` calls)
  palm-serve predict    detect objects in local files, without HTTP
  palm-serve jobs       submit bulk jobs to a running service, follow them, download results
  palm-serve keys       create, list or revoke API keys (PALM_AUTH__MODE=api-key)

Settings come from PALM_* environment variables (see the README's configuration table).
"""

PREDICT_DESCRIPTION = """\
Run the same reading, Triton, seam-merge and georeferencing path as POST /v1/predict on local files,
without the pixel limit of a direct request. A directory stands for every *.tif / *.tiff file under it.
One output per file goes to the output folder, plus, for coco and geojson with several files, a
combined predictions.coco.json or predictions.geojson.

Files finer than the model's ground sample distance range are resampled to it while they are read
(boxes come back in the file's own pixels); files far coarser fail with resolution-out-of-range unless
--allow-any-resolution is given. --gsd states the GSD of files without georeferencing.

Exit status: 0 every file succeeded, 1 some file failed, 2 the command line was wrong (or the model's
card and Triton disagree on its tensors). Unless PALM_TRITON_URL names a running server, an embedded
tritonserver runs for the duration; its files go to PALM_DATA_DIR (default: ~/.cache/palm-serve).
PALM_TRITON__MODEL_NAME picks the model in PALM_TRITON__MODEL_REPOSITORY (default: palm).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="palm-serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API (embedded Triton unless PALM_TRITON_URL is set)")
    serve.add_argument("--host", help="bind address (default: PALM_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PALM_PORT or 8000)")

    predict = sub.add_parser(
        "predict",
        help="detect objects in local files, no HTTP involved",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_DIR")
    predict.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})"
    )
    predict.add_argument("--format", choices=FORMATS, default="json", help="output format (default: json)")
    predict.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="drop detections scoring below this, 0 to 1 (default: PALM_TILING__SCORE_THRESHOLD or 0.3)",
    )
    predict.add_argument("--bands", default=None, help="source bands for R,G,B (1-based), e.g. 3,2,1")
    predict.add_argument(
        "--gsd",
        type=float,
        default=None,
        help="ground sample distance in metres per pixel of files without georeferencing",
    )
    predict.add_argument(
        "--allow-any-resolution",
        action="store_true",
        help="read every file as it is: no resampling of fine imagery and no refusal of coarse imagery "
        "(a warning instead)",
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    from gateway.auth import commands as keys_commands

    keys_commands.add_parser(sub)

    jobs_cli.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "jobs":
        return jobs_cli.run(args)
    from gateway.logs import configure_logging
    from gateway.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return _serve(settings, args.host, args.port)
    if args.command == "keys":
        return keys_commands.run(settings, args)
    if "data_dir" not in settings.model_fields_set:
        from gateway.settings import user_dir

        # A one-off command keeps its few files (the embedded server's) in the user's cache.
        settings = settings.model_copy(update={"data_dir": user_dir("XDG_CACHE_HOME", ".cache")})
    code = asyncio.run(_predict(settings, args))
    if argv is None:  # run as the program, not called from other code
        _exit_now(code)
    return code


SMALL_RUN_BYTES = 32 * 1024**2
"""Inputs up to this size in all (a few dozen uncompressed 512 px tiles) run on one model instance of
the embedded server (docs/performance.md, "palm-serve predict start to exit"); PALM_TRITON__INSTANCES
overrides."""


def _exit_now(code: int) -> None:
    """End the process once its work is done and its servers are stopped, skipping the interpreter's
    teardown of gRPC and numpy (a fifth of a one-tile run: docs/performance.md, "palm-serve predict")."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(settings: Settings, host: str | None, port: int | None) -> int:
    host = host or settings.host
    port = port if port is not None else settings.port
    settings = settings.model_copy(update={"host": host, "port": port})
    from gateway.auth.authenticator import UnsafeExposure, refuse_unsafe_start
    from gateway.serving import listen, uvicorn_config

    try:
        refuse_unsafe_start(settings)
    except UnsafeExposure as exc:
        print(f"palm-serve: {exc}", file=sys.stderr)
        return 2

    try:
        # Bound before the engine starts, so a busy port fails at once instead of after Triton loads.
        listener = listen(host, port)
    except OSError as exc:
        print(
            f"palm-serve: cannot listen on {host}:{port} ({exc.strerror}); if another service uses the "
            "port, choose a free one with PALM_PORT=... or --port",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from gateway.app import create_app

    config = uvicorn_config(create_app(settings), settings.http, settings.log_level)
    logger.info("palm-serve listening on http://%s:%d (ready once the model is loaded)", host, port)
    with listener:
        try:
            uvicorn.Server(config).run(sockets=[listener])
        except KeyboardInterrupt:  # uvicorn shut down on Ctrl-C, then raised it again
            return 130
    return 0


def expand(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """The files to read, in order: files as given, directories as their ``*.tif``/``*.tiff`` files
    (recursively, sorted); and the paths that are neither."""
    files: list[Path] = []
    missing: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append(path)
    return files, missing


async def _predict(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.errors import GatewayError
    from gateway.options import PredictOptions

    try:
        options = PredictOptions.parse(
            score_threshold=args.score_threshold,
            bands=args.bands,
            default_score_threshold=settings.tiling.score_threshold,
            max_pixels=None,
            resample="off" if args.allow_any_resolution else None,
            gsd=args.gsd,
        )
    except GatewayError as exc:
        print(f"palm-serve: {exc.detail}", file=sys.stderr)
        return 2
    files, missing = expand(args.files)
    if missing:
        print(f"palm-serve: no such file or directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not files:
        print("palm-serve: no .tif or .tiff file found in the given directories", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Files are read one after another: one decode worker is enough, and starts sooner.
    settings = settings.model_copy(update={"decode": settings.decode.model_copy(update={"workers": 1})})
    triton = settings.triton
    small = sum(path.stat().st_size for path in files) <= SMALL_RUN_BYTES
    if triton.url is None and triton.instances is None and small:
        # A few tiles: a second model instance would take longer to start than it saves.
        settings = settings.model_copy(update={"triton": triton.model_copy(update={"instances": 1})})

    from gateway.pipeline.contract import ContractError
    from gateway.runtime import open_runtime

    try:
        async with open_runtime(settings) as runtime:
            return _report(await _run(runtime, files, options, out, args), len(files))
    except ContractError as exc:
        print(f"palm-serve: cannot serve model {settings.triton.model_name!r}: {exc}", file=sys.stderr)
        return 2


async def _run(runtime: Any, files: list[Path], options: Any, out: Path, args: argparse.Namespace) -> int:
    """Predict ``files`` one by one, writing each output; returns how many failed."""
    from tqdm import tqdm

    from gateway.errors import GatewayError
    from gateway.pipeline.render import FILE_SUFFIXES, OutputFormat, render
    from gateway.pipeline.result import ImageResult

    fmt = OutputFormat(args.format)
    tiling = runtime.predictor.tiling_info(options.score_threshold)
    failures = 0
    results: list[ImageResult] = []
    used: set[Path] = set()
    for path in files:
        bar = tqdm(total=0, desc=path.name, unit="tile", disable=args.no_progress, leave=False)

        def progress(done: int, total: int, bar: Any = bar) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            result = await runtime.predictor.predict_file(path, path.name, options, progress=progress)
        except GatewayError as exc:
            failures += 1
            print(f"{path}: {exc.title}: {exc.detail}", file=sys.stderr)
            continue
        finally:
            bar.close()
        results.append(result)
        target = _output_path(out, path, fmt, used, FILE_SUFFIXES[fmt])
        target.write_bytes(render(fmt, [result], runtime.model, tiling, created=datetime.now(UTC)))
        for warning in result.image.warnings:
            print(f"{path}: warning: {warning}", file=sys.stderr)
        domain = result.image.out_of_domain
        scored = (
            ""
            if domain is None
            else f", out-of-domain score {domain.score:g} (threshold {domain.threshold:g})"
        )
        print(f"{path}: {len(result.detections)} detections, {result.tiles_total} tiles{scored} -> {target}")
    if fmt is not OutputFormat.json and len(results) > 1:
        combined = out / f"predictions{FILE_SUFFIXES[fmt]}"
        combined.write_bytes(render(fmt, results, runtime.model, tiling, created=datetime.now(UTC)))
        print(f"all files: {combined}")
    return failures


def _report(failures: int, total: int) -> int:
    if failures:
        print(f"palm-serve: {failures} of {total} file(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _output_path(out: Path, source: Path, fmt: OutputFormat, used: set[Path], suffix: str) -> Path:
    """``<out>/<stem><suffix>``; inputs sharing a stem in one run get ``-2``, ``-3``, ..."""
    target = out / (source.stem + suffix)
    n = 1
    while target in used:
        n += 1
        target = out / f"{source.stem}-{n}{suffix}"
    used.add(target)
    return target


if __name__ == "__main__":
    raise SystemExit(main())

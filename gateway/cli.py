"""``palm-serve``: ``serve`` runs the HTTP gateway; ``predict`` runs the same pipeline on local files."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.logs import configure_logging
from gateway.pipeline.render import FILE_SUFFIXES, OutputFormat
from gateway.settings import Settings, get_settings

logger = logging.getLogger("palm_serve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palm-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API (embedded Triton unless PALM_TRITON_URL is set)")
    serve.add_argument("--host", help="bind address (default PALM_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default PALM_PORT or 8000)")

    predict = sub.add_parser("predict", help="detect objects in local files, no HTTP involved")
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output directory")
    predict.add_argument("--format", choices=[f.value for f in OutputFormat], default="json")
    predict.add_argument("--score-threshold", type=float, default=None)
    predict.add_argument("--bands", default=None, help="source bands for R,G,B, e.g. 3,2,1")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return _serve(settings, args.host, args.port)
    return asyncio.run(_predict(settings, args))


def _serve(settings: Settings, host: str | None, port: int | None) -> int:
    import uvicorn

    from gateway.app import create_app

    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to ours (same format, request ids)
        timeout_graceful_shutdown=30,
        access_log=False,  # the gateway logs each request itself, with its request id
    )
    return 0


async def _predict(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.errors import GatewayError
    from gateway.options import PredictOptions
    from gateway.pipeline.render import OutputFormat, render
    from gateway.pipeline.result import ImageResult
    from gateway.runtime import open_runtime

    try:
        options = PredictOptions.parse(
            score_threshold=args.score_threshold,
            bands=args.bands,
            default_score_threshold=settings.tiling.score_threshold,
            max_pixels=None,
        )
    except GatewayError as exc:
        print(f"palm-serve: {exc.detail}", file=sys.stderr)
        return 2
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"palm-serve: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    fmt = OutputFormat(args.format)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    results: list[ImageResult] = []
    used: set[Path] = set()
    async with open_runtime(settings) as runtime:
        predictor = runtime.predictor
        tiling = predictor.tiling_info(options.score_threshold)
        for path in args.files:
            bar = tqdm(total=0, desc=path.name, unit="tile", disable=args.no_progress, leave=False)

            def progress(done: int, total: int, bar: Any = bar) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                result = await predictor.predict_file(path, path.name, options, progress=progress)
            except GatewayError as exc:
                failures += 1
                bar.close()
                print(f"{path}: {exc.title}: {exc.detail}", file=sys.stderr)
                continue
            bar.close()
            results.append(result)
            target = _output_path(out, path, fmt, used)
            target.write_bytes(render(fmt, [result], runtime.model, tiling))
            print(f"{path}: {len(result.detections)} detections, {result.tiles_total} tiles -> {target}")
        if fmt is not OutputFormat.json and len(results) > 1:
            combined = out / f"predictions{FILE_SUFFIXES[fmt]}"
            combined.write_bytes(render(fmt, results, runtime.model, tiling))
            print(f"all files: {combined}")
    return 1 if failures else 0


def _output_path(out: Path, source: Path, fmt: OutputFormat, used: set[Path]) -> Path:
    """``<out>/<stem><suffix>``; inputs sharing a stem in one run get ``-2``, ``-3``, ..."""
    suffix = FILE_SUFFIXES[fmt]
    target = out / (source.stem + suffix)
    n = 1
    while target in used:
        n += 1
        target = out / f"{source.stem}-{n}{suffix}"
    used.add(target)
    return target


if __name__ == "__main__":
    raise SystemExit(main())

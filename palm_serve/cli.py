"""``palm-serve jobs ...``: bulk jobs from the command line, through :class:`palm_serve.Client`.

``gateway.cli`` mounts these subcommands; nothing here imports the server, and httpx loads only when a
``jobs`` command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from palm_serve.client import Client, Job

OK, FILES_FAILED, JOB_FAILED, UNREACHABLE, REFUSED = 0, 1, 2, 3, 4

EXIT_CODES = """\
Exit status: 0 the job (or command) succeeded and every file with it; 1 the job succeeded but some
files failed (listed on stderr); 2 the job failed or was cancelled; 3 the service could not be reached
(or stayed unavailable through the retries); 4 the service refused the request (its problem is shown)
or the command line was wrong.
"""


class _JobsParser(argparse.ArgumentParser):
    """Command-line mistakes under ``palm-serve jobs`` exit with :data:`REFUSED`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(REFUSED, f"{self.prog}: error: {message}\n")


def default_url() -> str:
    """``PALM_URL``, else the local service on ``PALM_PORT`` (8000)."""
    return os.environ.get("PALM_URL") or f"http://127.0.0.1:{os.environ.get('PALM_PORT') or 8000}"


def add_parser(sub: Any) -> None:
    """Add ``jobs`` and its subcommands to the ``palm-serve`` subparsers ``sub``."""
    jobs = sub.add_parser(
        "jobs",
        help="submit bulk jobs to a running service, follow them, download their results",
        description="Bulk jobs on a running Palm Serve (see `palm-serve serve`).\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = jobs.add_subparsers(dest="jobs_command", required=True, parser_class=_JobsParser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="the service (default: PALM_URL or http://127.0.0.1:8000)"
    )
    common.add_argument("--api-key", default=None, help="API key (default: PALM_API_KEY)")

    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="upload files or folders as a job",
        description=(
            "Upload files (a folder stands for its .tif, .tiff, .png and .jpg files, recursively) as one "
            "job and start it. Large folders go in batches; running the same command again after an "
            "interruption finds the same job and uploads only the files it does not have.\n\n" + EXIT_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("paths", nargs="+", type=Path, metavar="DIR_OR_FILE")
    submit.add_argument("--name", help="a name for the job")
    submit.add_argument("--priority", choices=("low", "normal", "high"))
    submit.add_argument("--score-threshold", type=float, help="drop detections scoring below this (0-1)")
    submit.add_argument("--bands", help="source bands for R,G,B (1-based), e.g. 3,2,1")
    submit.add_argument(
        "--gsd", type=float, help="ground sample distance (m/px) of files without georeferencing"
    )
    submit.add_argument(
        "--allow-any-resolution",
        action="store_true",
        help="read every file as it is, whatever its ground sample distance (a warning instead of a refusal)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--out", type=Path, help="write the COCO results here (implies --wait)")
    submit.add_argument("--geojson", type=Path, help="write the GeoJSON results here (implies --wait)")
    submit.add_argument(
        "--staged-above", type=int, default=200, help="more files than this upload in batches (default 200)"
    )
    submit.add_argument("--batch-files", type=int, default=100, help="files per batch (default 100)")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")

    listing = commands.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument(
        "--status", choices=("created", "queued", "running", "succeeded", "failed", "cancelled")
    )
    listing.add_argument("--limit", type=int, default=20)

    for name, text in (
        ("show", "a job's status, progress and errors"),
        ("cancel", "cancel a job"),
        ("delete", "delete an ended job"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id", metavar="ID")

    results = commands.add_parser(
        "results",
        parents=[common],
        help="download a job's results",
        description="Download a job's results, checked against their sha256.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    results.add_argument("job_id", metavar="ID")
    results.add_argument("--out", type=Path, help="COCO results (default: <ID>.coco.json unless --geojson)")
    results.add_argument("--geojson", type=Path, help="GeoJSON results")
    results.add_argument("--wait", action="store_true", help="wait for the job to end first")
    results.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``palm-serve jobs <command>``; returns the exit status."""
    from palm_serve.client import Client
    from palm_serve.errors import PalmServeError, ProblemError, ServiceUnreachable, Unavailable

    commands: dict[str, Callable[[Client, argparse.Namespace], int]] = {
        "submit": _submit,
        "list": _list,
        "show": _show,
        "cancel": _cancel,
        "delete": _delete,
        "results": _results,
    }
    url = args.url or default_url()
    try:
        with Client(url, api_key=args.api_key or os.environ.get("PALM_API_KEY")) as client:
            return commands[args.jobs_command](client, args)
    except (ServiceUnreachable, Unavailable) as exc:
        _err(str(exc) if isinstance(exc, ServiceUnreachable) else f"the service is unavailable: {exc.detail}")
        return UNREACHABLE
    except ProblemError as exc:
        _err(f"{exc.title}: {exc.detail}")
        return REFUSED
    except (PalmServeError, OSError, ValueError) as exc:
        _err(str(exc))
        return REFUSED
    except KeyboardInterrupt:
        _err("interrupted; run the same command again to resume the upload")
        return 130


def _err(message: str) -> None:
    print(f"palm-serve: {message}", file=sys.stderr)


def _submit(client: Client, args: argparse.Namespace) -> int:
    progress = not args.no_progress
    bar = _UploadProgress(sys.stdout) if progress else None
    job = client.jobs.create(
        args.paths,
        staged_above=args.staged_above,
        batch_files=args.batch_files,
        on_upload=bar.update if bar is not None else None,
        name=args.name,
        priority=args.priority,
        score_threshold=args.score_threshold,
        bands=args.bands,
        resample="off" if args.allow_any_resolution else None,
        gsd=args.gsd,
    )
    if bar is not None:
        bar.close()
        if bar.resumed:
            print(f"resumed job {job.id}: {bar.resumed} file(s) were already uploaded")
    print(f"job {job.id}: {job.status}, {job.progress.files_total} files")
    if not (args.wait or args.out or args.geojson):
        return OK
    return _finish(client, job, args.out, args.geojson, progress)


def _finish(client: Client, job: Job, out: Path | None, geojson: Path | None, progress: bool) -> int:
    job.wait(progress=progress)
    final = job.progress
    print(
        f"job {job.id}: {job.status}, {final.files_done} of {final.files_total} files, "
        f"{final.detections} detections"
    )
    if out is not None:
        print(f"COCO results: {job.results(out)}")
    if geojson is not None:
        print(f"GeoJSON results: {job.geojson(geojson)}")
    return _outcome(job)


def _outcome(job: Job) -> int:
    if job.status != "succeeded":
        _err(f"job {job.id} {job.status}")
        for error in job.failed_files()[:20]:
            _err(f"  {error['name']}: {(error.get('error') or {}).get('detail')}")
        return JOB_FAILED
    if job.progress.files_failed:
        failed = job.failed_files()
        _err(f"{len(failed)} of {job.progress.files_total} file(s) failed:")
        for error in failed:
            _err(f"  {error['name']}: {(error.get('error') or {}).get('detail')}")
        return FILES_FAILED
    return OK


def _list(client: Client, args: argparse.Namespace) -> int:
    rows = [
        (
            j.id,
            j.status,
            f"{j.progress.files_settled}/{j.progress.files_total}",
            str(j.progress.detections),
            j.data.get("created_at") or "",
            j.data.get("name") or "",
        )
        for j in client.jobs.list(args.status, limit=args.limit)
    ]
    header = ("ID", "STATUS", "FILES", "DETECTIONS", "CREATED", "NAME")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return OK


def _show(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.get(args.job_id)
    data = job.data
    print(f"job {job.id} {data.get('name') or ''}".rstrip())
    print(f"  {job.progress.line()}, {job.progress.detections} detections")
    print(
        f"  created {data.get('created_at')}, started {data.get('started_at')}, "
        f"finished {data.get('finished_at')}"
    )
    results = data.get("results") or {}
    if results.get("ready"):
        print(
            f"  results: {data['links']['results']} (sha256 {results['sha256']}), {data['links']['geojson']}"
        )
    for error in job.errors:
        print(f"  failed: {error['file']}: {error['detail']}")
    return OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.cancel(args.job_id)
    print(f"job {job.id}: {job.status}")
    return OK


def _delete(client: Client, args: argparse.Namespace) -> int:
    client.jobs.delete(args.job_id)
    print(f"job {args.job_id}: deleted")
    return OK


def _results(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.get(args.job_id)
    out = args.out if args.out is not None or args.geojson is not None else Path(f"{job.id}.coco.json")
    if args.wait:
        return _finish(client, job, out, args.geojson, not args.no_progress)
    if out is not None:
        print(f"COCO results: {job.results(out)}")
    if args.geojson is not None:
        print(f"GeoJSON results: {job.geojson(args.geojson)}")
    return _outcome(job)


class _UploadProgress:
    """Upload progress: a bar on a terminal, a line per upload request elsewhere."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.resumed = 0
        self._first = True
        self._bar: Any = None
        if stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=0, unit="file", desc="uploading", file=stream, dynamic_ncols=True)

    def update(self, uploaded: int, total: int) -> None:
        if self._first:
            self._first = False
            self.resumed = uploaded if uploaded < total else 0
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = uploaded
            self._bar.refresh()
        else:
            print(f"uploaded {uploaded}/{total} files", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

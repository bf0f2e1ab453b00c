"""What the sync and async clients share: no I/O beyond ``stat``, only decisions and parsing.

Local files to upload and their job names, the idempotency key of a submission, upload batches, retry
delays, problem+json to exceptions, and the Server-Sent Events parser.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import httpx

from palm_serve.errors import PROBLEM_TYPE_BASE, ProblemError, problem_class

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""What a directory stands for: its files with these suffixes, recursively."""
RETRY_STATUSES = frozenset({429, 503})
JOB_FIELDS = (
    "name",
    "priority",
    "score_threshold",
    "bands",
    "resample",
    "gsd",
    "webhook_url",
    "webhook_secret",
)

PathArg = str | PathLike[str]
PathsArg = PathArg | Iterable[PathArg]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file to upload: where it is, the name the job will know it by, and what it was when listed."""

    path: Path
    name: str
    size: int
    mtime_ns: int


def job_name(raw: str) -> str:
    """The name the service keeps for ``raw`` (NFC, ``/``-separated, no empty or dot segments)."""
    text = unicodedata.normalize("NFC", raw.replace("\\", "/"))
    return "/".join(s.strip() for s in text.split("/") if s.strip() not in ("", ".", ".."))


def collect(paths: PathsArg) -> list[LocalFile]:
    """The files to upload, in order: a file as given (named by its file name), a directory as its
    raster files (:data:`RASTER_SUFFIXES`, recursively, sorted; named by their path inside it).

    Raises:
        FileNotFoundError: a path is neither a file nor a directory.
        ValueError: two files would have the same name in the job, or there is no file at all.
    """
    items: Sequence[PathArg] = [paths] if isinstance(paths, str | PathLike) else list(paths)
    found: list[LocalFile] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES):
                if child.is_file():
                    found.append(_local(child, child.relative_to(path).as_posix()))
        elif path.is_file():
            found.append(_local(path, path.name))
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    seen: dict[str, Path] = {}
    for file in found:
        if file.name in seen:
            raise ValueError(
                f"{seen[file.name]} and {file.path} would both be named {file.name!r} in the job"
            )
        seen[file.name] = file.path
    if not found:
        raise ValueError("no file to upload (a directory stands for its .tif, .tiff, .png and .jpg files)")
    return found


def _local(path: Path, name: str) -> LocalFile:
    stat = path.stat()
    return LocalFile(path, job_name(name), stat.st_size, stat.st_mtime_ns)


def job_fields(params: dict[str, Any]) -> dict[str, str]:
    """The job's form fields from keyword arguments (``None`` left out).

    Raises:
        TypeError: an argument a job does not take.
    """
    unknown = sorted(set(params) - set(JOB_FIELDS))
    if unknown:
        raise TypeError(f"unknown job parameter(s) {', '.join(unknown)}; a job takes {', '.join(JOB_FIELDS)}")
    return {k: str(v) for k, v in params.items() if v is not None}


def submission_key(files: Sequence[LocalFile], fields: dict[str, str], *, staged: bool) -> str:
    """The ``Idempotency-Key`` of a submission: the same files (names, sizes, modification times) with the
    same parameters, sent the same way (one request or ``staged``), give the same key, so submitting
    again finds the job the first try created."""
    manifest = [fields, staged, [[f.name, f.size, f.mtime_ns] for f in files]]
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return f"palm-serve-client-{digest[:48]}"


def upload_batches(files: Sequence[LocalFile], max_files: int, max_bytes: int) -> Iterator[list[LocalFile]]:
    """``files`` in order, cut into requests of at most ``max_files`` files and ``max_bytes`` bytes
    (a single larger file goes alone)."""
    batch: list[LocalFile] = []
    size = 0
    for file in files:
        if batch and (len(batch) >= max_files or size + file.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(file)
        size += file.size
    if batch:
        yield batch


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), if the response has one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, asked: float | None, *, base_s: float, cap_s: float) -> float:
    """Delay before retry ``attempt`` (1-based): what the service asked for, else exponential with
    jitter; never more than ``cap_s``."""
    if asked is not None:
        return min(cap_s, asked)
    delay: float = base_s * 2.0 ** (attempt - 1) * (0.5 + random.random() / 2)
    return min(cap_s, delay)


def problem(response: httpx.Response) -> ProblemError:
    """The exception for an error response (its body read): the problem's members when it is
    problem+json, a generic problem otherwise (a proxy's HTML page)."""
    body: Any = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    cls = problem_class(response.status_code)
    if not isinstance(body, dict):
        reason = response.reason_phrase or "error"
        text = response.text.strip()[:200] if response.text else ""
        return cls(response.status_code, "about:blank", reason, text or reason, None, retry_after(response))
    known = {"type", "title", "detail", "status", "instance"}
    return cls(
        response.status_code,
        str(body.get("type") or "about:blank"),
        str(body.get("title") or response.reason_phrase),
        str(body.get("detail") or body.get("title") or response.reason_phrase),
        {k: v for k, v in body.items() if k not in known},
        retry_after(response),
    )


def is_problem(error: ProblemError, slug: str) -> bool:
    return error.type == PROBLEM_TYPE_BASE + slug


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event."""

    id: int | None
    type: str
    data: dict[str, Any]


class EventParser:
    """Server-Sent Events, line by line (``id``, ``event``, ``data``; comments and ``retry`` ignored)."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event that ``line`` completes, if it is the blank line that ends one."""
        if line == "":
            if not self._data:
                self._type = "message"
                return None
            try:
                data = json.loads("\n".join(self._data))
            except json.JSONDecodeError:
                data = {"text": "\n".join(self._data)}
            event = Event(self._id, self._type, data if isinstance(data, dict) else {"value": data})
            self._type, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            self._id = int(value) if value.isdigit() else self._id
        elif field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        return None

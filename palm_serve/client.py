"""Palm Serve over HTTP: :class:`Client` and its :class:`AsyncClient` twin (httpx underneath).

::

    from palm_serve import Client

    with Client("http://127.0.0.1:8000") as client:
        job = client.jobs.create("scenes/", name="north coast")
        job.wait(progress=True)
        job.geojson("palms.geojson")

Uploads stream from disk. Up to ``staged_above`` files go in one request; more use a staged job (files
in batches, then start), whose ``Idempotency-Key`` is derived from the files (names, sizes, modification
times) and the parameters: submitting the same folder again after an interruption finds the same job
and uploads only the files it does not have yet. ``429`` and ``503`` answers are retried after their
``Retry-After`` (or an exponential backoff), at most ``retries`` times; other error answers raise a
:class:`~palm_serve.errors.ProblemError` subclass carrying the problem's ``type``, ``title`` and
``detail``; no answer at all raises :class:`~palm_serve.errors.ServiceUnreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import httpx

from palm_serve import _wire
from palm_serve._wire import LocalFile, PathArg, PathsArg
from palm_serve.errors import (
    Conflict,
    IntegrityError,
    ProblemError,
    ServiceUnreachable,
)
from palm_serve.progress import Progress, ProgressDisplay

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
PredictFormat = Literal["json", "coco", "geojson"]
UploadCallback = Callable[[int, int], None]
"""Called with (files the job has, files to upload in all) after each upload request."""
ProgressArg = bool | Callable[[Progress], None]
_CHUNK = 1024 * 1024


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "palm-serve-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _unreachable(url: str, exc: httpx.TransportError) -> ServiceUnreachable:
    return ServiceUnreachable(f"cannot reach Palm Serve at {url}: {exc or type(exc).__name__}")


def _form(batch: Sequence[LocalFile], stack: contextlib.ExitStack) -> list[tuple[str, Any]]:
    return [
        ("files", (f.name, stack.enter_context(f.path.open("rb")), "application/octet-stream")) for f in batch
    ]


def _rewind(parts: list[tuple[str, Any]]) -> None:
    for _, (_, handle, _) in parts:
        handle.seek(0)


def _reporter(progress: ProgressArg) -> tuple[Callable[[Progress], None] | None, ProgressDisplay | None]:
    if progress is True:
        display = ProgressDisplay()
        return display.update, display
    if callable(progress):
        return progress, None
    return None, None


class _Download:
    """A result streamed to a temporary file beside ``target``, hashed on the way, renamed when whole."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
        self.file: IO[bytes] | None = None

    def __enter__(self) -> _Download:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.temporary.open("wb")
        return self

    def write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)
        self.hash.update(chunk)

    def finish(self, etag: str | None, expected: str | None) -> Path:
        assert self.file is not None
        self.file.close()
        digest = self.hash.hexdigest()
        for announced in (etag.strip('"') if etag else None, expected):
            if announced is not None and announced != digest:
                raise IntegrityError(
                    f"{self.target.name}: the download's sha256 is {digest}, "
                    f"the service announced {announced}"
                )
        os.replace(self.temporary, self.target)
        return self.target

    def __exit__(self, *exc: object) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        self.temporary.unlink(missing_ok=True)


# -- synchronous ------------------------------------------------------------------------------------


class Client:
    """Palm Serve, synchronously.

    Args:
        url: the service (``PALM_URL`` or ``http://127.0.0.1:8000`` when ``None``).
        api_key: sent as ``Authorization: Bearer <key>``.
        timeout: seconds for connecting and between bytes of an answer.
        retries: times a ``429`` or ``503`` answer is retried before it is raised.
        backoff_s: first retry delay when the service names none; doubles per retry.
        max_backoff_s: the longest wait between two tries.
        transport: an httpx transport instead of the network (tests).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("PALM_URL") or DEFAULT_URL).rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.http = httpx.Client(
            base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport
        )
        self.jobs = Jobs(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, *, rewind: Callable[[], object] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request, retrying ``429``/``503``; the answer's body is read.

        Raises:
            ProblemError: a subclass for the error answer.
            ServiceUnreachable: no answer.
        """
        with self.stream(method, path, rewind=rewind, **kwargs) as response:
            response.read()
            return response

    @contextlib.contextmanager
    def stream(
        self, method: str, path: str, *, rewind: Callable[[], object] | None = None, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """A successful answer whose body is not read yet (see :meth:`request`)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.http.stream(method, path, **kwargs) as response:
                    if response.is_success:
                        yield response
                        return
                    response.read()
                    error = _wire.problem(response)
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from exc
            if response.status_code not in _wire.RETRY_STATUSES or attempt > self.retries:
                raise error
            time.sleep(
                _wire.backoff_s(attempt, error.retry_after, base_s=self.backoff_s, cap_s=self.max_backoff_s)
            )
            if rewind is not None:
                rewind()

    def predict(
        self,
        path: PathArg,
        format: PredictFormat = "json",
        *,
        score_threshold: float | None = None,
        bands: str | None = None,
        resample: str | None = None,
        gsd: float | None = None,
    ) -> dict[str, Any]:
        """Detections in one image (``POST /v1/predict``), as the JSON document of ``format``.

        ``resample="off"`` reads the image as it is whatever its ground sample distance; ``gsd`` states
        the GSD (metres per pixel) of an image without georeferencing.
        """
        params = {
            "format": format,
            "score_threshold": score_threshold,
            "bands": bands,
            "resample": resample,
            "gsd": gsd,
        }
        local = Path(path)
        with local.open("rb") as handle:
            response = self.request(
                "POST",
                "/v1/predict",
                params={k: v for k, v in params.items() if v is not None},
                files={"file": (local.name, handle, "application/octet-stream")},
                rewind=lambda: handle.seek(0),
            )
        document: dict[str, Any] = response.json()
        return document


class Jobs:
    """``client.jobs``: bulk jobs."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        paths: PathsArg,
        *,
        staged_above: int = 200,
        batch_files: int = 100,
        batch_bytes: int = 512 * 1024**2,
        on_upload: UploadCallback | None = None,
        **params: Any,
    ) -> Job:
        """Upload files (a directory stands for its rasters) as a job and start it.

        Args:
            paths: a file, a directory, or several.
            staged_above: more files than this are uploaded as a staged job, in batches.
            batch_files: files per upload request of a staged job.
            batch_bytes: bytes per upload request of a staged job (a larger file goes alone).
            on_upload: called after each upload request with (files the job has, files in all).
            **params: ``name``, ``priority``, ``score_threshold``, ``bands``, ``resample``, ``gsd``,
                ``webhook_url``, ``webhook_secret``.

        Returns:
            The job; submitting the same files with the same parameters again returns the same job,
            after uploading the files it does not have yet (an interrupted upload resumes).

        Raises:
            ProblemError: the service refused the job (a subclass by status).
            ServiceUnreachable: no answer.
            FileNotFoundError, ValueError: the paths name no files, or two files with the same name.
        """
        files = _wire.collect(paths)
        fields = _wire.job_fields(params)
        key = _wire.submission_key(files, fields, staged=len(files) > staged_above)
        client = self._client
        if len(files) <= staged_above:
            with contextlib.ExitStack() as stack:
                parts = _form(files, stack)
                response = client.request(
                    "POST",
                    "/v1/jobs",
                    data=fields,
                    files=parts,
                    headers={"Idempotency-Key": key},
                    rewind=lambda: _rewind(parts),
                )
            if on_upload is not None:
                on_upload(len(files), len(files))
            return Job(client, response.json())
        created = client.request("POST", "/v1/jobs", json=fields, headers={"Idempotency-Key": key}).json()
        job = Job(client, created)
        if created["status"] != "created":
            return job
        have = {f["name"] for f in job.files()}
        missing = [f for f in files if f.name not in have]
        uploaded = len(files) - len(missing)
        if on_upload is not None:
            on_upload(uploaded, len(files))
        for batch in _wire.upload_batches(missing, batch_files, batch_bytes):
            self._add(job, batch, have)
            uploaded += len(batch)
            if on_upload is not None:
                on_upload(uploaded, len(files))
        with contextlib.suppress(Conflict):  # started by a concurrent submission of the same files
            client.request("POST", f"/v1/jobs/{job.id}/start")
        return job.refresh()

    def _add(self, job: Job, batch: Sequence[LocalFile], have: set[str]) -> None:
        try:
            with contextlib.ExitStack() as stack:
                parts = _form(batch, stack)
                self._client.request(
                    "POST", f"/v1/jobs/{job.id}/files", files=parts, rewind=lambda: _rewind(parts)
                )
        except Conflict:
            # Some of the batch arrived in an earlier try whose answer was lost: send the rest.
            have.update(f["name"] for f in job.files())
            rest = [f for f in batch if f.name not in have]
            if rest:
                with contextlib.ExitStack() as stack:
                    parts = _form(rest, stack)
                    self._client.request(
                        "POST", f"/v1/jobs/{job.id}/files", files=parts, rewind=lambda: _rewind(parts)
                    )

    def get(self, job_id: str) -> Job:
        return Job(self._client, self._client.request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, status: str | None = None, *, limit: int | None = None) -> Iterator[Job]:
        """Jobs newest first, page after page (``limit``: at most that many)."""
        cursor = None
        served = 0
        while True:
            params: dict[str, Any] = {"limit": 200 if limit is None else max(1, min(200, limit - served))}
            if status is not None:
                params["status"] = status
            if cursor is not None:
                params["cursor"] = cursor
            page = self._client.request("GET", "/v1/jobs", params=params).json()
            for item in page["jobs"]:
                yield Job(self._client, item)
                served += 1
                if limit is not None and served >= limit:
                    return
            cursor = page.get("next_cursor")
            if cursor is None:
                return

    def cancel(self, job_id: str) -> Job:
        return Job(self._client, self._client.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        self._client.request("DELETE", f"/v1/jobs/{job_id}")


class JobView:
    """A job as last seen: :attr:`data` is the service's resource."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.status}>"

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def progress(self) -> Progress:
        return Progress.of(self.data)

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The first failed files (all of them: :meth:`failed_files`)."""
        return list(self.data.get("errors") or [])

    @property
    def done(self) -> bool:
        """Ended, and its results written."""
        return self.status in TERMINAL and bool(self.data["results"]["ready"])


class Job(JobView):
    """A job, with what can be done to it."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        super().__init__(data)
        self._client = client

    def refresh(self) -> Job:
        self.data = self._client.request("GET", f"/v1/jobs/{self.id}").json()
        return self

    def files(self, *, failed_only: bool = False) -> Iterator[dict[str, Any]]:
        """The job's files in upload order (``failed_only``: its errors)."""
        cursor = 0
        path = f"/v1/jobs/{self.id}/{'errors' if failed_only else 'files'}"
        while True:
            page = self._client.request("GET", path, params={"cursor": cursor, "limit": 1000}).json()
            yield from page["files"]
            if page.get("next_cursor") is None:
                return
            cursor = int(page["next_cursor"])

    def failed_files(self) -> list[dict[str, Any]]:
        return list(self.files(failed_only=True))

    def cancel(self) -> Job:
        self.data = self._client.request("POST", f"/v1/jobs/{self.id}/cancel").json()
        return self

    def delete(self) -> None:
        self._client.request("DELETE", f"/v1/jobs/{self.id}")

    def wait(
        self, progress: ProgressArg = False, *, timeout: float | None = None, poll_s: float = 1.0
    ) -> Job:
        """Until the job has ended and its results are written, following its events (polling when the
        event stream is unavailable).

        Args:
            progress: ``True`` shows a bar (plain lines when standard output is not a terminal); a
                callable gets each :class:`~palm_serve.progress.Progress`.
            timeout: give up after this many seconds (``TimeoutError``).
            poll_s: polling interval when events are unavailable.
        """
        report, display = _reporter(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.refresh()
            if report is not None:
                report(self.progress)
            if not self.done:
                with contextlib.suppress(httpx.TransportError, ProblemError, ServiceUnreachable):
                    self._follow(report, deadline)
            while not self.refresh().done:
                if report is not None:
                    report(self.progress)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {self.status} after {timeout} s")
                time.sleep(poll_s)
        finally:
            if display is not None:
                display.close(self.progress)
        return self

    def _follow(self, report: Callable[[Progress], None] | None, deadline: float | None) -> None:
        parser = _wire.EventParser()
        read_s = 60.0 if deadline is None else max(1.0, min(60.0, deadline - time.monotonic()))
        with self._client.stream(
            "GET", f"/v1/jobs/{self.id}/events", timeout=httpx.Timeout(10.0, read=read_s)
        ) as response:
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is None:
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    continue
                if event.type == "progress" and report is not None:
                    report(Progress.of({"status": self.status, "progress": event.data}))
                elif event.type == "status":
                    self.data["status"] = event.data.get("status", self.status)
                    if event.data.get("results"):
                        return
                if deadline is not None and time.monotonic() > deadline:
                    return

    def results(self, path: PathArg) -> Path:
        """Download the COCO document to ``path``, checked against its sha256 (ETag).

        Raises:
            Conflict: the job has not ended yet.
            IntegrityError: the bytes received are not the document announced.
        """
        return self._download(f"/v1/jobs/{self.id}/results", Path(path), "sha256")

    def geojson(self, path: PathArg) -> Path:
        """Download the GeoJSON FeatureCollection to ``path``, checked against its sha256 (ETag)."""
        return self._download(f"/v1/jobs/{self.id}/results.geojson", Path(path), "geojson_sha256")

    def _download(self, url: str, target: Path, digest: str) -> Path:
        expected = (self.data.get("results") or {}).get(digest)
        with _Download(target) as download, self._client.stream("GET", url) as response:
            for chunk in response.iter_bytes(_CHUNK):
                download.write(chunk)
            return download.finish(response.headers.get("etag"), expected)


# -- asynchronous -----------------------------------------------------------------------------------


class AsyncClient:
    """Palm Serve from asyncio: the same methods as :class:`Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("PALM_URL") or DEFAULT_URL).rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport
        )
        self.jobs = AsyncJobs(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self, method: str, path: str, *, rewind: Callable[[], object] | None = None, **kwargs: Any
    ) -> httpx.Response:
        async with self.stream(method, path, rewind=rewind, **kwargs) as response:
            await response.aread()
            return response

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, *, rewind: Callable[[], object] | None = None, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.http.stream(method, path, **kwargs) as response:
                    if response.is_success:
                        yield response
                        return
                    await response.aread()
                    error = _wire.problem(response)
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from exc
            if response.status_code not in _wire.RETRY_STATUSES or attempt > self.retries:
                raise error
            await asyncio.sleep(
                _wire.backoff_s(attempt, error.retry_after, base_s=self.backoff_s, cap_s=self.max_backoff_s)
            )
            if rewind is not None:
                rewind()

    async def predict(
        self,
        path: PathArg,
        format: PredictFormat = "json",
        *,
        score_threshold: float | None = None,
        bands: str | None = None,
        resample: str | None = None,
        gsd: float | None = None,
    ) -> dict[str, Any]:
        params = {
            "format": format,
            "score_threshold": score_threshold,
            "bands": bands,
            "resample": resample,
            "gsd": gsd,
        }
        local = Path(path)
        with local.open("rb") as handle:
            response = await self.request(
                "POST",
                "/v1/predict",
                params={k: v for k, v in params.items() if v is not None},
                files={"file": (local.name, handle, "application/octet-stream")},
                rewind=lambda: handle.seek(0),
            )
        document: dict[str, Any] = response.json()
        return document


class AsyncJobs:
    """``client.jobs`` of an :class:`AsyncClient` (see :class:`Jobs`)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        paths: PathsArg,
        *,
        staged_above: int = 200,
        batch_files: int = 100,
        batch_bytes: int = 512 * 1024**2,
        on_upload: UploadCallback | None = None,
        **params: Any,
    ) -> AsyncJob:
        files = _wire.collect(paths)
        fields = _wire.job_fields(params)
        key = _wire.submission_key(files, fields, staged=len(files) > staged_above)
        client = self._client
        if len(files) <= staged_above:
            with contextlib.ExitStack() as stack:
                parts = _form(files, stack)
                response = await client.request(
                    "POST",
                    "/v1/jobs",
                    data=fields,
                    files=parts,
                    headers={"Idempotency-Key": key},
                    rewind=lambda: _rewind(parts),
                )
            if on_upload is not None:
                on_upload(len(files), len(files))
            return AsyncJob(client, response.json())
        created = (
            await client.request("POST", "/v1/jobs", json=fields, headers={"Idempotency-Key": key})
        ).json()
        job = AsyncJob(client, created)
        if created["status"] != "created":
            return job
        have = {f["name"] async for f in job.files()}
        missing = [f for f in files if f.name not in have]
        uploaded = len(files) - len(missing)
        if on_upload is not None:
            on_upload(uploaded, len(files))
        for batch in _wire.upload_batches(missing, batch_files, batch_bytes):
            await self._add(job, batch, have)
            uploaded += len(batch)
            if on_upload is not None:
                on_upload(uploaded, len(files))
        with contextlib.suppress(Conflict):  # started by a concurrent submission of the same files
            await client.request("POST", f"/v1/jobs/{job.id}/start")
        return await job.refresh()

    async def _add(self, job: AsyncJob, batch: Sequence[LocalFile], have: set[str]) -> None:
        try:
            with contextlib.ExitStack() as stack:
                parts = _form(batch, stack)
                await self._client.request(
                    "POST", f"/v1/jobs/{job.id}/files", files=parts, rewind=lambda: _rewind(parts)
                )
        except Conflict:
            have.update([f["name"] async for f in job.files()])
            rest = [f for f in batch if f.name not in have]
            if rest:
                with contextlib.ExitStack() as stack:
                    parts = _form(rest, stack)
                    await self._client.request(
                        "POST", f"/v1/jobs/{job.id}/files", files=parts, rewind=lambda: _rewind(parts)
                    )

    async def get(self, job_id: str) -> AsyncJob:
        return AsyncJob(self._client, (await self._client.request("GET", f"/v1/jobs/{job_id}")).json())

    async def list(self, status: str | None = None, *, limit: int | None = None) -> AsyncIterator[AsyncJob]:
        cursor = None
        served = 0
        while True:
            params: dict[str, Any] = {"limit": 200 if limit is None else max(1, min(200, limit - served))}
            if status is not None:
                params["status"] = status
            if cursor is not None:
                params["cursor"] = cursor
            page = (await self._client.request("GET", "/v1/jobs", params=params)).json()
            for item in page["jobs"]:
                yield AsyncJob(self._client, item)
                served += 1
                if limit is not None and served >= limit:
                    return
            cursor = page.get("next_cursor")
            if cursor is None:
                return

    async def cancel(self, job_id: str) -> AsyncJob:
        return AsyncJob(
            self._client, (await self._client.request("POST", f"/v1/jobs/{job_id}/cancel")).json()
        )

    async def delete(self, job_id: str) -> None:
        await self._client.request("DELETE", f"/v1/jobs/{job_id}")


class AsyncJob(JobView):
    """A job of an :class:`AsyncClient` (see :class:`Job`)."""

    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        super().__init__(data)
        self._client = client

    async def refresh(self) -> AsyncJob:
        self.data = (await self._client.request("GET", f"/v1/jobs/{self.id}")).json()
        return self

    async def files(self, *, failed_only: bool = False) -> AsyncIterator[dict[str, Any]]:
        cursor = 0
        path = f"/v1/jobs/{self.id}/{'errors' if failed_only else 'files'}"
        while True:
            page = (await self._client.request("GET", path, params={"cursor": cursor, "limit": 1000})).json()
            for item in page["files"]:
                yield item
            if page.get("next_cursor") is None:
                return
            cursor = int(page["next_cursor"])

    async def failed_files(self) -> list[dict[str, Any]]:
        return [f async for f in self.files(failed_only=True)]

    async def cancel(self) -> AsyncJob:
        self.data = (await self._client.request("POST", f"/v1/jobs/{self.id}/cancel")).json()
        return self

    async def delete(self) -> None:
        await self._client.request("DELETE", f"/v1/jobs/{self.id}")

    async def wait(
        self, progress: ProgressArg = False, *, timeout: float | None = None, poll_s: float = 1.0
    ) -> AsyncJob:
        report, display = _reporter(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await self.refresh()
            if report is not None:
                report(self.progress)
            if not self.done:
                with contextlib.suppress(httpx.TransportError, ProblemError, ServiceUnreachable):
                    await self._follow(report, deadline)
            while not (await self.refresh()).done:
                if report is not None:
                    report(self.progress)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {self.status} after {timeout} s")
                await asyncio.sleep(poll_s)
        finally:
            if display is not None:
                display.close(self.progress)
        return self

    async def _follow(self, report: Callable[[Progress], None] | None, deadline: float | None) -> None:
        parser = _wire.EventParser()
        read_s = 60.0 if deadline is None else max(1.0, min(60.0, deadline - time.monotonic()))
        async with self._client.stream(
            "GET", f"/v1/jobs/{self.id}/events", timeout=httpx.Timeout(10.0, read=read_s)
        ) as response:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    if event.type == "progress" and report is not None:
                        report(Progress.of({"status": self.status, "progress": event.data}))
                    elif event.type == "status":
                        self.data["status"] = event.data.get("status", self.status)
                        if event.data.get("results"):
                            return
                if deadline is not None and time.monotonic() > deadline:
                    return

    async def results(self, path: PathArg) -> Path:
        return await self._download(f"/v1/jobs/{self.id}/results", Path(path), "sha256")

    async def geojson(self, path: PathArg) -> Path:
        return await self._download(f"/v1/jobs/{self.id}/results.geojson", Path(path), "geojson_sha256")

    async def _download(self, url: str, target: Path, digest: str) -> Path:
        expected = (self.data.get("results") or {}).get(digest)
        async with self._client.stream("GET", url) as response:
            with _Download(target) as download:
                async for chunk in response.aiter_bytes(_CHUNK):
                    download.write(chunk)
                return download.finish(response.headers.get("etag"), expected)


__all__ = ["DEFAULT_URL", "AsyncClient", "AsyncJob", "AsyncJobs", "Client", "Job", "JobView", "Jobs"]

"""``Annotated`` dependency aliases: routes declare what they need, the app factory decides what it is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from gateway.admission import Admission, UploadPacer, is_large_upload
from gateway.auth.dependency import metrics_access, require_jobs, require_predict
from gateway.auth.principal import Principal
from gateway.errors import ClientClosedRequest, InvalidParameter, TemporarilyUnavailable
from gateway.jobs.engine import Jobs
from gateway.metrics import Metrics
from gateway.pipeline.result import ModelInfo
from gateway.predictor import Predictor
from gateway.serving import PEER_CLOSED
from gateway.settings import Settings

T = TypeVar("T")


class ReadinessProbe(Protocol):
    """Answers whether the model can take requests now (bounded time, never raises)."""

    async def model_ready(self) -> bool: ...


@dataclass(slots=True)
class Services:
    """Collaborators the app factory assembles; tests swap any of them."""

    settings: Settings
    metrics: Metrics
    model: ModelInfo
    predictor: Predictor
    readiness: ReadinessProbe
    admission: Admission
    uploads: Admission
    large_uploads: Admission | None = None
    pacer: UploadPacer | None = None
    jobs: Jobs | None = None
    triton_metrics_url: str | None = None

    @asynccontextmanager
    async def upload_slot(self, content_length: str | None) -> AsyncIterator[None]:
        """Room for one request body: a slot of ``uploads``, and of ``large_uploads`` too when the body
        is large (:func:`gateway.admission.is_large_upload`); :class:`Overloaded` when either is full."""
        large = self.large_uploads if is_large_upload(content_length) else None
        async with self.uploads.slot(), large.slot() if large is not None else contextlib.nullcontext():
            yield


PEER_CHECK_BYTES = 1 << 18
"""How much of a body :func:`body_stream` reads between two asks whether its client is still there."""


def _peer_closed(request: Request) -> Callable[[], bool] | None:
    check: Callable[[], bool] | None = request.scope.get("extensions", {}).get(PEER_CLOSED, {}).get("closed")
    return check


async def client_gone(request: Request) -> bool:
    """Whether the client has left. The connection itself is asked where the server offers it
    (:data:`gateway.serving.PEER_CLOSED`): a client that sends its upload and closes at once is gone
    before the server has read the end of the stream, so before it reports a disconnect."""
    peer_closed = _peer_closed(request)
    if peer_closed is not None and peer_closed():
        return True
    return await request.is_disconnected()


async def body_stream(request: Request, pacer: UploadPacer | None = None) -> AsyncIterator[bytes]:
    """``request.stream()``, ending in :class:`ClientDisconnect` as soon as the client has closed its
    end (asked every :data:`PEER_CHECK_BYTES`): the megabytes a departed client left in the kernel's
    buffers are then dropped unread instead of parsed and written to disk. With a ``pacer``, each
    chunk it paces waits its turn there before the next is read, once the client is known present."""
    peer_closed = _peer_closed(request)
    unchecked = 0
    read = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        yield chunk
        read += len(chunk)
        unchecked += len(chunk)
        paced = pacer is not None and pacer.paces(read)
        if peer_closed is not None and (paced or unchecked >= PEER_CHECK_BYTES):
            unchecked = 0
            if peer_closed():  # before waiting a turn: a departed client's turn would be wasted
                raise ClientDisconnect
        if paced and pacer is not None:
            await pacer.pace(read, len(chunk))


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` while watching the connection: if the client leaves first, ``work`` is cancelled
    (its decoding and inference calls with it) and :class:`ClientClosedRequest` is raised.

    Call once the request body has been read: the watcher consumes the connection's next event.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedRequest("the client closed the connection; its work was cancelled")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def get_services(request: Request) -> Services:
    # async although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker thread,
    # a thread hop on every request for one attribute lookup.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_jobs(request: Request) -> Jobs:
    services: Services = request.app.state.services
    if services.jobs is None:
        raise JobsUnavailable("this server runs without bulk jobs")
    return services.jobs


JobsDep = Annotated["Jobs", Depends(get_jobs)]

JobsPrincipal = Annotated[Principal, Depends(require_jobs)]
"""The caller, holding the ``jobs`` scope; its tenant owns the jobs a route may see."""
JobsAccess = Depends(require_jobs)
"""First in a router's ``dependencies``: 401/403 before anything else is looked at."""
PredictAccess = Depends(require_predict)
MetricsAccess = Depends(metrics_access)


async def reject_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not take (``?fromat=geojson`` is a typo, not a no-op).

    Raises:
        InvalidParameter: naming the unknown parameters and the ones the route accepts.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    accepted = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - accepted)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        known = ", ".join(sorted(accepted)) or "none"
        raise InvalidParameter(
            f"unknown query parameter {names}; {route.path} takes: {known}",
            unknown=unknown,
            accepted=sorted(accepted),
        )


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for child in dependant.dependencies:
        names |= _query_names(child)
    return names


StrictQuery = Depends(reject_unknown_query)
"""Add to a router's ``dependencies`` so its routes refuse unknown query parameters."""


class JobsUnavailable(TemporarilyUnavailable):
    slug = "jobs-unavailable"
    title = "Bulk jobs unavailable"

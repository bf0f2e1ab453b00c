"""How the API tells that a client has left: ``client_gone`` and ``body_stream`` over a real Starlette
request whose connection reports a close through the server's ``palm.peer_closed`` extension."""

from __future__ import annotations

import time
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request

from gateway.admission import Admission, UploadPacer
from gateway.api.deps import PEER_CHECK_BYTES, Services, body_stream, client_gone
from gateway.errors import Overloaded
from gateway.serving import PEER_CLOSED
from gateway.settings import Settings

CHUNK = 64 * 1024


class Connection:
    """A request body of ``chunks`` chunks arriving one ``receive`` at a time; ``closed`` is the peer's
    state as the kernel would report it."""

    def __init__(self, chunks: int) -> None:
        self.left = chunks
        self.received = 0
        self.closed = False

    async def receive(self) -> dict[str, Any]:
        self.left -= 1
        self.received += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": self.left > 0}

    def request(self, *, with_extension: bool = True) -> Request:
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}
        if with_extension:
            scope["extensions"] = {PEER_CLOSED: {"closed": lambda: self.closed}}
        return Request(scope, self.receive)


async def test_the_body_stops_being_read_once_the_client_has_closed() -> None:
    connection = Connection(chunks=160)  # 10 MiB

    async def read_all() -> None:
        read = 0
        async for chunk in body_stream(connection.request()):
            read += len(chunk)
            if read >= 1024 * 1024:
                connection.closed = True

    with pytest.raises(ClientDisconnect):
        await read_all()
    assert connection.received * CHUNK <= 1024 * 1024 + PEER_CHECK_BYTES
    assert connection.left > 100, "the rest of the body was read anyway"


async def test_a_present_client_gets_its_whole_body_through() -> None:
    connection = Connection(chunks=40)
    body = b"".join([chunk async for chunk in body_stream(connection.request())])
    assert len(body) == 40 * CHUNK


async def test_a_server_without_the_extension_streams_as_before() -> None:
    connection = Connection(chunks=40)
    connection.closed = True  # not visible without the extension
    body = b"".join([chunk async for chunk in body_stream(connection.request(with_extension=False))])
    assert len(body) == 40 * CHUNK


async def test_client_gone_asks_the_connection_before_any_disconnect_is_reported() -> None:
    connection = Connection(chunks=1)
    request = connection.request()
    _ = [chunk async for chunk in body_stream(request)]
    assert not await client_gone(request)
    connection.closed = True
    assert await client_gone(request)


async def test_a_departed_client_takes_no_turn_of_the_pace() -> None:
    pacer = UploadPacer(1024**2, lambda: True, free_bytes=0)  # 64 KiB chunks: 62 ms a turn
    connection = Connection(chunks=40)
    connection.closed = True

    async def read_all() -> None:
        async for _ in body_stream(connection.request(), pacer):
            pass

    started = time.perf_counter()
    with pytest.raises(ClientDisconnect):
        await read_all()
    assert time.perf_counter() - started < 0.05
    assert connection.received == 1


async def test_a_present_client_is_paced() -> None:
    pacer = UploadPacer(1024**2, lambda: True, free_bytes=0)
    connection = Connection(chunks=8)  # 512 KiB: half a second at 1 MiB/s
    started = time.perf_counter()
    _ = [chunk async for chunk in body_stream(connection.request(), pacer)]
    assert 0.35 < time.perf_counter() - started < 2


async def test_large_and_chunked_bodies_take_a_large_slot_and_give_both_back_when_refused() -> None:
    uploads, large = Admission(4), Admission(1, "uploads over 2 MiB or of unknown length")
    services = Services(
        settings=Settings(),
        metrics=None,  # type: ignore[arg-type]
        model=None,  # type: ignore[arg-type]
        predictor=None,  # type: ignore[arg-type]
        readiness=None,  # type: ignore[arg-type]
        admission=Admission(1),
        uploads=uploads,
        large_uploads=large,
    )
    async with services.upload_slot(None):  # chunked: of unknown length
        assert (uploads.active, large.active) == (1, 1)
        with pytest.raises(Overloaded, match="uploads over 2 MiB"):
            async with services.upload_slot(str(3 * 1024**2)):
                pass
        assert uploads.active == 1
        async with services.upload_slot("1000"):  # small bodies need no large slot
            assert (uploads.active, large.active) == (2, 1)
    assert (uploads.active, large.active) == (0, 0)

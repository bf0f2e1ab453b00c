"""How the API tells that a client has left: ``client_gone`` and ``body_stream`` over a real Starlette
request whose connection reports a close through the server's ``palm.peer_closed`` extension."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request

from gateway.api.deps import PEER_CHECK_BYTES, body_stream, client_gone
from gateway.serving import PEER_CLOSED

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


async def test_a_client_that_closed_after_its_body_is_gone_before_the_server_reads_the_end() -> None:
    connection = Connection(chunks=1)
    request = connection.request()
    _ = [chunk async for chunk in body_stream(request)]
    assert not await client_gone(request)
    connection.closed = True
    assert await client_gone(request)

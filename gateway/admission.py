"""Load shedding: a bounded number of requests of one kind at once, the rest refused at the door; and
a shared pace for large uploads while predictions are in progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.errors import Overloaded


class Admission:
    """Admits at most ``limit`` requests at once and refuses the rest at the door (no unbounded queue).

    Refusing early keeps latency bounded under overload: a client told to come back (503 +
    Retry-After) costs nothing, an upload queued behind hundreds of others costs disk and times out.
    """

    def __init__(self, limit: int, what: str = "requests") -> None:
        self.limit = limit
        self.what = what
        self.active = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} {self.what} are in progress (the limit is {self.limit}); retry shortly"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


LARGE_UPLOAD_BYTES = 2 * 1024**2
"""A body over this (or of unknown length) is a large upload: it needs a large-upload slot as well
(``max_concurrent_large_uploads``) and, past this many bytes, is paced while the model is busy."""

EMBEDDED_BUSY_UPLOAD_BYTES_PER_S = 64 * 1024**2
"""Upload pacing while busy when the model shares the gateway's cores (the embedded CPU Triton): over
twice what the model reads of DEFLATE scenes per second on 2 cores, so pacing never starves it."""


def is_large_upload(content_length: str | None) -> bool:
    """Whether a body of this declared ``Content-Length`` (``None``: chunked) is a large upload."""
    if content_length is None or not (content_length.isascii() and content_length.isdigit()):
        return True
    return int(content_length) > LARGE_UPLOAD_BYTES


class UploadPacer:
    """A budget of bytes per second shared by the large uploads read while ``busy()`` says that
    predictions are in progress (the app counts those of /v1/predict and /v1/quicklook; job files do
    not count).

    Reading an upload costs the gateway CPU (socket, multipart parsing, writing): about 2 ms per MB on
    a 2-core host whose model reads 25 MB of scene a second. When the model and the gateway share the
    cores, a client that floods large uploads (and perhaps leaves before the answer) would otherwise
    take the CPU that the predictions already admitted need. So once a body is past its first
    ``free_bytes``, each further chunk waits its turn at ``bytes_per_s`` in total while ``busy()``; with
    nothing in progress, uploads go at full speed. The turns are handed out in the order the chunks
    come, so paced uploads share the budget chunk by chunk. Waiting pauses the read, and TCP's flow
    control then slows the sender.

    A client that sent a large body and left cannot be told from a slow one while its bytes still
    queue in its kernel (the close comes after them), so paced uploads last longer and hold their
    slots longer: large uploads have slots of their own (``max_concurrent_large_uploads``) so that a
    flood of them is refused at the door and leaves the small ones theirs.
    """

    def __init__(
        self, bytes_per_s: float, busy: Callable[[], bool], free_bytes: int = LARGE_UPLOAD_BYTES
    ) -> None:
        self.bytes_per_s = bytes_per_s
        self.busy = busy
        self.free_bytes = free_bytes
        self._next_at = 0.0

    def paces(self, read: int) -> bool:
        """Whether a body of which ``read`` bytes are now in waits a turn before its next read."""
        return read > self.free_bytes and self.busy()

    async def pace(self, read: int, chunk: int) -> None:
        """Wait for the turn of the ``chunk`` bytes just read, ``read`` in all (call only when
        :meth:`paces`); the free bytes in the chunk take no turn."""
        paced = min(chunk, read - self.free_bytes)
        now = asyncio.get_running_loop().time()
        start = max(now, self._next_at)
        self._next_at = start + paced / self.bytes_per_s
        if start > now:
            await asyncio.sleep(start - now)

"""A blocking facade over :class:`~gateway.decode.pool.DecodePool` for scripts and benchmarks.

The pool runs on a private event loop in a background thread; calls block until it answers::

    with SyncDecodePool(settings.decode, settings.limits, tile_size=512) as pool:
        with pool.open(path, ReadOptions(bands=(3, 2, 1))) as session:
            for batch in session.batches(tile_grid(*session.info.read_size, 512, 128)):
                ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from gateway.decode.pool import DecodePool
from gateway.decode.session import DecodeSession, TileBatch
from gateway.pipeline.inputs import InputSummary
from gateway.pipeline.raster import RasterInfo, ReadOptions
from gateway.pipeline.tiling import TileSpec
from gateway.settings import DecodeSettings, LimitSettings

T = TypeVar("T")


class SyncDecodePool:
    """:class:`DecodePool` with blocking methods; arguments as for :class:`DecodePool`."""

    def __init__(self, settings: DecodeSettings, limits: LimitSettings | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="decode-pool", daemon=True)
        self._thread.start()
        self._pool: DecodePool = self._call(_build(settings, limits, kwargs))

    def __enter__(self) -> SyncDecodePool:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return self._pool.pids

    def start(self) -> None:
        self._call(self._pool.start())

    def close(self) -> None:
        """Stop the workers and the loop thread; idempotent."""
        if self._loop.is_closed():
            return
        self._call(self._pool.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def open(
        self, path: Path, options: ReadOptions | None = None, *, limits: LimitSettings | None = None
    ) -> SyncDecodeSession:
        """As :meth:`DecodePool.open`; use ``with pool.open(...) as session``."""
        return SyncDecodeSession(self, self._pool.open(path, options, limits=limits))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class SyncDecodeSession:
    """:class:`DecodeSession` with blocking methods."""

    def __init__(self, pool: SyncDecodePool, session: DecodeSession) -> None:
        self._pool = pool
        self._session = session

    def __enter__(self) -> SyncDecodeSession:
        self._pool._call(self._session.__aenter__())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._pool._call(self._session.__aexit__(exc_type, exc, tb))

    @property
    def info(self) -> RasterInfo:
        return self._session.info

    @property
    def skipped(self) -> int:
        return self._session.skipped

    @property
    def inputs(self) -> InputSummary | None:
        """The statistics of the tiles streamed, once :meth:`batches` is exhausted."""
        return self._session.inputs

    def batches(self, specs: Sequence[TileSpec], batch_size: int = 8) -> Iterator[TileBatch]:
        stream: AsyncIterator[TileBatch] = self._session.batches(specs, batch_size)
        while True:
            try:
                yield self._pool._call(_next(stream))
            except StopAsyncIteration:
                return


async def _build(
    settings: DecodeSettings, limits: LimitSettings | None, kwargs: dict[str, Any]
) -> DecodePool:
    return DecodePool(settings, limits, **kwargs)  # created on the loop that will run it


async def _next(stream: AsyncIterator[TileBatch]) -> TileBatch:
    return await stream.__anext__()

"""Isolated decoding: a pool of persistent worker processes that turn files into tile batches.

::

    gateway (asyncio)                                  worker process (one per pool slot)
    DecodePool.open(path) ── JSON request line ──────▶ open_raster(path) under RLIMIT_AS
    DecodeSession.info    ◀─ JSON frame ────────────── RasterInfo
    session.batches(...)  ── JSON request line ──────▶ reader.tiles(specs), batched
                                                       tiles written into a free shared-memory slot
    TileBatch             ◀─ frame naming the slot ─── (+ bool [n,512,512] masks on the pipe)
    batch.release()       ── free: the slot ─────────▶ the slot can be written again

Workers are started with ``python -m gateway.decode.worker`` (a fresh interpreter: never ``fork`` of the
threaded gateway), live across files, and each holds at most one open raster. A file that makes GDAL
or libtiff crash, exceed the worker's memory limit (``DecodeSettings.memory_limit_bytes``) or its time
budget (``DecodeSettings.file_timeout_s``, counted while the gateway waits on the worker, not while it
runs inference) fails *that file* with :class:`DecoderFailed`; the worker is killed if needed and
replaced in the background, and the pool keeps serving.

Pixels never cross the pipe: each worker owns a :class:`~gateway.decode.arena.TileRegion` of
``slots_per_worker`` slots in ``/dev/shm`` and writes a batch into a slot the gateway handed it. A
batch's ``pixels`` are a view of that slot, and ``shared`` tells the Triton client where it lies so the
server reads it in place. With ``zero_copy=True`` the consumer gives the slot back with
:meth:`TileBatch.release` once inference is done; otherwise the pool copies the pixels out and gives
the slot back at once.

Backpressure: a worker with no free slot waits for one, so at most ``slots_per_worker`` batches per
worker are decoded ahead of inference, whatever the image size. Sessions take a worker from the idle
queue: at most ``DecodeSettings.workers`` files decode at once and further requests wait their turn
(first come, first served).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.decode import protocol
from gateway.decode.arena import (
    SlotLease,
    TileRegion,
    new_pool_token,
    region_name,
    sweep_stale_regions,
)
from gateway.errors import DecoderFailed, GatewayError
from gateway.pipeline.raster import RasterInfo, ReadOptions
from gateway.pipeline.tiling import TILE_SIZE, TileSpec, tile_grid
from gateway.settings import DecodeSettings, LimitSettings, Settings
from gateway.shared_memory import SharedTiles

logger = logging.getLogger(__name__)

PIPE_BYTES: Final = 1024 * 1024
"""Capacity of each worker's output pipe (frames and validity masks; pixels go through shared memory)."""
_F_SETPIPE_SZ: Final = 1031
CONTROL_TIMEOUT_S: Final = 10.0
"""Deadline for protocol housekeeping (close, cancel) before a worker is declared stuck."""
WORKER_ENV: Final = {
    # Address space is the worker's budget: no BLAS/OpenMP thread pools, few malloc arenas.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}


@dataclass(frozen=True, slots=True)
class TileBatch:
    """Up to ``batch_size`` decoded tiles, in row-major order of their windows.

    Attributes:
        specs: the windows, one per tile.
        pixels: ``uint8 [n, 3, 512, 512]`` RGB, channel-first, C-contiguous. With ``zero_copy`` a view
            of a shared-memory slot, valid until :meth:`release`.
        valid: ``bool [n, 512, 512]`` (False for padding, nodata, alpha 0, masked), or ``None`` when
            every pixel of every tile in the batch is valid.
        shared: where ``pixels`` lie in shared memory (``zero_copy`` only), for the Triton client.
        lease: the hold on that slot (``zero_copy`` only).
    """

    specs: tuple[TileSpec, ...]
    pixels: npt.NDArray[np.uint8]
    valid: npt.NDArray[np.bool_] | None
    shared: SharedTiles | None = None
    lease: SlotLease | None = None

    def release(self) -> None:
        """Nothing reads ``pixels`` any more: the worker may reuse the slot. Idempotent."""
        if self.lease is not None:
            self.lease.release()

    def quarantine(self, delay_s: float) -> None:
        """Someone (a cancelled Triton call) may still read the slot: reuse it only after ``delay_s``."""
        if self.lease is not None:
            self.lease.quarantine(delay_s)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """Tiles to stream as soon as the file is open, asked for in the same breath as ``open``.

    The worker cuts ``tile_grid(width, height, tile, overlap)`` itself, balances ``batch_size`` over it
    (:func:`~gateway.pipeline.tiling.balanced_batch`) and sends a first batch of ``first_batch`` tiles
    so inference can start while the rest decodes. Saves the round trip between ``info`` and the first
    tiles request.
    """

    tile: int
    overlap: int
    batch_size: int = 8
    first_batch: int | None = None


class _WorkerLost(Exception):
    """The worker died, hung, or broke the protocol; the session cannot continue on it."""

    def __init__(self, failure: DecoderFailed) -> None:
        super().__init__(failure.detail)
        self.failure = failure


class _Worker:
    """One worker process: requests on its stdin, frames read from its stdout pipe, tiles in ``region``."""

    def __init__(self, process: asyncio.subprocess.Process, frames_fd: int, region: TileRegion) -> None:
        self.process = process
        self.pid = process.pid
        assert process.stdin is not None
        self.stdin = process.stdin
        self.frames = _PipeReader(frames_fd)
        self.region = region

    def give_back(self, slots: list[int]) -> None:
        """Tell the worker it may write ``slots`` again (no-op once it is gone: its successor starts
        with every slot that is not leased)."""
        if self.alive and slots and not self.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.stdin.write(protocol.request("free", slots=slots))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def send(self, data: bytes) -> None:
        self.stdin.write(data)
        await self.stdin.drain()

    async def receive(self, max_payload: int) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
        """The next frame: its metadata and its payload (read straight into a fresh array).

        Raises:
            EOFError: the worker's output ended (it exited or crashed).
            ValueError: the frame is malformed or larger than asked for.
        """
        header = bytearray(protocol.HEADER.size)
        await self.frames.readinto(memoryview(header))
        meta_length, payload_length = protocol.HEADER.unpack(header)
        if meta_length > protocol.MAX_META_BYTES or payload_length > max_payload:
            raise ValueError(f"oversized frame ({meta_length} + {payload_length} bytes)")
        body = bytearray(meta_length)
        await self.frames.readinto(memoryview(body))
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError("frame metadata is not an object")
        payload = np.empty(payload_length, np.uint8)
        if payload_length:
            await self.frames.readinto(payload.data)
        return meta, payload

    async def stop(self, grace_s: float = 2.0) -> None:
        """Close its input (it exits at end of input), then kill it if it lingers."""
        if self.alive:
            with contextlib.suppress(OSError, RuntimeError):
                self.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                self.kill()
        await self.reap()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def reap(self) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5.0)
        if not self.alive:
            self.frames.close()
        return self.process.returncode


class _PipeReader:
    """Reads a worker's output pipe straight into caller buffers (one copy, no stream buffer).

    Nothing is read until a frame is asked for, so a worker that is ahead of its consumer blocks on a
    full pipe: that is the backpressure.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view`` completely.

        Raises:
            EOFError: the pipe closed first.
        """
        loop = asyncio.get_running_loop()
        while view.nbytes:
            try:
                count = os.readv(self.fd, [view])
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(self.fd, readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(self.fd)
                continue
            if count == 0:
                raise EOFError("the worker's output ended")
            view = view[count:]

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class DecodePool:
    """Persistent decode worker processes behind a bounded queue.

    Use as ``async with DecodePool(settings.decode, settings.limits) as pool`` or call :meth:`start` and
    :meth:`close`. Create and use it on one event loop.

    Args:
        settings: worker count, memory limit and per-file time budget.
        limits: default size budgets for :meth:`open`.
        worker_command: argv that starts a worker (default ``python -m gateway.decode.worker``); the
            pool appends ``--memory-limit``, ``--parent-pid`` and the region arguments. Tests pass a
            worker that crashes on purpose.
        slot_tiles: tiles per shared-memory slot: the largest batch a session streams (normally
            ``TritonSettings.batch_size``).
        slots_per_worker: batches per worker that may be decoded or at inference at once (normally
            ``TritonSettings.max_inflight + 2``: one being written, one being handed over).
    """

    def __init__(
        self,
        settings: DecodeSettings,
        limits: LimitSettings | None = None,
        *,
        worker_command: Sequence[str] | None = None,
        slot_tiles: int = 8,
        slots_per_worker: int = 4,
    ) -> None:
        self.settings = settings
        self.limits = limits or LimitSettings()
        self.slot_tiles = max(1, slot_tiles)
        self.slots_per_worker = max(2, slots_per_worker)
        self._regions: list[TileRegion] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._command = list(worker_command or [sys.executable, "-m", "gateway.decode.worker"])
        # Last in, first out: the worker that finished most recently has the warmest caches.
        self._idle: asyncio.Queue[_Worker] = asyncio.LifoQueue()
        self._workers: set[_Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    @classmethod
    def for_settings(cls, settings: Settings) -> DecodePool:
        """The pool the service runs: slots sized for ``settings.triton``'s batches and in-flight calls."""
        return cls(
            settings.decode,
            settings.limits,
            slot_tiles=settings.triton.batch_size,
            slots_per_worker=settings.triton.max_inflight + 2,
        )

    async def __aenter__(self) -> DecodePool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return sorted(w.pid for w in self._workers if w.alive)

    async def start(self) -> None:
        """Start every worker and wait until each is ready.

        Raises:
            SharedMemoryUnavailable: ``/dev/shm`` cannot hold the workers' tile regions.
            RuntimeError: a worker could not be started (its stderr is in the log).
        """
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        sweep_stale_regions()
        token = new_pool_token()
        try:
            for index in range(self.settings.workers):
                self._regions.append(
                    TileRegion(region_name(token, index), self.slots_per_worker, self.slot_tiles)
                )
        except BaseException:
            await self.close()
            raise
        workers = await asyncio.gather(*(self._spawn(r) for r in self._regions), return_exceptions=True)
        failures = [w for w in workers if isinstance(w, BaseException)]
        for worker in workers:
            if isinstance(worker, _Worker):
                self._idle.put_nowait(worker)
        if failures:
            await self.close()
            raise RuntimeError(f"decode workers failed to start: {failures[0]}") from failures[0]

    async def close(self) -> None:
        """Stop every worker (idle or busy) and the replacements being started; idempotent."""
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        workers = list(self._workers)
        self._workers.clear()
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for region in self._regions:
            region.close()

    def open(
        self,
        path: Path,
        options: ReadOptions | None = None,
        *,
        limits: LimitSettings | None = None,
        plan: StreamPlan | None = None,
    ) -> DecodeSession:
        """A session decoding ``path``: ``async with pool.open(path, options) as session``.

        Entering it waits for a free worker, opens the file there and fills :attr:`DecodeSession.info`.

        Args:
            path: a local file (the worker reads it; the gateway never opens rasters itself).
            options: band mapping, pixel limit and allowed formats.
            limits: size budgets; the pool's by default.
            plan: start streaming this tile grid right after opening (then call ``batches()`` with no
                specs).

        Raises:
            GatewayError: on entering the session, the subclass that
                :func:`~gateway.pipeline.raster.open_raster` raises for the file, or
                :class:`DecoderFailed` when the worker crashed, ran out of memory or time.
        """
        return DecodeSession(self, Path(path), options or ReadOptions(), limits or self.limits, plan)

    # -- worker lifecycle ---------------------------------------------------------------------------

    async def _spawn(self, region: TileRegion) -> _Worker:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # fewer wake-ups per batch than the default 64 KiB
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, PIPE_BYTES)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                "--memory-limit",
                str(self.settings.memory_limit_bytes),
                "--parent-pid",
                str(os.getpid()),
                "--region",
                region.name,
                "--slots",
                str(region.slots),
                "--slot-tiles",
                str(region.slot_tiles),
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fd,
                env={**os.environ, **WORKER_ENV},
                start_new_session=True,  # a terminal's Ctrl-C reaches the gateway, which stops workers
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = _Worker(process, read_fd, region)
        self._workers.add(worker)
        try:
            meta, _ = await asyncio.wait_for(worker.receive(0), timeout=60.0)
            if meta.get("kind") != "ready":
                raise RuntimeError(f"unexpected first message {meta.get('kind')!r}")
        except BaseException as exc:
            worker.kill()
            await worker.reap()
            self._workers.discard(worker)
            if isinstance(exc, (EOFError, TimeoutError, ValueError)):
                raise RuntimeError(
                    f"decode worker exited during start ({worker.process.returncode})"
                ) from exc
            raise
        # In one step (no await): the new worker holds every slot that is not leased, and every slot
        # released from now on goes to it.
        region.give_back = functools.partial(self._give_back, worker)
        worker.give_back(region.free_slots())
        logger.debug("decode worker %d ready", worker.pid)
        return worker

    def _give_back(self, worker: _Worker, slots: list[int]) -> None:
        """Slots released by a consumer, possibly on another thread (the sync facade, a finalizer)."""
        if threading.get_ident() == self._loop_thread:
            worker.give_back(slots)
        elif self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(worker.give_back, slots)

    async def _acquire(self) -> _Worker:
        if self._closed or not self._started:
            raise RuntimeError("the decode pool is not running (call start() first)")
        while True:
            worker = await self._idle.get()
            if worker.alive and worker in self._workers:
                return worker
            self._retire(worker)

    def _release(self, worker: _Worker) -> None:
        if self._closed or not worker.alive:
            self._retire(worker)
        else:
            self._idle.put_nowait(worker)

    def _retire(self, worker: _Worker) -> None:
        """Kill ``worker`` (if alive) and start a replacement in the background."""
        worker.kill()
        if worker in self._workers:
            self._workers.discard(worker)
            if not self._closed:
                task = asyncio.create_task(self._replace(worker))
                self._spawning.add(task)
                task.add_done_callback(self._spawning.discard)

    async def _replace(self, old: _Worker) -> None:
        await old.reap()
        delay = 0.5
        while not self._closed:
            try:
                worker = await self._spawn(old.region)
            except RuntimeError:
                logger.exception("decode worker replacement failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closed:
                await worker.stop()
                self._workers.discard(worker)
                return
            logger.info("decode worker %d replaced by %d", old.pid, worker.pid)
            self._idle.put_nowait(worker)
            return


class DecodeSession:
    """One file on one worker: :attr:`info`, then :meth:`batches`, then :attr:`skipped`.

    Create with :meth:`DecodePool.open`; use as an async context manager, which returns the worker to
    the pool (or replaces it) on exit, even when the batches were not all consumed.
    """

    def __init__(
        self,
        pool: DecodePool,
        path: Path,
        options: ReadOptions,
        limits: LimitSettings,
        plan: StreamPlan | None = None,
    ) -> None:
        self._pool = pool
        self._plan = plan
        self._path = path
        self._options = options
        self._limits = limits
        self._worker: _Worker | None = None
        self._budget_s = pool.settings.file_timeout_s
        self._used_s = 0.0
        # new → open → streaming → open ... → closed; "planned" = a stream requested with open, not yet
        # consumed; broken on any loss.
        self._state = "new"
        self._info: RasterInfo | None = None
        self.skipped = 0
        """Tiles skipped because none of their pixels is valid (final once :meth:`batches` ends)."""

    @property
    def info(self) -> RasterInfo:
        """How the file was opened and will be read."""
        if self._info is None:
            raise RuntimeError("the session is not open")
        return self._info

    async def __aenter__(self) -> DecodeSession:
        self._worker = await self._pool._acquire()
        self._state = "open"
        try:
            requests = protocol.request(
                "open",
                path=str(self._path.absolute()),
                options=protocol.options_to_wire(self._options),
                limits=self._limits.model_dump(),
            )
            if self._plan is not None:
                plan = self._plan
                requests += protocol.request(
                    "tiles",
                    grid=[plan.tile, plan.overlap],
                    batch_size=plan.batch_size,
                    first_batch=plan.first_batch,
                )
            await self._send(requests)  # one write: the worker wakes once for both
            meta, _ = await self._receive(0)
            if meta.get("kind") == "error":
                raise self._failed(meta)
            if meta.get("kind") != "info":
                raise self._lost(f"unexpected reply {meta.get('kind')!r} to open")
            self._info = protocol.info_from_wire(meta["info"])
            if self._plan is not None:
                self._state = "planned"
        except _WorkerLost as exc:
            await self._finish()
            raise exc.failure from None
        except BaseException:
            await self._finish()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._finish()

    def batches(
        self, specs: Sequence[TileSpec] | None = None, batch_size: int = 8, *, zero_copy: bool = False
    ) -> AsyncIterator[TileBatch]:
        """Stream the tiles of ``specs`` in batches of up to ``batch_size`` (at most the pool's
        ``slot_tiles``).

        With a :class:`StreamPlan` given to :meth:`DecodePool.open`, call it without ``specs``: the
        tiles are the plan's grid, already on their way. Fully masked tiles are skipped (see
        :attr:`skipped`). Call once per session.

        With ``zero_copy`` each batch's pixels are a view of its shared-memory slot and the consumer
        must call :meth:`TileBatch.release` (or :meth:`TileBatch.quarantine`) when done with it; the
        worker waits once all its slots are held. Otherwise the pixels are copied out and the slot is
        given back at once.

        Raises:
            CorruptRaster: while iterating, when a block cannot be decoded.
            DecoderFailed: the worker crashed, ran out of memory, or the file's time budget ran out.
        """
        if self._state == "planned":
            if specs is not None:
                raise RuntimeError("this session streams its plan's grid; call batches() without specs")
            assert self._plan is not None
            grid = tile_grid(self.info.width, self.info.height, self._plan.tile, self._plan.overlap)
            return self._stream(grid, self._batch_limit(self._plan.batch_size), zero_copy, requested=True)
        if self._state != "open":
            raise RuntimeError(f"batches() needs an open session, not a {self._state} one")
        if specs is None:
            raise RuntimeError("batches() needs specs when the session was opened without a plan")
        return self._stream(list(specs), self._batch_limit(batch_size), zero_copy, requested=False)

    def _batch_limit(self, batch_size: int) -> int:
        return max(1, min(batch_size, self._pool.slot_tiles))

    async def _stream(
        self, specs: list[TileSpec], batch_size: int, zero_copy: bool, *, requested: bool
    ) -> AsyncIterator[TileBatch]:
        self._state = "streaming"
        max_payload = batch_size * protocol.TILE_MASK_BYTES
        try:
            if not requested:
                await self._send(
                    protocol.request(
                        "tiles", specs=[protocol.spec_to_wire(s) for s in specs], batch_size=batch_size
                    )
                )
            while True:
                meta, payload = await self._receive(max_payload)
                kind = meta.get("kind")
                if kind == "batch":
                    yield self._batch(meta, payload, specs, batch_size, zero_copy)
                elif kind == "end":
                    self.skipped = int(meta.get("skipped", 0))
                    self._state = "open"
                    return
                elif kind == "error":
                    self._state = "open" if not meta.get("recycle") else "broken"
                    raise self._failed(meta)
                else:
                    raise self._lost(f"unexpected reply {kind!r} while streaming")
        except _WorkerLost as exc:
            raise exc.failure from None

    def _batch(
        self,
        meta: dict[str, Any],
        payload: npt.NDArray[np.uint8],
        specs: list[TileSpec],
        batch_size: int,
        zero_copy: bool,
    ) -> TileBatch:
        assert self._worker is not None
        region = self._worker.region
        slot = _announced_slot(meta, region)
        if slot is None:
            raise self._lost("batch names a slot the worker does not hold")
        indices = meta.get("indices")
        if not isinstance(indices, list) or not 0 < len(indices) <= batch_size:
            raise self._lost("malformed batch")
        if not all(isinstance(i, int) and 0 <= i < len(specs) for i in indices):
            raise self._lost("batch names unknown tiles")
        n = len(indices)
        masked = bool(meta.get("valid"))
        expected = n * protocol.TILE_MASK_BYTES if masked else 0
        if len(payload) != expected:
            raise self._lost(f"batch of {n} tiles carries {len(payload)} bytes, expected {expected}")
        valid = payload.view(np.bool_).reshape(n, TILE_SIZE, TILE_SIZE) if masked else None
        chosen = tuple(specs[i] for i in indices)
        if not zero_copy:
            pixels = region.pixels(slot, n).copy()
            _give_back_unused(region, slot)
            return TileBatch(chosen, pixels, valid)
        return TileBatch(chosen, region.pixels(slot, n), valid, region.shared(slot, n), region.lease(slot))

    # -- plumbing -----------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        assert self._worker is not None
        try:
            await self._worker.send(data)
        except (ConnectionError, OSError) as exc:
            raise await self._lost_worker("its input pipe closed") from exc

    async def _receive(self, max_payload: int) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
        """The next frame, charging the wait to the file's time budget."""
        assert self._worker is not None
        remaining = self._budget_s - self._used_s
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await self._worker.receive(max_payload)
        except TimeoutError:
            self._state = "broken"
            self._worker.kill()
            raise _WorkerLost(
                DecoderFailed(
                    f"Decoding this file took longer than its {self._budget_s:g} s budget; it was stopped.",
                    cause="timeout",
                )
            ) from None
        except EOFError as exc:
            raise await self._lost_worker("its output ended") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._lost(f"malformed frame: {exc}") from exc
        except asyncio.CancelledError:
            self._state = "broken"  # a frame may be half read: the stream cannot be trusted
            raise
        finally:
            self._used_s += time.monotonic() - started

    async def _lost_worker(self, what: str) -> _WorkerLost:
        assert self._worker is not None
        self._state = "broken"
        code = await self._worker.reap()
        return _WorkerLost(DecoderFailed(_describe_exit(code, self._pool.settings), cause=_cause(code)))

    def _lost(self, what: str) -> _WorkerLost:
        self._state = "broken"
        if self._worker is not None:
            logger.error("decode worker %d broke the protocol: %s", self._worker.pid, what)
            self._worker.kill()
        return _WorkerLost(DecoderFailed("The decoder sent malformed data for this file.", cause="protocol"))

    def _failed(self, meta: dict[str, Any]) -> GatewayError:
        if meta.get("recycle"):
            self._state = "broken"
        return protocol.error_from_wire(meta)

    async def _finish(self) -> None:
        """Bring the worker back to idle (cancel, drain, close) or retire it; never raises."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        state, self._state = self._state, "closed"
        healthy = state in ("open", "planned", "streaming") and worker.alive
        if healthy:
            try:
                async with asyncio.timeout(CONTROL_TIMEOUT_S):
                    if state in ("planned", "streaming"):
                        await self._drain(worker)
                    worker.stdin.write(protocol.request("close"))
                    await worker.stdin.drain()
                    while True:
                        meta, _ = await worker.receive(_MAX_DRAIN_PAYLOAD)
                        if meta.get("kind") == "closed":
                            break
            except (Exception, asyncio.CancelledError) as exc:
                logger.warning("decode worker %d did not close cleanly: %r", worker.pid, exc)
                healthy = False
                if isinstance(exc, asyncio.CancelledError):
                    self._pool._retire(worker)
                    raise
        if healthy:
            self._pool._release(worker)
        else:
            self._pool._retire(worker)

    async def _drain(self, worker: _Worker) -> None:
        """Cancel a stream the consumer left early and discard what is in flight."""
        worker.stdin.write(protocol.request("cancel"))
        await worker.stdin.drain()
        while True:
            meta, _ = await worker.receive(_MAX_DRAIN_PAYLOAD)
            if meta.get("kind") == "batch":
                slot = _announced_slot(meta, worker.region)
                if slot is not None:
                    _give_back_unused(worker.region, slot)
            if meta.get("kind") == "end" and meta.get("cancelled"):
                return
            if meta.get("kind") == "error" and meta.get("recycle"):
                raise RuntimeError("worker recycled while cancelling")


_MAX_DRAIN_PAYLOAD: Final = 64 * protocol.TILE_MASK_BYTES


def _announced_slot(meta: dict[str, Any], region: TileRegion) -> int | None:
    """The slot a batch frame names, if it is one the worker may have written (not leased by us)."""
    slot = meta.get("slot")
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < region.slots:
        return None
    if slot in region.leased or slot in region.quarantined:
        return None
    return slot


def _give_back_unused(region: TileRegion, slot: int) -> None:
    if region.give_back is not None:
        region.give_back([slot])


def _cause(code: int | None) -> str:
    if code is not None and code < 0:
        return "memory" if -code == signal.SIGKILL else "crash"
    return "crash"


def _describe_exit(code: int | None, settings: DecodeSettings) -> str:
    if code is None:
        return "The decoder stopped responding while reading this file."
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return (
                "The decoder was killed while reading this file (SIGKILL), most likely for using more "
                f"than its {settings.memory_limit_bytes / 1024**3:.1f} GiB memory limit."
            )
        what = {
            "SIGSEGV": "crashed (SIGSEGV, a memory fault)",
            "SIGABRT": "aborted (SIGABRT)",
            "SIGBUS": "crashed (SIGBUS)",
            "SIGFPE": "crashed (SIGFPE)",
            "SIGILL": "crashed (SIGILL)",
        }.get(name, f"died of {name}")
        return (
            f"The decoder {what} while reading this file; the file is probably corrupt or hostile. "
            "Other files are unaffected."
        )
    return f"The decoder exited (status {code}) while reading this file."

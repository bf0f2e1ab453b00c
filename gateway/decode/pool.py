"""Isolated decoding: a pool of persistent worker processes that turn files into tile batches.

::

    gateway (asyncio)                                  worker process (one per pool slot)
    DecodePool.open(path) ── JSON request line ──────▶ open_raster(path) under RLIMIT_AS
    DecodeSession.info    ◀─ JSON frame ────────────── RasterInfo
    session.batches(...)  ── JSON request line ──────▶ reader.tiles(specs), batched
                                                       tiles written into a free shared-memory slot
    TileBatch             ◀─ frame naming the slot ─── (+ bool [n,S,S] masks on the pipe)
    batch.release()       ── free: the slot ─────────▶ the slot can be written again

Three modules: :mod:`gateway.decode.process` (one worker process: spawn, pipes, stop), this one (the
pool: start, close, idle workers, replacement of lost ones) and :mod:`gateway.decode.session` (one file
on one worker, and the batches it yields).

Workers are started with ``python -m gateway.decode.worker`` (a fresh interpreter: never ``fork`` of the
threaded gateway), live across files, and each holds at most one open raster. A file that makes GDAL
or libtiff crash, exceed the worker's memory limit (``DecodeSettings.memory_limit_bytes``) or its time
budget (``DecodeSettings.file_timeout_s``, counted while the gateway waits on the worker, not while it
runs inference) fails *that file* with :class:`~gateway.errors.DecoderFailed`; the worker is killed if
needed and replaced in the background, and the pool keeps serving.

Pixels never cross the pipe: each worker owns a :class:`~gateway.decode.arena.TileRegion` of
``slots_per_worker`` slots in ``/dev/shm`` and writes a batch into a slot the gateway handed it. A
batch's ``pixels`` are a view of that slot, and ``shared`` tells the Triton client where it lies so the
server reads it in place. With ``zero_copy=True`` the consumer gives the slot back with
:meth:`~gateway.decode.session.TileBatch.release` once inference is done; otherwise the pool copies the
pixels out and gives the slot back at once.

Backpressure: a worker with no free slot waits for one, so at most ``slots_per_worker`` batches per
worker are decoded ahead of inference, whatever the image size. Sessions lease a worker from the idle
queue (:meth:`DecodePool.acquire` returns a :class:`WorkerLease`): at most ``DecodeSettings.workers``
files decode at once and further requests wait their turn. A session ends its lease with
:meth:`WorkerLease.release` (the worker is in step: back to the idle queue) or
:meth:`WorkerLease.retire` with a reason (the worker is killed and a replacement started).

Priority lanes: each lease is taken at a :class:`~gateway.scheduling.Priority` through a
:class:`~gateway.scheduling.PriorityLimiter` with one permit per worker. Online sessions are served
before batch (job) ones, first come first served within a lane, and batch sessions hold at most
``workers - DecodeSettings.reserved_online_workers`` workers (at least one), so an online request finds
a worker free while a job runs. A permit stands for a worker that can be leased: it is given back when
the worker is back in the idle queue, and a retired worker's permit only once its replacement is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from gateway.decode.arena import TileRegion, new_pool_token, region_name, sweep_stale_regions
from gateway.decode.process import WorkerProcess, exit_status
from gateway.decode.session import DecodeSession, StreamPlan
from gateway.pipeline.contract import ModelContract
from gateway.pipeline.raster import ReadOptions
from gateway.scheduling import Priority, PriorityLimiter
from gateway.settings import DecodeSettings, LimitSettings, Settings

logger = logging.getLogger(__name__)


class DecodePool:
    """Persistent decode worker processes behind a bounded queue.

    Use as ``async with DecodePool(settings.decode, settings.limits, tile_size=512) as pool`` or call
    :meth:`start` and :meth:`close`. Create and use it on one event loop.

    Args:
        settings: worker count, workers reserved for online sessions, memory limit and per-file time
            budget.
        limits: default size budgets for :meth:`open`.
        tile_size: the side of the tiles the workers cut (the served model's ``S``); it sizes the
            shared-memory slots, and every session's tiles must have it.
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
        tile_size: int,
        worker_command: Sequence[str] | None = None,
        slot_tiles: int = 8,
        slots_per_worker: int = 4,
    ) -> None:
        self.settings = settings
        self.limits = limits or LimitSettings()
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size = tile_size
        self.slot_tiles = max(1, slot_tiles)
        self.slots_per_worker = max(2, slots_per_worker)
        self._regions: list[TileRegion] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._command = list(worker_command or [sys.executable, "-m", "gateway.decode.worker"])
        # Last in, first out: the worker that finished most recently has the warmest caches.
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.LifoQueue()
        self._lanes = PriorityLimiter(settings.workers, reserved=settings.reserved_online_workers)
        self._workers: set[WorkerProcess] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    @classmethod
    def for_settings(cls, settings: Settings, contract: ModelContract) -> DecodePool:
        """The pool the service runs: slots sized for the model's tiles and ``settings.triton``'s batches
        and in-flight calls."""
        return cls(
            settings.decode,
            settings.limits,
            tile_size=contract.tile_size,
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
                    TileRegion(
                        region_name(token, index),
                        self.slots_per_worker,
                        self.slot_tiles,
                        tile_size=self.tile_size,
                    )
                )
        except BaseException:
            await self.close()
            raise
        workers = await asyncio.gather(*(self._spawn(r) for r in self._regions), return_exceptions=True)
        failures = [w for w in workers if isinstance(w, BaseException)]
        for worker in workers:
            if isinstance(worker, WorkerProcess):
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
        priority: Priority = Priority.ONLINE,
    ) -> DecodeSession:
        """A session decoding ``path``: ``async with pool.open(path, options) as session``.

        Entering it waits for a free worker (see :meth:`acquire` for who goes first), opens the file
        there and fills :attr:`DecodeSession.info`.

        Args:
            path: a local file (the worker reads it; the gateway never opens rasters itself).
            options: band mapping, pixel limit and allowed formats.
            limits: size budgets; the pool's by default.
            plan: start streaming this tile grid right after opening (then call ``batches()`` with no
                specs); its tile side must be the pool's.
            priority: the session's lane: :attr:`Priority.ONLINE` for a caller waiting on the answer,
                :attr:`Priority.BATCH` for a job's file.

        Raises:
            ValueError: ``plan`` cuts tiles of another side than the pool's.
            GatewayError: on entering the session, the subclass that
                :func:`~gateway.pipeline.raster.open_raster` raises for the file, or
                :class:`~gateway.errors.DecoderFailed` when the worker crashed, ran out of memory or time.
        """
        if plan is not None and plan.tile != self.tile_size:
            raise ValueError(f"this pool cuts {self.tile_size} px tiles, the plan asks for {plan.tile} px")
        return DecodeSession(
            self, Path(path), options or ReadOptions(), limits or self.limits, plan, priority=priority
        )

    # -- worker lifecycle ---------------------------------------------------------------------------

    async def acquire(self, priority: Priority = Priority.ONLINE) -> WorkerLease:
        """Wait for an idle worker and lease it (what :class:`DecodeSession` does on entering).

        Online requests are served before batch ones; batch leases never exceed
        ``workers - reserved_online_workers`` (at least one) at once. Cancelling the wait is safe.

        Args:
            priority: the lane to wait in.

        Returns:
            The lease; end it with :meth:`WorkerLease.release` or :meth:`WorkerLease.retire`.

        Raises:
            RuntimeError: the pool is not started or already closed.
        """
        if self._closed or not self._started:
            raise RuntimeError("the decode pool is not running (call start() first)")
        await self._lanes.acquire(priority)
        try:
            while True:
                # A permit means a worker is idle (or, while one died idle, its replacement is coming).
                worker = await self._idle.get()
                if worker.running() and worker in self._workers:
                    return WorkerLease(self, worker, priority)
                ended = exit_status(worker.process.returncode)
                if worker in self._workers:
                    logger.warning("decode worker %d died while idle (%s)", worker.pid, ended)
                self._retire(worker, f"it died while idle ({ended})")
        except BaseException:
            self._lanes.release(priority)
            raise

    @property
    def leased(self) -> dict[Priority, int]:
        """Workers leased now (or being replaced after their lease), by lane (for monitoring and tests)."""
        return {priority: self._lanes.held(priority) for priority in Priority}

    async def _spawn(self, region: TileRegion) -> WorkerProcess:
        worker = await WorkerProcess.spawn(
            self._command, region, memory_limit_bytes=self.settings.memory_limit_bytes
        )
        self._workers.add(worker)  # from now on close() stops it, even while it starts
        try:
            await worker.wait_ready()
        except BaseException:
            self._workers.discard(worker)
            raise
        # In one step (no await): the new worker holds every slot that is not leased, and every slot
        # released from now on goes to it.
        region.give_back = functools.partial(self._give_back, worker)
        worker.give_back(region.free_slots())
        logger.debug("decode worker %d ready", worker.pid)
        return worker

    def _give_back(self, worker: WorkerProcess, slots: list[int]) -> None:
        """Slots released by a consumer, possibly on another thread (the sync facade, a finalizer)."""
        if threading.get_ident() == self._loop_thread:
            worker.give_back(slots)
        elif self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(worker.give_back, slots)

    def _release(self, worker: WorkerProcess, lane: Priority) -> None:
        if self._closed:
            self._retire(worker, "the pool is closed", lane)
        elif not worker.alive:
            self._retire(worker, f"it exited ({exit_status(worker.process.returncode)})", lane)
        else:
            self._idle.put_nowait(worker)
            self._lanes.release(lane)

    def _retire(self, worker: WorkerProcess, reason: str, lane: Priority | None = None) -> None:
        """Kill ``worker`` (if alive) and start a replacement in the background; the ``lane`` permit its
        lease held is given back once the replacement is idle."""
        worker.kill()
        if worker in self._workers:
            self._workers.discard(worker)
            if not self._closed:
                logger.info("retiring decode worker %d: %s", worker.pid, reason)
                task = asyncio.create_task(self._replace(worker, reason, lane))
                self._spawning.add(task)
                task.add_done_callback(self._spawning.discard)
                return
        if lane is not None:
            self._lanes.release(lane)

    async def _replace(self, old: WorkerProcess, reason: str, lane: Priority | None) -> None:
        try:
            await old.reap()
            delay = 0.5
            while not self._closed:
                try:
                    worker = await self._spawn(old.region)
                except RuntimeError:
                    logger.exception(
                        "replacement for decode worker %d failed; retrying in %.1f s", old.pid, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if self._closed:
                    await worker.stop()
                    self._workers.discard(worker)
                    return
                logger.info("decode worker %d (retired: %s) replaced by %d", old.pid, reason, worker.pid)
                self._idle.put_nowait(worker)
                return
        finally:
            if lane is not None:
                self._lanes.release(lane)


class WorkerLease:
    """A worker held by one session, from :meth:`DecodePool.acquire` until it is handed back.

    Hand it back once, with :meth:`release` or :meth:`retire`; later calls do nothing.

    Attributes:
        worker: the leased worker process.
        priority: the lane the lease was taken in.
    """

    __slots__ = ("_ended", "_pool", "priority", "worker")

    def __init__(self, pool: DecodePool, worker: WorkerProcess, priority: Priority = Priority.ONLINE) -> None:
        self._pool = pool
        self.worker = worker
        self.priority = priority
        self._ended = False

    def release(self) -> None:
        """The worker is in step (no open file, no stream): it goes back to the idle queue, or is
        retired if it exited meanwhile or the pool closed."""
        if not self._ended:
            self._ended = True
            self._pool._release(self.worker, self.priority)

    def retire(self, reason: str) -> None:
        """The worker cannot be trusted any more: kill it and start a replacement in the background.

        Args:
            reason: why, for the log (a crash, the time budget, a protocol error, a cancellation).
        """
        if not self._ended:
            self._ended = True
            self._pool._retire(self.worker, reason, self.priority)

"""One file on one decode worker: open it, stream its tiles in batches, give the worker back.

A :class:`DecodeSession` leases a worker from the pool (:meth:`DecodePool.acquire
<gateway.decode.pool.DecodePool.acquire>`), speaks :mod:`gateway.decode.protocol` with it, and on exit
hands it back through the lease: :meth:`~gateway.decode.pool.WorkerLease.release` when the worker is in
step (the file closed, any stream cancelled and drained), :meth:`~gateway.decode.pool.WorkerLease.retire`
with the reason otherwise. Its life, as :class:`SessionState`::

    NEW ──acquire + open──▶ OPEN ──batches(specs)──▶ STREAMING ──end / error──▶ OPEN ──exit──▶ CLOSED
     │                       │                                                           (close: release)
     └─acquire + open with a plan──▶ PLANNED ──batches()──▶ STREAMING
    any state ──crash, hang, time budget, protocol error, recycle──▶ BROKEN ──exit──▶ CLOSED (retire)

Every wait on the worker is charged to the file's time budget (``DecodeSettings.file_timeout_s``), not
the time the consumer spends on inference between batches.

Cancellation (a client gone, a job cancelled) ends the session through the protocol, not by killing the
worker: a frame the cancellation interrupted half-way stays with the worker's reader
(:meth:`WorkerProcess.receive <gateway.decode.process.WorkerProcess.receive>` resumes it), and on exit
the session sends ``cancel`` if a stream runs, discards the batches still coming until the worker's
``end``, then ``close``; the worker goes back to the pool. Only a worker that does not answer within
``CONTROL_TIMEOUT_S`` (or a second cancellation during that exchange) is killed and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from gateway.decode import protocol
from gateway.decode.arena import SlotLease, TileRegion
from gateway.decode.process import WorkerProcess, exit_failure, exit_status
from gateway.errors import DecoderFailed, GatewayError
from gateway.pipeline.inputs import InputSummary
from gateway.pipeline.raster import RasterInfo, ReadOptions, quicklook
from gateway.pipeline.tiling import TileSpec, tile_grid
from gateway.scheduling import Priority
from gateway.settings import LimitSettings
from gateway.shared_memory import SharedTiles

if TYPE_CHECKING:
    from gateway.decode.pool import DecodePool, WorkerLease

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S: Final = 10.0
"""Deadline for protocol housekeeping (close, cancel) before a worker is declared stuck."""


class SessionState(StrEnum):
    """Where a :class:`DecodeSession` stands with its worker."""

    NEW = "new"
    """No worker yet."""
    OPEN = "open"
    """The file is open on the worker and no stream is running."""
    PLANNED = "planned"
    """A stream was requested along with ``open`` and is not consumed yet."""
    STREAMING = "streaming"
    """A tiles stream is running: frames are on their way."""
    CLOSED = "closed"
    """The worker went back to the pool (or was retired)."""
    BROKEN = "broken"
    """The worker is out of step or gone: it must be retired, not reused."""


@dataclass(frozen=True, slots=True)
class TileBatch:
    """Up to ``batch_size`` decoded tiles, in row-major order of their windows.

    Attributes:
        specs: the windows, one per tile.
        pixels: ``uint8 [n, 3, S, S]`` RGB, channel-first, C-contiguous (``S``: the model's tile
            side). With ``zero_copy`` a view of a shared-memory slot, valid until :meth:`release`.
        valid: ``bool [n, S, S]`` (False for padding, nodata, alpha 0, masked), or ``None`` when
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
class Quicklook:
    """A rendered quicklook: ``png`` bytes of ``width`` x ``height`` RGBA pixels."""

    png: bytes
    width: int
    height: int


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
    quicklook_max_side: int | None = None
    """Also paint the streamed tiles into a quicklook of at most this side
    (:attr:`DecodeSession.stream_quicklook` once the stream ends): the file is read once for both."""


class _WorkerLost(Exception):
    """The worker died, hung, or broke the protocol; the session cannot continue on it."""

    def __init__(self, failure: GatewayError) -> None:
        super().__init__(failure.detail)
        self.failure = failure


class DecodeSession:
    """One file on one worker: :attr:`info`, then :meth:`batches`, then :attr:`skipped`.

    Create with :meth:`DecodePool.open <gateway.decode.pool.DecodePool.open>`; use as an async context
    manager, which returns the worker to the pool (or retires it) on exit, even when the batches were
    not all consumed or the task was cancelled.
    """

    def __init__(
        self,
        pool: DecodePool,
        path: Path,
        options: ReadOptions,
        limits: LimitSettings,
        plan: StreamPlan | None = None,
        *,
        priority: Priority = Priority.ONLINE,
    ) -> None:
        self._pool = pool
        self._plan = plan
        self._priority = priority
        self._path = path
        self._options = options
        self._limits = limits
        self._lease: WorkerLease | None = None
        self._budget_s = pool.settings.file_timeout_s
        self._used_s = 0.0
        self._state = SessionState.NEW
        self._broken_because = ""
        self._info: RasterInfo | None = None
        self.skipped = 0
        """Tiles skipped because none of their pixels is valid (final once :meth:`batches` ends)."""
        self.inputs: InputSummary | None = None
        """Statistics of the tiles the model was given (once :meth:`batches` ends; see
        :mod:`gateway.pipeline.inputs`)."""
        self.stream_quicklook: Quicklook | None = None
        """The plan's quicklook (once :meth:`batches` ends), when the plan asked for one."""

    @property
    def info(self) -> RasterInfo:
        """How the file was opened and will be read."""
        if self._info is None:
            raise RuntimeError("the session is not open")
        return self._info

    @property
    def _worker(self) -> WorkerProcess:
        assert self._lease is not None
        return self._lease.worker

    async def __aenter__(self) -> DecodeSession:
        self._lease = await self._pool.acquire(self._priority)
        # From the first byte sent, the worker may be streaming the plan: a cancellation from here on
        # must cancel that stream before closing.
        self._state = SessionState.OPEN if self._plan is None else SessionState.PLANNED
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
                    quicklook_max_side=plan.quicklook_max_side,
                )
            await self._send(requests)  # one write: the worker wakes once for both
            meta, _ = await self._receive(0)
            if meta.get("kind") == "error":
                self._state = SessionState.OPEN  # a plan behind a failed open is ignored by the worker
                raise self._failed(meta)
            if meta.get("kind") != "info":
                raise self._lost(f"unexpected reply {meta.get('kind')!r} to open")
            self._info = protocol.info_from_wire(meta["info"])
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

    async def quicklook(self, max_side: int) -> Quicklook:
        """The whole image as an RGBA PNG, its longest side at most ``max_side`` (capped at
        :data:`~gateway.pipeline.raster.quicklook.MAX_SIDE`), read with the file's band plan.

        Only on an open session with no stream running; the session stays open for :meth:`batches`.

        Raises:
            CorruptRaster: a block cannot be decoded.
            DecoderFailed: the worker crashed, ran out of memory, or the file's time budget ran out.
        """
        if self._state is not SessionState.OPEN:
            raise RuntimeError(f"quicklook() needs an open session with no stream, not a {self._state} one")
        side = quicklook.capped_side(max_side)
        rows, cols = quicklook.quicklook_shape(self.info.width, self.info.height, side)
        try:
            await self._send(protocol.request("quicklook", max_side=side))
            meta, payload = await self._receive(quicklook.png_max_bytes(rows, cols))
        except _WorkerLost as exc:
            raise exc.failure from None
        if meta.get("kind") == "error":
            raise self._failed(meta)
        return self._quicklook(meta, payload, (rows, cols))

    def _quicklook(
        self, meta: dict[str, Any], payload: npt.NDArray[np.uint8], shape: tuple[int, int]
    ) -> Quicklook:
        rows, cols = shape
        if meta.get("kind") != "quicklook" or (meta.get("width"), meta.get("height")) != (cols, rows):
            raise self._lost(f"unexpected reply {meta.get('kind')!r} for a quicklook").failure
        png = payload.tobytes()
        if not png.startswith(quicklook.PNG_SIGNATURE):
            raise self._lost("a quicklook that is not a PNG").failure
        return Quicklook(png, cols, rows)

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
            ValueError: a tile of ``specs`` has another side than the pool's.
            CorruptRaster: while iterating, when a block cannot be decoded.
            DecoderFailed: the worker crashed, ran out of memory, or the file's time budget ran out.
        """
        if self._state is SessionState.PLANNED:
            if specs is not None:
                raise RuntimeError("this session streams its plan's grid; call batches() without specs")
            assert self._plan is not None
            grid = tile_grid(*self.info.read_size, self._plan.tile, self._plan.overlap)
            look = None
            if self._plan.quicklook_max_side:
                side = quicklook.capped_side(self._plan.quicklook_max_side)
                look = quicklook.quicklook_shape(self.info.width, self.info.height, side)
            batch_size = self._batch_limit(self._plan.batch_size)
            return self._stream(grid, batch_size, zero_copy, requested=True, quicklook_shape=look)
        if self._state is not SessionState.OPEN:
            raise RuntimeError(f"batches() needs an open session, not a {self._state} one")
        if specs is None:
            raise RuntimeError("batches() needs specs when the session was opened without a plan")
        if any(spec.size != self._pool.tile_size for spec in specs):
            raise ValueError(f"this session's worker cuts {self._pool.tile_size} px tiles only")
        return self._stream(list(specs), self._batch_limit(batch_size), zero_copy, requested=False)

    def _batch_limit(self, batch_size: int) -> int:
        return max(1, min(batch_size, self._pool.slot_tiles))

    async def _stream(
        self,
        specs: list[TileSpec],
        batch_size: int,
        zero_copy: bool,
        *,
        requested: bool,
        quicklook_shape: tuple[int, int] | None = None,
    ) -> AsyncIterator[TileBatch]:
        self._state = SessionState.STREAMING
        max_payload = batch_size * protocol.mask_bytes(self._worker.region.tile_size)
        if quicklook_shape is not None:
            max_payload = max(max_payload, quicklook.png_max_bytes(*quicklook_shape))
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
                elif kind == "quicklook" and quicklook_shape is not None and self.stream_quicklook is None:
                    self.stream_quicklook = self._quicklook(meta, payload, quicklook_shape)
                elif kind == "end":
                    self.skipped = int(meta.get("skipped", 0))
                    self.inputs = _inputs(meta.get("inputs"))
                    self._state = SessionState.OPEN
                    return
                elif kind == "error":
                    if not meta.get("recycle"):
                        self._state = SessionState.OPEN
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
        side = region.tile_size
        expected = n * protocol.mask_bytes(side) if masked else 0
        if len(payload) != expected:
            raise self._lost(f"batch of {n} tiles carries {len(payload)} bytes, expected {expected}")
        valid = payload.view(np.bool_).reshape(n, side, side) if masked else None
        chosen = tuple(specs[i] for i in indices)
        if not zero_copy:
            pixels = region.pixels(slot, n).copy()
            _give_back_unused(region, slot)
            return TileBatch(chosen, pixels, valid)
        return TileBatch(chosen, region.pixels(slot, n), valid, region.shared(slot, n), region.lease(slot))

    # -- plumbing -----------------------------------------------------------------------------------

    def _break(self, reason: str) -> None:
        """The worker cannot be reused; ``reason`` (the first one given) is logged when it is retired."""
        if self._state is not SessionState.BROKEN:
            self._state = SessionState.BROKEN
            self._broken_because = reason

    async def _send(self, data: bytes) -> None:
        try:
            await self._worker.send(data)
        except (ConnectionError, OSError) as exc:
            raise await self._lost_worker("its input pipe closed") from exc

    async def _receive(self, max_payload: int) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
        """The next frame, charging the wait to the file's time budget.

        Cancelling it leaves the worker in step: a frame read half-way is completed by the next
        receive (the drain on exit).
        """
        worker = self._worker
        remaining = self._budget_s - self._used_s
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await worker.receive(max_payload)
        except TimeoutError:
            reason = f"the file's {self._budget_s:g} s time budget ran out"
            logger.warning("decode worker %d: %s; killing it", worker.pid, reason)
            self._break(reason)
            worker.kill()
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
        finally:
            self._used_s += time.monotonic() - started

    async def _lost_worker(self, what: str) -> _WorkerLost:
        """The worker is gone (``what`` tells how we noticed): log how it ended and fail the file."""
        worker = self._worker
        code = await worker.reap()
        logger.warning("decode worker %d lost: %s (%s)", worker.pid, what, exit_status(code))
        self._break(f"{what} ({exit_status(code)})")
        return _WorkerLost(exit_failure(code, self._pool.settings.memory_limit_bytes))

    def _lost(self, what: str) -> _WorkerLost:
        self._break(f"protocol error: {what}")
        if self._lease is not None:
            logger.error("decode worker %d broke the protocol: %s", self._worker.pid, what)
            self._worker.kill()
        return _WorkerLost(DecoderFailed("The decoder sent malformed data for this file.", cause="protocol"))

    def _failed(self, meta: dict[str, Any]) -> GatewayError:
        error = protocol.error_from_wire(meta)
        if meta.get("recycle"):
            self._break(f"it exits after a fatal error: {error.detail}")
        return error

    async def _finish(self) -> None:
        """Bring the worker back to idle (cancel, drain, close) or retire it.

        Raises only :class:`asyncio.CancelledError`, when the task is cancelled (again) while the
        worker is being brought back; the worker is then retired.
        """
        lease, self._lease = self._lease, None
        if lease is None:
            return
        worker = lease.worker
        state, self._state = self._state, SessionState.CLOSED
        if state is SessionState.BROKEN:
            lease.retire(self._broken_because)
            return
        if not worker.alive:
            lease.retire(f"it exited ({exit_status(worker.process.returncode)})")
            return
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                if state in (SessionState.PLANNED, SessionState.STREAMING):
                    await _drain(worker)
                await worker.send(protocol.request("close"))
                while True:
                    meta, _ = await worker.receive(_drain_payload(worker))
                    if meta.get("kind") == "closed":
                        break
        except (Exception, asyncio.CancelledError) as exc:
            logger.warning("decode worker %d did not close cleanly: %r", worker.pid, exc)
            lease.retire(f"it did not close cleanly: {exc!r}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        lease.release()


async def _drain(worker: WorkerProcess) -> None:
    """Cancel a stream the consumer left early (or was cancelled in) and discard what is in flight,
    starting with the rest of a frame a cancellation interrupted."""
    await worker.send(protocol.request("cancel"))
    while True:
        meta, _ = await worker.receive(_drain_payload(worker))
        if meta.get("kind") == "batch":
            slot = _announced_slot(meta, worker.region)
            if slot is not None:
                _give_back_unused(worker.region, slot)
        if meta.get("kind") == "end" and meta.get("cancelled"):
            return
        if meta.get("kind") == "error" and meta.get("recycle"):
            raise RuntimeError("worker recycled while cancelling")


def _drain_payload(worker: WorkerProcess) -> int:
    """The largest payload a frame may carry while a stream is discarded: a full slot's masks."""
    return worker.region.slot_tiles * protocol.mask_bytes(worker.region.tile_size)


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


def _inputs(values: Any) -> InputSummary | None:
    """A stream's input statistics from the wire; ``None`` when absent or malformed."""
    if not isinstance(values, dict):
        return None
    try:
        return InputSummary.from_wire(values)
    except (KeyError, TypeError, ValueError, IndexError):
        return None

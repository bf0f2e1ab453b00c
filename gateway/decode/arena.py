"""Shared-memory tile slots: decode workers write tiles where Triton reads them, with no copy between.

::

    decode worker i ──writes tiles──▶ /dev/shm/palm_tiles_<pid>_<token>_<i>  ◀──reads── tritonserver
                                       slot 0 | slot 1 | ... | slot n-1        (registered as system
    gateway: frame "batch, slot s" ──▶ TileBatch(pixels = view of slot s)         shared memory)

Each decode worker owns one :class:`TileRegion`: ``slots`` slots of ``slot_tiles`` uint8 tiles
``[3, S, S]``, ``S`` the served model's tile side. The gateway maps the region too, so a batch's pixels
are a view, never a copy; the Triton client names the region and offset in its request instead of
sending 6 MB over gRPC (or sends the view's bytes when the server cannot map the region, e.g. another
host).

Ownership of a slot, kept by the gateway::

    with the worker ──(batch frame names it)──▶ leased ──(lease released)──▶ with the worker
                                                  │
                                                  └─(Triton call cancelled)─▶ quarantined ─(timeout)─┘

A worker writes only slots it holds; the gateway gives a slot back (a ``free`` request) only once
nothing reads it any more. A Triton call that was cancelled may still be read by the server, so its
slot waits out the request deadline first. The region outlives its worker: a replacement starts with
every slot that is not leased.

Regions are created with ``posix_fallocate``, so a full ``/dev/shm`` (Docker's default is 64 MiB) fails
at start with a clear error instead of a SIGBUS in the middle of a write. Regions left behind by a
gateway that was killed are removed by the next one (:func:`sweep_stale_regions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.pipeline.contract import CHANNELS
from gateway.shared_memory import SharedTiles

logger = logging.getLogger(__name__)

SHM_DIR: Final = Path("/dev/shm")
REGION_PREFIX: Final = "palm_tiles_"


class SharedMemoryUnavailable(RuntimeError):
    """``/dev/shm`` cannot hold the tile regions (too small, full, or missing)."""


class TileRegion:
    """One worker's shared-memory region, created, mapped and (on :meth:`close`) unlinked here.

    Args:
        name: the file name under ``/dev/shm`` (also the Triton registration name).
        slots: how many batches may be in flight for this worker at once.
        slot_tiles: tiles per slot (the largest batch the worker may send).
        tile_size: the side of one tile (the model's ``S``).
        create: create the region (the gateway); ``False`` maps an existing one (a worker).

    Raises:
        SharedMemoryUnavailable: the region could not be created at its full size, or (``create=False``)
            does not exist with that size.
    """

    def __init__(
        self, name: str, slots: int, slot_tiles: int, *, tile_size: int, create: bool = True
    ) -> None:
        self.name = name
        self.slots = slots
        self.slot_tiles = slot_tiles
        self.tile_size = tile_size
        self.tile_bytes = CHANNELS * tile_size * tile_size
        self.slot_bytes = slot_tiles * self.tile_bytes
        self.nbytes = slots * self.slot_bytes
        self.path = SHM_DIR / name
        self.leased: set[int] = set()
        self.quarantined: set[int] = set()
        self.give_back: Callable[[list[int]], None] | None = None
        """Hands freed slots to the worker that owns the region now (set by the pool)."""
        self._owner = create
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            if create:
                os.posix_fallocate(fd, 0, self.nbytes)
            elif os.fstat(fd).st_size != self.nbytes:
                raise SharedMemoryUnavailable(f"{self.path} is not {self.nbytes} bytes long")
            self._map = mmap.mmap(fd, self.nbytes)
        except OSError as exc:
            if create:
                self.path.unlink(missing_ok=True)
            hint = (
                " (/dev/shm is full or too small: give the container more, e.g. docker's --shm-size, or "
                "lower PALM_DECODE__WORKERS, PALM_TRITON__BATCH_SIZE or PALM_TRITON__MAX_INFLIGHT)"
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)
                else ""
            )
            raise SharedMemoryUnavailable(
                f"cannot reserve {self.nbytes / 1024**2:.0f} MiB in {self.path}: {exc.strerror}{hint}"
            ) from exc
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._map, np.uint8)

    @property
    def key(self) -> str:
        return f"/{self.name}"

    def free_slots(self) -> list[int]:
        """Slots a (new) worker may write: neither leased nor quarantined."""
        return [s for s in range(self.slots) if s not in self.leased and s not in self.quarantined]

    def pixels(self, slot: int, tiles: int) -> npt.NDArray[np.uint8]:
        """A view of the first ``tiles`` tiles of ``slot``: ``uint8 [tiles, 3, S, S]``."""
        if not 0 <= slot < self.slots or not 0 < tiles <= self.slot_tiles:
            raise ValueError(f"slot {slot} with {tiles} tiles is outside region {self.name}")
        start = slot * self.slot_bytes
        side = self.tile_size
        return self._array[start : start + tiles * self.tile_bytes].reshape(tiles, CHANNELS, side, side)

    def shared(self, slot: int, tiles: int) -> SharedTiles:
        return SharedTiles(self.name, self.key, self.nbytes, slot * self.slot_bytes, tiles * self.tile_bytes)

    def lease(self, slot: int) -> SlotLease:
        """Mark ``slot`` (just filled by the worker) as held by the gateway until the lease ends."""
        self.leased.add(slot)
        return SlotLease(self, slot)

    def _return(self, slot: int) -> None:
        self.leased.discard(slot)
        self.quarantined.discard(slot)
        if self.give_back is not None:
            self.give_back([slot])

    def close(self) -> None:
        """Unmap (and unlink, if created here); views handed out must not be used afterwards. Idempotent."""
        self.give_back = None
        if self._owner:
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(BufferError, ValueError):
            # BufferError: a view is still alive; the mapping then goes with the last view.
            self._map.close()


class SlotLease:
    """The gateway's hold on one slot; the slot goes back to its worker when the lease ends.

    Ending it twice is harmless. A lease that is garbage-collected without being ended gives its slot
    back then (a safety net: the worker would otherwise starve).
    """

    __slots__ = ("__weakref__", "_finalizer", "region", "slot")

    def __init__(self, region: TileRegion, slot: int) -> None:
        self.region = region
        self.slot = slot
        self._finalizer = weakref.finalize(self, region._return, slot)
        self._finalizer.atexit = False

    def release(self) -> None:
        """Nothing reads the slot any more: give it back now."""
        self._finalizer()

    def quarantine(self, delay_s: float) -> None:
        """A reader may still be looking (a cancelled Triton call): give the slot back after ``delay_s``."""
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        region, slot = self.region, self.slot
        region.leased.discard(slot)
        region.quarantined.add(slot)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            region._return(slot)
            return
        loop.call_later(delay_s, region._return, slot)


def region_name(pool_token: str, index: int) -> str:
    """``palm_tiles_<pid>_<token>_<index>``: the pid lets a later gateway find regions we left behind."""
    return f"{REGION_PREFIX}{os.getpid()}_{pool_token}_{index}"


def new_pool_token() -> str:
    return secrets.token_hex(4)


def sweep_stale_regions() -> int:
    """Unlink tile regions whose creating process is gone; returns how many were removed."""
    removed = 0
    for path in SHM_DIR.glob(f"{REGION_PREFIX}*"):
        pid_text = path.name.removeprefix(REGION_PREFIX).split("_", 1)[0]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
            logger.info("removed %s, left behind by process %s", path, pid_text)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

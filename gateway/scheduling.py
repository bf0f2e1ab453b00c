"""Who goes first when online requests and bulk jobs share the engine: two priority lanes.

``/v1/predict`` callers wait on an answer; a job's files only have to finish eventually. Every shared,
bounded resource of the engine (decode workers, Triton calls in flight) is handed out through a
:class:`PriorityLimiter`::

    ONLINE waiters ──▶ served first, first come first served among themselves
    BATCH waiters  ──▶ served only while no ONLINE request waits, and never more than
                       ``permits - reserved`` at once: ``reserved`` permits stay free for ONLINE

Strict priority means a job makes progress only on capacity online traffic leaves unused; the
reservation means an online request arriving while a job holds everything it may still finds a
permit free instead of queueing behind the job. The same lanes reach Triton as request priorities
(:class:`Priority` values are Triton's priority levels: 1 is served first).

This module is pure asyncio: no I/O, no imports from the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum


class Priority(IntEnum):
    """How urgently a piece of work wants a shared resource; a lower value is served first.

    The values are Triton's request priority levels (``priority_levels: 2`` in the model configs).
    """

    ONLINE = 1
    """A caller is waiting on the answer (``/v1/predict``, ``palm-serve predict``)."""
    BATCH = 2
    """Bulk work (a job's files): served on capacity online requests leave unused."""


class PriorityLimiter:
    """A semaphore with two lanes: :attr:`Priority.ONLINE` waiters are served before
    :attr:`Priority.BATCH` ones, and batch holders never take the last ``reserved`` permits.

    Waiters of one priority are served in arrival order. A permit freed while an online request waits
    goes to that request, whatever batch work waited longer. Create and use it on one event loop.

    Example::

        limiter = PriorityLimiter(8, reserved=6)  # batch work holds at most 2 of the 8
        async with limiter.hold(Priority.BATCH):
            ...

    Args:
        permits: how many holders at once, of any priority (at least 1).
        reserved: permits batch work may never hold; clamped so that batch work may hold at least one
            (with ``reserved >= permits`` batch work still gets one permit, and online requests are
            still served first).

    Raises:
        ValueError: ``permits`` is below 1 or ``reserved`` is negative.
    """

    def __init__(self, permits: int, *, reserved: int = 0) -> None:
        if permits < 1:
            raise ValueError(f"a limiter needs at least one permit, got {permits}")
        if reserved < 0:
            raise ValueError(f"reserved permits cannot be negative, got {reserved}")
        self.permits = permits
        self.batch_permits = max(1, permits - reserved)
        """The most permits batch work holds at once."""
        self._held = dict.fromkeys(Priority, 0)
        self._waiters: dict[Priority, deque[asyncio.Future[None]]] = {p: deque() for p in Priority}

    @property
    def in_use(self) -> int:
        """Permits held now, by any priority."""
        return sum(self._held.values())

    def held(self, priority: Priority) -> int:
        """Permits held now by work of ``priority``."""
        return self._held[priority]

    def waiting(self, priority: Priority) -> int:
        """Work of ``priority`` waiting for a permit now."""
        return sum(1 for waiter in self._waiters[priority] if not waiter.done())

    async def acquire(self, priority: Priority = Priority.ONLINE) -> None:
        """Wait for a permit; give it back with :meth:`release` (same ``priority``).

        Cancelling a waiter is safe: a permit handed to it while it was being cancelled goes to the
        next waiter.
        """
        if not self._queued_ahead(priority) and self._may_take(priority):
            self._held[priority] += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[priority].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(priority)  # granted in the same turn as the cancellation
            else:
                with contextlib.suppress(ValueError):  # already dropped by _wake
                    self._waiters[priority].remove(waiter)
                self._wake()
            raise

    def release(self, priority: Priority = Priority.ONLINE) -> None:
        """Give back a permit taken with :meth:`acquire` at ``priority`` and wake who comes next.

        Raises:
            RuntimeError: no permit of ``priority`` is held.
        """
        if self._held[priority] <= 0:
            raise RuntimeError(f"release() of a {priority.name} permit that is not held")
        self._held[priority] -= 1
        self._wake()

    @asynccontextmanager
    async def hold(self, priority: Priority = Priority.ONLINE) -> AsyncIterator[None]:
        """``async with limiter.hold(priority):`` a permit for the duration of the block."""
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release(priority)

    def _may_take(self, priority: Priority) -> bool:
        if self.in_use >= self.permits:
            return False
        return priority is Priority.ONLINE or self._batch_held() < self.batch_permits

    def _batch_held(self) -> int:
        return sum(n for p, n in self._held.items() if p is not Priority.ONLINE)

    def _queued_ahead(self, priority: Priority) -> bool:
        """Whether work of ``priority`` or more urgent already waits (it goes first)."""
        return any(self._waiters[p] for p in Priority if p <= priority)

    def _wake(self) -> None:
        """Hand free permits to waiters, the most urgent first; a lane still waiting blocks the ones
        behind it."""
        for priority in sorted(Priority):
            queue = self._waiters[priority]
            while queue and self._may_take(priority):
                waiter = queue.popleft()
                if waiter.done():  # cancelled before it was served
                    continue
                self._held[priority] += 1
                waiter.set_result(None)
            if queue:
                return

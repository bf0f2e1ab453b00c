"""The two-lane limiter: online waiters first, batch work capped below the total, safe cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.scheduling import Priority, PriorityLimiter


async def settle() -> None:
    """Let every task that can run do so."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(limiter: PriorityLimiter, priority: Priority, order: list[str], name: str) -> asyncio.Task[None]:
    async def take() -> None:
        await limiter.acquire(priority)
        order.append(name)

    return asyncio.create_task(take())


async def test_an_online_waiter_queued_after_a_batch_waiter_is_served_first() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire(Priority.BATCH)
    order: list[str] = []
    batch = waiter(limiter, Priority.BATCH, order, "batch")
    await settle()
    online = waiter(limiter, Priority.ONLINE, order, "online")
    await settle()
    assert order == []

    limiter.release(Priority.BATCH)
    await online
    await settle()
    assert order == ["online"]
    assert not batch.done()

    limiter.release(Priority.ONLINE)
    await batch
    assert order == ["online", "batch"]
    assert limiter.held(Priority.BATCH) == 1


async def test_batch_work_never_takes_the_reserved_permits() -> None:
    limiter = PriorityLimiter(2, reserved=1)
    await limiter.acquire(Priority.BATCH)
    order: list[str] = []
    second_batch = waiter(limiter, Priority.BATCH, order, "batch")
    await settle()
    assert order == []
    assert limiter.waiting(Priority.BATCH) == 1

    await asyncio.wait_for(limiter.acquire(Priority.ONLINE), 1)  # the reserved permit, at once
    assert limiter.in_use == 2

    limiter.release(Priority.ONLINE)
    await settle()
    assert order == [], "the free permit is reserved for online work"
    limiter.release(Priority.BATCH)
    await second_batch
    assert order == ["batch"]


async def test_a_reservation_of_every_permit_still_lets_batch_work_run_one_at_a_time() -> None:
    limiter = PriorityLimiter(1, reserved=5)
    assert limiter.batch_permits == 1
    await asyncio.wait_for(limiter.acquire(Priority.BATCH), 1)
    assert limiter.held(Priority.BATCH) == 1


async def test_each_lane_is_first_come_first_served() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire(Priority.ONLINE)
    order: list[str] = []
    tasks = [
        waiter(limiter, p, order, f"{p.name}{i}") for i in range(3) for p in (Priority.BATCH, Priority.ONLINE)
    ]
    await settle()
    for _ in tasks:
        held = next(p for p in Priority if limiter.held(p))
        limiter.release(held)
        await settle()
    assert order == ["ONLINE0", "ONLINE1", "ONLINE2", "BATCH0", "BATCH1", "BATCH2"]


async def test_a_cancelled_waiter_holds_nothing_and_the_next_one_is_served() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire(Priority.BATCH)
    order: list[str] = []
    cancelled = waiter(limiter, Priority.ONLINE, order, "cancelled")
    following = waiter(limiter, Priority.BATCH, order, "following")
    await settle()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert limiter.waiting(Priority.ONLINE) == 0

    limiter.release(Priority.BATCH)
    await following
    assert order == ["following"]
    assert limiter.in_use == 1


async def test_a_permit_granted_to_a_waiter_cancelled_in_the_same_turn_passes_on() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire(Priority.ONLINE)
    order: list[str] = []
    first = waiter(limiter, Priority.ONLINE, order, "first")
    second = waiter(limiter, Priority.ONLINE, order, "second")
    await settle()
    limiter.release(Priority.ONLINE)  # granted to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs again
    await asyncio.gather(first, return_exceptions=True)
    await second
    assert order == ["second"]
    assert limiter.in_use == 1


async def test_hold_gives_the_permit_back_when_the_block_fails() -> None:
    limiter = PriorityLimiter(1)
    held: list[int] = []

    async def fail() -> None:
        async with limiter.hold(Priority.BATCH):
            held.append(limiter.in_use)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail()
    assert held == [1]
    assert limiter.in_use == 0


async def test_releasing_a_permit_not_held_is_an_error() -> None:
    limiter = PriorityLimiter(2)
    await limiter.acquire(Priority.ONLINE)
    with pytest.raises(RuntimeError, match="BATCH"):
        limiter.release(Priority.BATCH)


@pytest.mark.parametrize(("permits", "reserved"), [(0, 0), (2, -1)])
def test_impossible_limits_are_refused(permits: int, reserved: int) -> None:
    with pytest.raises(ValueError, match="permit"):
        PriorityLimiter(permits, reserved=reserved)

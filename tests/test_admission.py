"""Load shedding: past the limit, requests are refused at once instead of queueing."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.admission import Admission, UploadPacer
from gateway.errors import Overloaded


async def test_requests_over_the_limit_are_refused_and_slots_are_returned() -> None:
    admission = Admission(2)
    async with admission.slot(), admission.slot():
        with pytest.raises(Overloaded, match="limit is 2") as refused:
            async with admission.slot():
                pass
        assert refused.value.headers() == {"Retry-After": "2"}
        assert refused.value.status == 503
    assert admission.active == 0
    async with admission.slot():
        assert admission.active == 1


async def test_a_failing_request_gives_its_slot_back() -> None:
    admission = Admission(1)
    with pytest.raises(RuntimeError):
        async with admission.slot():
            raise RuntimeError("boom")
    async with admission.slot():
        pass


CHUNK = 64 * 1024


async def read_paced(pacer: UploadPacer, size: int) -> float:
    """Seconds to read a body of ``size`` bytes chunk by chunk through ``pacer``."""
    started = time.perf_counter()
    for read in range(CHUNK, size + 1, CHUNK):
        if pacer.paces(read):
            await pacer.pace(read, CHUNK)
    return time.perf_counter() - started


async def test_uploads_are_paced_past_their_free_bytes_only_while_busy() -> None:
    busy = [True]
    pacer = UploadPacer(4 * 1024**2, lambda: busy[0], free_bytes=1024**2)

    assert await read_paced(pacer, 1024**2) < 0.05  # within the free bytes
    paced = await read_paced(pacer, 3 * 1024**2)  # 2 MiB past them at 4 MiB/s
    assert 0.4 < paced < 1.5

    busy[0] = False
    assert await read_paced(pacer, 3 * 1024**2) < 0.05


async def test_paced_uploads_share_one_budget() -> None:
    pacer = UploadPacer(8 * 1024**2, lambda: True, free_bytes=0)

    alone = await read_paced(pacer, 2 * 1024**2)
    started = time.perf_counter()
    await asyncio.gather(read_paced(pacer, 2 * 1024**2), read_paced(pacer, 2 * 1024**2))
    together = time.perf_counter() - started

    assert 0.2 < alone < 0.75
    assert together > 1.7 * alone

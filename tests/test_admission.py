"""Load shedding: past the limit, requests are refused at once instead of queueing."""

from __future__ import annotations

import pytest

from gateway.admission import Admission
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

"""What follows an attempt: success, 410, Retry-After, the schedule with jitter, giving up."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from gateway.webhooks.dispatcher import next_step, retry_after
from gateway.webhooks.outbox import DeliveryStatus

SCHEDULE = (5.0, 300.0, 1800.0)
NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(7)


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_success(status: int, rng: random.Random) -> None:
    assert next_step(1, status, None, SCHEDULE, rng).status is DeliveryStatus.succeeded


def test_410_disables_and_the_schedule_runs_out(rng: random.Random) -> None:
    assert next_step(1, 410, None, SCHEDULE, rng).status is DeliveryStatus.disabled
    for attempt in (1, 2, 3):
        step = next_step(attempt, 500, None, SCHEDULE, rng)
        assert step.status is DeliveryStatus.pending
        assert SCHEDULE[attempt - 1] * 0.9 <= step.delay_s <= SCHEDULE[attempt - 1] * 1.1
    assert next_step(4, 500, None, SCHEDULE, rng).status is DeliveryStatus.failed
    assert next_step(4, None, None, SCHEDULE, rng).status is DeliveryStatus.failed


@pytest.mark.parametrize("status", [301, 302, 307, 308, 400, 404, 500, None])
def test_redirects_errors_and_silence_retry_on_the_schedule(status: int | None, rng: random.Random) -> None:
    step = next_step(2, status, None, SCHEDULE, rng)
    assert step.status is DeliveryStatus.pending
    assert 270 <= step.delay_s <= 330


def test_jitter_spreads_retries(rng: random.Random) -> None:
    delays = {round(next_step(1, 500, None, SCHEDULE, rng).delay_s, 3) for _ in range(20)}
    assert len(delays) > 10


def test_retry_after_is_honoured_on_429_and_503_only(rng: random.Random) -> None:
    assert next_step(1, 429, 120.0, SCHEDULE, rng).delay_s == 120.0
    assert next_step(1, 503, 0.0, SCHEDULE, rng).delay_s == 0.0
    assert next_step(1, 500, 120.0, SCHEDULE, rng).delay_s < 6


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("30", NOW) == 30.0
    assert retry_after("Sun, 29 Nov 2026 12:01:00 GMT", NOW) == 60.0
    assert retry_after("Sun, 29 Nov 2026 11:00:00 GMT", NOW) == 0.0
    assert retry_after("9999999", NOW) == 86_400.0
    assert retry_after("soon", NOW) is None
    assert retry_after(None, NOW) is None

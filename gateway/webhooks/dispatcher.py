"""The dispatcher: in each service process, delivers due outbox events and schedules their retries.

Each attempt re-checks the URL (:class:`~gateway.webhooks.ssrf.UrlGuard`), signs the stored body with
a fresh timestamp (the job's secret, else every server secret), POSTs it once to the checked address,
and settles it (:func:`next_step`):

* ``2xx``: succeeded;
* ``410 Gone``: the job's endpoint is disabled; its other pending events are dropped;
* ``429`` / ``503`` with ``Retry-After``: retried then;
* anything else (a redirect, another status, a timeout, a refused connection, a refused address):
  retried after the schedule's next delay, ±10% jitter, until the schedule is spent (then failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from gateway.db.engine import Database, DatabaseUnavailable, utcnow
from gateway.metrics import Metrics
from gateway.settings import WebhookSettings
from gateway.webhooks.delivery import Answer, DeliveryFailed, Sender
from gateway.webhooks.outbox import AttemptRecord, DeliveryClaim, DeliveryLeaseLost, DeliveryStatus, Outbox
from gateway.webhooks.signing import parse_secret, signed_headers
from gateway.webhooks.ssrf import UnsafeWebhookUrl, UrlGuard

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 86_400.0
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Step:
    status: DeliveryStatus
    delay_s: float = 0.0


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), at most a day."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def next_step(
    attempt: int,
    status_code: int | None,
    wait_s: float | None,
    schedule: Sequence[float],
    rng: random.Random,
) -> Step:
    """What follows attempt number ``attempt`` (1-based) that got ``status_code`` (``None``: no answer).

    ``schedule[n - 1]`` is the delay after the n-th failed attempt; after the last, the delivery fails.
    ``wait_s`` is the receiver's ``Retry-After`` (honoured on 429 and 503).
    """
    if status_code is not None and 200 <= status_code < 300:
        return Step(DeliveryStatus.succeeded)
    if status_code == 410:
        return Step(DeliveryStatus.disabled)
    if attempt > len(schedule):
        return Step(DeliveryStatus.failed)
    if status_code in (429, 503) and wait_s is not None:
        return Step(DeliveryStatus.pending, wait_s)
    delay = schedule[attempt - 1]
    return Step(DeliveryStatus.pending, delay * rng.uniform(1 - JITTER, 1 + JITTER))


class Dispatcher:
    """Delivers the outbox from this process (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        db: Database,
        guard: UrlGuard,
        sender: Sender,
        settings: WebhookSettings,
        metrics: Metrics,
    ) -> None:
        self.outbox = outbox
        self.db = db
        self.guard = guard
        self.sender = sender
        self.settings = settings
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.schedule = settings.delays
        self._server_keys = [parse_secret(s) for s in settings.signing_secrets()]
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        """Stop claiming; attempts in flight are abandoned and retried after their lease (at least once)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                free = self.settings.concurrency - len(self._tasks)
                if free > 0:
                    for claim in await self.db.run(
                        self.outbox.claim, self.owner, self.settings.lease_s, free
                    ):
                        task = asyncio.create_task(self._deliver(claim), name=f"webhook-{claim.id}")
                        self._tasks.add(task)
                        task.add_done_callback(self._done)
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                logger.warning("webhook dispatcher: %s", exc.detail)
            except Exception:
                logger.exception("webhook dispatcher iteration failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _deliver(self, claim: DeliveryClaim) -> None:
        started_at = utcnow()
        began = time.monotonic()
        answer: Answer | None = None
        error: str | None = None
        try:
            target = await self.guard.check(claim.url)
            keys = [parse_secret(claim.secret)] if claim.secret else self._server_keys
            headers = signed_headers(claim.id, int(time.time()), claim.body, keys)
            answer = await self.sender.post(target, headers, claim.body)
            outcome = _outcome(answer.status)
            if outcome != "success":
                error = _http_error(answer)
        except UnsafeWebhookUrl as exc:
            outcome, error = "refused", exc.detail
        except DeliveryFailed as exc:
            outcome, error = exc.kind, exc.detail
        except Exception as exc:
            logger.exception("webhook %s of job %s: attempt %d failed", claim.id, claim.job_id, claim.attempt)
            outcome, error = "error", f"{type(exc).__name__}: {exc}"[:300]
        duration = time.monotonic() - began
        self.metrics.webhook_attempts.labels(outcome=outcome).inc()
        self.metrics.webhook_latency.observe(duration)
        status_code = answer.status if answer is not None else None
        wait = retry_after(answer.headers.get("retry-after"), started_at) if answer is not None else None
        step = next_step(claim.attempt, status_code, wait, self.schedule, self._rng)
        record = AttemptRecord(started_at, duration, status_code, outcome, error)
        retry_at = utcnow() + timedelta(seconds=step.delay_s)
        try:
            await asyncio.shield(self.db.run(self.outbox.settle, claim, record, step.status, retry_at))
        except DeliveryLeaseLost as exc:
            logger.warning("webhook %s: %s", claim.id, exc)
            return
        if step.status is not DeliveryStatus.pending:
            self.metrics.webhook_deliveries.labels(outcome=step.status.value).inc()
        log = logger.info if step.status is DeliveryStatus.succeeded else logger.warning
        log(
            "webhook %s (%s) of job %s: attempt %d %s%s -> %s",
            claim.id,
            claim.type,
            claim.job_id,
            claim.attempt,
            outcome,
            f" ({error})" if error else "",
            step.status.value
            if step.status is not DeliveryStatus.pending
            else f"retry in {step.delay_s:.1f} s",
        )


def _outcome(status: int) -> str:
    if 200 <= status < 300:
        return "success"
    if 300 <= status < 400:
        return "redirect"
    if status == 410:
        return "gone"
    return "http_error"


def _http_error(answer: Answer) -> str:
    if 300 <= answer.status < 400:
        location = answer.headers.get("location", "")[:200]
        return f"HTTP {answer.status}: redirects are not followed (Location: {location})"
    return f"HTTP {answer.status}"

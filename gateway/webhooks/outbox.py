"""The webhook outbox: events written with the job state they describe, delivered under leases.

* **enqueue** runs inside the job store's transaction (:func:`enqueue`): the event exists if and only
  if the state change that caused it was committed, so a crash between a job's end and its delivery
  loses nothing (the transactional outbox).
* **claim** takes due deliveries with a lease (owner, token, expiry) and counts the attempt, as files
  are claimed (:mod:`gateway.jobs.store`): PostgreSQL skips rows another process locked
  (``FOR UPDATE SKIP LOCKED``), SQLite serialises writers (``BEGIN IMMEDIATE``). A delivery whose lease
  expired (its process died mid-attempt) is claimed again as the next attempt, so every attempt number
  is sent by one process at most, and every event at least once.
* **settle** records the attempt and the next step (succeeded, retry at a time, failed, disabled) only
  while the token is still the delivery's.

Delivery ``id`` is the Standard Webhooks ``webhook-id``: the same on every attempt and redelivery.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
import sqlalchemy as sa

from gateway.db.engine import aware, utcnow
from gateway.db.tables import jobs, webhook_attempts, webhook_deliveries
from gateway.errors import GatewayError
from gateway.webhooks.events import OPTIONAL, EventType


class DeliveryStatus(StrEnum):
    pending = "pending"
    sending = "sending"
    succeeded = "succeeded"
    failed = "failed"
    """Every retry of the schedule was spent."""
    disabled = "disabled"
    """The receiver answered 410 Gone: no more deliveries for this job."""


FINAL = frozenset({DeliveryStatus.succeeded, DeliveryStatus.failed, DeliveryStatus.disabled})


class DeliveryLeaseLost(Exception):
    """The delivery's lease expired and another process took it (or its job was deleted)."""


class NothingToRedeliver(GatewayError):
    status = 409
    slug = "nothing-to-redeliver"
    title = "Nothing to redeliver"


def new_event_id() -> str:
    """``msg_`` and 32 hex characters that sort by creation time."""
    return f"msg_{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def iso(value: datetime | None) -> str | None:
    stamp = aware(value)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z") if stamp is not None else None


def enqueue(
    conn: sa.Connection, job: Mapping[str, Any], kind: EventType, data: dict[str, Any], now: datetime
) -> str | None:
    """Add an event for ``job`` in the caller's transaction; returns its id, or ``None`` when the job
    has no webhook, its endpoint is disabled, or it did not subscribe to ``kind``."""
    if not job["webhook_url"] or job["webhook_disabled"]:
        return None
    if kind in OPTIONAL and kind.value not in (job["webhook_events"] or []):
        return None
    event_id = new_event_id()
    body = orjson.dumps({"type": kind.value, "timestamp": iso(now), "data": data})
    conn.execute(
        webhook_deliveries.insert().values(
            id=event_id,
            job_id=job["id"],
            type=kind.value,
            url=job["webhook_url"],
            body=body.decode(),
            status=DeliveryStatus.pending.value,
            attempts=0,
            available_at=now,
            created_at=now,
        )
    )
    return event_id


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """One attempt of one event, held under a lease: only this token may settle it."""

    id: str
    job_id: str
    type: str
    url: str
    body: bytes
    secret: str | None
    """The job's own ``webhook_secret`` (the server's secrets sign otherwise)."""
    attempt: int
    token: str


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    started_at: datetime
    duration_s: float
    status_code: int | None
    outcome: str
    error: str | None


class Outbox:
    """Deliveries and attempts in the job database; every method is one transaction (blocking)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    def claim(self, owner: str, lease_s: float, limit: int) -> list[DeliveryClaim]:
        """Take up to ``limit`` due deliveries (pending and due, or sending with an expired lease)."""
        now = utcnow()
        due = sa.or_(
            sa.and_(
                webhook_deliveries.c.status == DeliveryStatus.pending.value,
                webhook_deliveries.c.available_at <= now,
            ),
            sa.and_(
                webhook_deliveries.c.status == DeliveryStatus.sending.value,
                webhook_deliveries.c.lease_expires_at < now,
            ),
        )
        query = (
            sa.select(webhook_deliveries, jobs.c.webhook_secret, jobs.c.webhook_disabled)
            .join(jobs, jobs.c.id == webhook_deliveries.c.job_id)
            .where(due)
            .order_by(webhook_deliveries.c.available_at, webhook_deliveries.c.id)
            .limit(limit)
        )
        if self.postgres:
            query = query.with_for_update(skip_locked=True, of=webhook_deliveries)
        claims = []
        with self.engine.begin() as conn:
            for row in conn.execute(query).all():
                if row.webhook_disabled:
                    conn.execute(
                        webhook_deliveries.update()
                        .where(webhook_deliveries.c.id == row.id)
                        .values(status=DeliveryStatus.disabled.value, finished_at=now, lease_token=None)
                    )
                    continue
                token = secrets.token_hex(16)
                conn.execute(
                    webhook_deliveries.update()
                    .where(webhook_deliveries.c.id == row.id)
                    .values(
                        status=DeliveryStatus.sending.value,
                        attempts=webhook_deliveries.c.attempts + 1,
                        lease_owner=owner,
                        lease_token=token,
                        lease_expires_at=now + timedelta(seconds=lease_s),
                    )
                )
                claims.append(
                    DeliveryClaim(
                        id=row.id,
                        job_id=row.job_id,
                        type=row.type,
                        url=row.url,
                        body=row.body.encode(),
                        secret=row.webhook_secret,
                        attempt=row.attempts + 1,
                        token=token,
                    )
                )
        return claims

    def settle(
        self,
        claim: DeliveryClaim,
        record: AttemptRecord,
        status: DeliveryStatus,
        retry_at: datetime | None = None,
    ) -> None:
        """Record the attempt and what comes next: ``pending`` again at ``retry_at``, or a final status.

        Raises:
            DeliveryLeaseLost: the token is no longer the delivery's.
        """
        now = utcnow()
        values: dict[str, Any] = {
            "status": status.value,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
        }
        if status is DeliveryStatus.pending:
            values["available_at"] = retry_at or now
        else:
            values["finished_at"] = now
        with self.engine.begin() as conn:
            updated = conn.execute(
                webhook_deliveries.update()
                .where(webhook_deliveries.c.id == claim.id, webhook_deliveries.c.lease_token == claim.token)
                .values(**values)
            ).rowcount
            if not updated:
                raise DeliveryLeaseLost(f"delivery {claim.id} is no longer held with this lease")
            conn.execute(
                webhook_attempts.insert().values(
                    delivery_id=claim.id,
                    number=claim.attempt,
                    started_at=record.started_at,
                    duration_s=record.duration_s,
                    status_code=record.status_code,
                    outcome=record.outcome,
                    error=record.error,
                )
            )
            if status is DeliveryStatus.disabled:
                conn.execute(jobs.update().where(jobs.c.id == claim.job_id).values(webhook_disabled=True))
                conn.execute(
                    webhook_deliveries.update()
                    .where(
                        webhook_deliveries.c.job_id == claim.job_id,
                        webhook_deliveries.c.status == DeliveryStatus.pending.value,
                    )
                    .values(status=DeliveryStatus.disabled.value, finished_at=now)
                )

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's deliveries, oldest first, each with its attempts."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(webhook_deliveries)
                .where(webhook_deliveries.c.job_id == job_id)
                .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id)
            ).all()
            attempts = conn.execute(
                sa.select(webhook_attempts)
                .join(webhook_deliveries, webhook_deliveries.c.id == webhook_attempts.c.delivery_id)
                .where(webhook_deliveries.c.job_id == job_id)
                .order_by(webhook_attempts.c.delivery_id, webhook_attempts.c.number)
            ).all()
        by_delivery: dict[str, list[dict[str, Any]]] = {}
        for attempt in attempts:
            by_delivery.setdefault(attempt.delivery_id, []).append(
                {
                    "number": attempt.number,
                    "started_at": iso(attempt.started_at),
                    "duration_ms": round(attempt.duration_s * 1000, 1),
                    "status_code": attempt.status_code,
                    "outcome": attempt.outcome,
                    "error": attempt.error,
                }
            )
        return [
            {
                "id": row.id,
                "type": row.type,
                "status": row.status,
                "created_at": iso(row.created_at),
                "next_attempt_at": iso(row.available_at) if row.status == DeliveryStatus.pending else None,
                "finished_at": iso(row.finished_at),
                "attempts": by_delivery.get(row.id, []),
            }
            for row in rows
        ]

    def redeliver(self, job_id: str) -> str:
        """Queue the job's latest event for one more attempt now (re-enabling an endpoint that answered
        410); returns its id.

        Raises:
            NothingToRedeliver: the job has no event yet, or its latest one is being sent right now.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            query = (
                sa.select(webhook_deliveries)
                .where(webhook_deliveries.c.job_id == job_id)
                .order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id.desc())
                .limit(1)
            )
            if self.postgres:
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise NothingToRedeliver("the job has sent no webhook event yet")
            if row.status == DeliveryStatus.sending and (aware(row.lease_expires_at) or now) > now:
                raise NothingToRedeliver(f"event {row.id} is being delivered right now; retry in a moment")
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(webhook_disabled=False))
            conn.execute(
                webhook_deliveries.update()
                .where(webhook_deliveries.c.id == row.id)
                .values(
                    status=DeliveryStatus.pending.value,
                    available_at=now,
                    finished_at=None,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                )
            )
            return str(row.id)

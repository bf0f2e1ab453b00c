"""Job and file states, priorities and the values the store hands out.

::

    job:   created ──start──▶ queued ──first claim──▶ running ──last file, results written──▶ succeeded
              │                 │                        │                                 └▶ failed
              └────────────── cancel (any time before the end) ──────────────────────────▶ cancelled

    file:  pending ──claim──▶ running ──▶ succeeded | failed
              ▲                  │
              └── retry, lease ──┘         cancelled (its job was cancelled)

A job is ``failed`` only when every file failed; with some failed files it is ``succeeded`` and lists
them in its errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    created = "created"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class FileStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobPriority(StrEnum):
    """How large a share of the workers a job gets while others run (weights 1, 2, 4)."""

    low = "low"
    normal = "normal"
    high = "high"

    @property
    def weight(self) -> int:
        return {"low": 1, "normal": 2, "high": 4}[self.value]


@dataclass(frozen=True, slots=True)
class Claim:
    """A file a worker holds under a lease: only this token may complete or fail it."""

    file_id: int
    job_id: str
    position: int
    name: str
    storage_key: str
    token: str
    attempt: int
    parameters: dict[str, Any]
    sha256: str | None


@dataclass(frozen=True, slots=True)
class Assembly:
    """A job whose files are all done, held by one assembler while it writes the results."""

    job_id: str
    token: str
    status: JobStatus
    created_at: datetime

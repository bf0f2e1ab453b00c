"""What a job's webhook is told: terminal events always, the others when the job subscribes.

Body: ``{"type", "timestamp", "data"}`` (see :func:`gateway.jobs.views.event_data` for a terminal
event's ``data``).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from gateway.errors import InvalidParameter


class EventType(StrEnum):
    job_started = "job.started"
    job_progress = "job.progress"
    job_succeeded = "job.succeeded"
    job_failed = "job.failed"
    job_cancelled = "job.cancelled"
    file_failed = "file.failed"


OPTIONAL = frozenset({EventType.job_started, EventType.job_progress, EventType.file_failed})
"""Sent only to jobs whose ``webhook_events`` name them; terminal events always go."""

TERMINAL = {
    "succeeded": EventType.job_succeeded,
    "failed": EventType.job_failed,
    "cancelled": EventType.job_cancelled,
}


def parse_subscriptions(value: str | Iterable[str] | None) -> list[str]:
    """``webhook_events`` as sorted event types (``"job.started,file.failed"`` or a JSON list).

    Raises:
        InvalidParameter: an event that cannot be subscribed to.
    """
    if value is None:
        return []
    words = value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]
    allowed = sorted(e.value for e in OPTIONAL)
    unknown = sorted(set(words) - set(allowed))
    if unknown:
        raise InvalidParameter(
            f"webhook_events takes {', '.join(allowed)} (terminal events are always sent); got "
            f"{', '.join(map(repr, unknown))}",
            parameter="webhook_events",
        )
    return sorted(set(words))

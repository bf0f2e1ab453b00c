"""What the client raises.

::

    PalmServeError
    ├── ServiceUnreachable        the service could not be reached (refused, DNS, timeout, dropped)
    ├── IntegrityError            a download does not match the sha256 the service announced
    └── ProblemError              the service answered with an RFC 9457 problem (``type``, ``title``,
        │                         ``detail``, ``status``, extension members)
        ├── BadRequest            400, 413, 415, 422: the request or a file is at fault
        ├── Unauthorized          401: no API key, or an unknown one
        ├── Forbidden             403: the key may not do this
        ├── NotFound              404: no such job (or not this key's)
        ├── Conflict              409: contradicts the job's state (results not ready, start twice)
        ├── RateLimited           429: retried with backoff; raised once the retries are spent
        ├── Unavailable           503: retried with backoff; raised once the retries are spent
        └── ServerError           other 5xx
"""

from __future__ import annotations

from typing import Any

PROBLEM_TYPE_BASE = "https://palm-serve.dev/problems/"


class PalmServeError(Exception):
    """Base of everything the client raises on purpose."""


class ServiceUnreachable(PalmServeError):
    """No HTTP answer: the connection was refused, timed out or dropped."""


class IntegrityError(PalmServeError):
    """A downloaded document's sha256 differs from the ETag the service sent with it."""


class ProblemError(PalmServeError):
    """An error answer of the service.

    Attributes:
        status: the HTTP status.
        type: the problem type URI (``https://palm-serve.dev/problems/job-not-found``).
        title: the short, fixed summary of the type.
        detail: what went wrong with this request, for a person.
        extensions: the problem's other members (``job_id``, ``names``, ...).
        retry_after: seconds the service asked to wait, if it said.
    """

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str,
        extensions: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.extensions = extensions or {}
        self.retry_after = retry_after

    @property
    def slug(self) -> str:
        """The last part of :attr:`type` (``job-not-found``)."""
        return self.type.rsplit("/", 1)[-1]


class BadRequest(ProblemError):
    pass


class Unauthorized(ProblemError):
    pass


class Forbidden(ProblemError):
    pass


class NotFound(ProblemError):
    pass


class Conflict(ProblemError):
    pass


class RateLimited(ProblemError):
    pass


class Unavailable(ProblemError):
    pass


class ServerError(ProblemError):
    pass


_BY_STATUS: dict[int, type[ProblemError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: Unavailable,
}


def problem_class(status: int) -> type[ProblemError]:
    """The exception class for an error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return BadRequest

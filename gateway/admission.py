"""Load shedding: a bounded number of requests of one kind at once, the rest refused at the door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import Overloaded


class Admission:
    """Admits at most ``limit`` requests at once and refuses the rest at the door (no unbounded queue).

    Refusing early keeps latency bounded under overload: a client told to come back (503 +
    Retry-After) costs nothing, an upload queued behind hundreds of others costs disk and times out.
    """

    def __init__(self, limit: int, what: str = "requests") -> None:
        self.limit = limit
        self.what = what
        self.active = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} {self.what} are in progress (the limit is {self.limit}); retry shortly"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

"""The job database's engine: SQLite in WAL mode under the data dir by default, any SQLAlchemy URL else.

SQLite is configured for one writer at a time and many readers: every transaction starts with
``BEGIN IMMEDIATE`` (a writer takes the lock at the start, not at its first write, so two claims never
deadlock), the journal is a write-ahead log, commits are fsynced (``synchronous=FULL``: a commit
survives a crash of the machine, not only of the process), foreign keys are enforced and a busy
database is waited for up to ``BUSY_TIMEOUT_MS``. PostgreSQL needs nothing special: leases use
``FOR UPDATE SKIP LOCKED`` there (see :mod:`gateway.jobs.store`).

Calls are synchronous; async code runs them through :class:`Database` in a small thread pool, so the
event loop never waits on disk or network.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from gateway.errors import TemporarilyUnavailable

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
DB_THREADS = 4


def database_url(data_dir: Path, url: str | None) -> str:
    """``url``, or SQLite at ``<data_dir>/palm.db``."""
    return url or f"sqlite:///{Path(data_dir).resolve() / 'palm.db'}"


def create_engine(url: str) -> sa.Engine:
    """An engine for ``url`` with the settings this module documents."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
            pool_size=DB_THREADS + 2,
        )

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions are begun below, not by the driver
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=DB_THREADS + 2)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, in UTC (SQLite returns them without a zone)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class DatabaseUnavailable(TemporarilyUnavailable):
    slug = "database-unavailable"
    title = "Database unavailable"


def _reason(exc: sa.exc.DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0][:200] if exc.orig is not None else type(exc).__name__


class Database:
    """An engine plus the threads that run its blocking calls for async code."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="palm-db")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a database thread.

        Raises:
            DatabaseUnavailable: the database cannot be reached or refused the operation for reasons of
                its own (locked, out of space, shut down); nothing of the call was committed.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"the job database is unavailable ({_reason(exc)}); retry shortly"
            ) from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()

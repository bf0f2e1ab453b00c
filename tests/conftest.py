"""Shared fixtures: the seeded GeoTIFF factory, the shared real-world corpus, and the two databases the
job engine supports (SQLite, and a real PostgreSQL from the ``pgserver`` wheel: one server per test
session on a Unix socket in a temporary directory, one fresh database per test)."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.db.engine import create_engine
from gateway.db.migrate import upgrade
from tests.factories import make_geotiff

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"

GeoTiffFactory = Callable[..., Path]


@pytest.fixture
def geotiff(tmp_path: Path) -> GeoTiffFactory:
    """``geotiff(width=..., bands=..., dtype=..., crs=..., nodata=..., ...)`` → path of a fresh GeoTIFF.

    Takes every keyword of :func:`tests.factories.make_geotiff`; files land in the test's tmp_path.
    """
    counter = itertools.count()

    def make(name: str | None = None, **kwargs: Any) -> Path:
        return make_geotiff(tmp_path / (name or f"fixture-{next(counter)}.tif"), **kwargs)

    return make


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` next to the repository; tests using it skip when it is absent."""
    if not (CORPUS_DIR / "MANIFEST.tsv").is_file():
        pytest.skip(f"real-world corpus not found at {CORPUS_DIR} (it lives outside the repository)")
    return CORPUS_DIR


DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A PostgreSQL server for the session (stopped at its end)."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()


def postgres_url(server: Any, database: str) -> str:
    return str(server.get_uri(database)).replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: SQLite in the test's directory, or a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'palm.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"t_{secrets.token_hex(6)}"
        server.psql(f"CREATE DATABASE {name};")
        url = postgres_url(server, name)
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    if request.param == "postgresql":
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()

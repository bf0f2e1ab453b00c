"""The migrations build exactly the tables ``gateway/db/tables.py`` declares, on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway.db.tables import metadata


def test_the_migrated_schema_matches_the_tables(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []

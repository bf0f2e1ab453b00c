"""Bring a database to the current schema with Alembic (``migrations/``), at service start."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine) -> None:
    """Apply every migration the database lacks (a no-op when it is current)."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")

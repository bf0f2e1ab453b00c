"""Each file's resolution: its ground sample distance, where it came from, and what the model saw.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gsd_m", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("gsd_source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("inference_gsd_m", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("resample_factor", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_column("resample_factor")
        batch_op.drop_column("inference_gsd_m")
        batch_op.drop_column("gsd_source")
        batch_op.drop_column("gsd_m")

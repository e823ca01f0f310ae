"""blobs: large blobs of a SQLite database may live in a file beside it (file, file_offset)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("file", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("file_offset", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("file_offset")
        batch.drop_column("file")

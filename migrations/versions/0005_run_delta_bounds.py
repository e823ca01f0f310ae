"""runs: per-run delta bounds (L2 norm above which a delta is rejected, sample-count cap)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 04:35:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("max_norm", sa.Float(), nullable=True))
        batch.add_column(sa.Column("max_samples", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("max_samples")
        batch.drop_column("max_norm")

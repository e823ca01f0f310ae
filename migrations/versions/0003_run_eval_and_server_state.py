"""runs: held-out evaluation data and the server optimizer's state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 03:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("eval_data", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column(
                "server_state_blob_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
            )
        )
        batch.create_foreign_key(
            batch.f("fk_runs_server_state_blob_id_blobs"), "blobs", ["server_state_blob_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(batch.f("fk_runs_server_state_blob_id_blobs"), type_="foreignkey")
        batch.drop_column("server_state_blob_id")
        batch.drop_column("eval_data")

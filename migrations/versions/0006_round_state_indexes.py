"""tasks and deltas: (round_id, state/status) indexes for the round rule asked once per delta batch

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tasks_round_state", "tasks", ["round_id", "state"])
    op.create_index("ix_deltas_round_status", "deltas", ["round_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_deltas_round_status", table_name="deltas")
    op.drop_index("ix_tasks_round_state", table_name="tasks")

"""initial schema: models, versions, blobs, rounds, tasks, deltas, workers, jobs, outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:04:50.290143

Model versions and stored weights are immutable: besides the ORM guard, triggers refuse an UPDATE of
any model_versions column but ``status`` and any UPDATE of blobs / blob_chunks, on both backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids where row counts grow without bound; SQLite only auto-increments INTEGER.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_VERSION_COLUMNS = (
    "id, model_pk, version, parent_id, weights_blob_id, weights_sha256, weights_size, array_count, "
    "parameter_count, layout_sha256, signature, "
    "round_id, strategy, strategy_config, metrics, timestamp_id, note, created_at"
)

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER trg_model_versions_immutable BEFORE UPDATE OF {_VERSION_COLUMNS}
    ON model_versions BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END""",
    """CREATE TRIGGER trg_blobs_immutable BEFORE UPDATE ON blobs
    BEGIN SELECT RAISE(ABORT, 'stored weights are immutable'); END""",
    """CREATE TRIGGER trg_blob_chunks_immutable BEFORE UPDATE ON blob_chunks
    BEGIN SELECT RAISE(ABORT, 'stored weights are immutable'); END""",
]

_POSTGRES_TRIGGERS = [
    """CREATE FUNCTION fedmq_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME; END $$""",
    f"""CREATE TRIGGER trg_model_versions_immutable BEFORE UPDATE OF {_VERSION_COLUMNS}
    ON model_versions FOR EACH ROW EXECUTE FUNCTION fedmq_refuse_update()""",
    """CREATE TRIGGER trg_blobs_immutable BEFORE UPDATE ON blobs
    FOR EACH ROW EXECUTE FUNCTION fedmq_refuse_update()""",
    """CREATE TRIGGER trg_blob_chunks_immutable BEFORE UPDATE ON blob_chunks
    FOR EACH ROW EXECUTE FUNCTION fedmq_refuse_update()""",
]


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blobs")),
    )
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blobs_sha256"), ["sha256"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("model_type", sa.String(length=64), nullable=False),
        sa.Column("code", sa.LargeBinary(), nullable=False),
        sa.Column("code_sha256", sa.String(length=64), nullable=False),
        sa.Column("code_envelope", sa.LargeBinary(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("credentials_fingerprint", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("info", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("name", name=op.f("uq_workers_name")),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("blob_id", BIG_ID, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_id"], ["blobs.id"], name=op.f("fk_blob_chunks_blob_id_blobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("blob_id", "seq", name=op.f("pk_blob_chunks")),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("weights_blob_id", BIG_ID, nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("weights_size", sa.BigInteger(), nullable=False),
        sa.Column("array_count", sa.Integer(), nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("layout_sha256", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=True),
        sa.Column("strategy_config", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("timestamp_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name=op.f("fk_model_versions_model_pk_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["weights_blob_id"], ["blobs.id"], name=op.f("fk_model_versions_weights_blob_id_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("model_pk", "version", name=op.f("uq_model_versions_model_pk")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_model_pk"), ["model_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_versions_round_id"), ["round_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_model_versions_weights_blob_id"), ["weights_blob_id"], unique=False
        )

    op.create_table(
        "outbox",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("exchange", sa.String(length=255), nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("body_blob_id", BIG_ID, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["body_blob_id"], ["blobs.id"], name=op.f("fk_outbox_body_blob_id_blobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_pending", ["sent_at", "id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("worker_id", sa.Integer(), nullable=True),
        sa.Column("input_blob_id", BIG_ID, nullable=True),
        sa.Column("result_blob_id", BIG_ID, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["input_blob_id"], ["blobs.id"], name=op.f("fk_jobs_input_blob_id_blobs")),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name=op.f("fk_jobs_model_pk_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["result_blob_id"], ["blobs.id"], name=op.f("fk_jobs_result_blob_id_blobs")),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_jobs_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.id"], name=op.f("fk_jobs_worker_id_workers"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("job_id", name=op.f("uq_jobs_job_id")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_model_pk"), ["model_pk"], unique=False)

    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("base_version_id", sa.Integer(), nullable=False),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("strategy_config", sa.JSON(), nullable=True),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["base_version_id"],
            ["model_versions.id"],
            name=op.f("fk_rounds_base_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name=op.f("fk_rounds_model_pk_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["model_versions.id"],
            name=op.f("fk_rounds_result_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
    )
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rounds_model_pk"), ["model_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_rounds_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rounds_state"), ["state"], unique=False)

    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_tasks_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.id"], name=op.f("fk_tasks_worker_id_workers"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("task_id", name=op.f("uq_tasks_task_id")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tasks_round_id"), ["round_id"], unique=False)

    op.create_table(
        "deltas",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.Integer(), nullable=True),
        sa.Column("worker_name", sa.String(length=200), nullable=True),
        sa.Column("base_version_id", sa.Integer(), nullable=True),
        sa.Column("weights_blob_id", BIG_ID, nullable=True),
        sa.Column("sample_count", sa.BigInteger(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_version_id"],
            ["model_versions.id"],
            name=op.f("fk_deltas_base_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_deltas_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.task_id"], name=op.f("fk_deltas_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["weights_blob_id"], ["blobs.id"], name=op.f("fk_deltas_weights_blob_id_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.id"], name=op.f("fk_deltas_worker_id_workers"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deltas")),
        sa.UniqueConstraint("task_id", name=op.f("uq_deltas_task_id")),
    )
    with op.batch_alter_table("deltas", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deltas_round_id"), ["round_id"], unique=False)

    triggers = _POSTGRES_TRIGGERS if op.get_bind().dialect.name == "postgresql" else _SQLITE_TRIGGERS
    for statement in triggers:
        op.execute(statement)


def downgrade() -> None:
    for trigger, table in (
        ("trg_blob_chunks_immutable", "blob_chunks"),
        ("trg_blobs_immutable", "blobs"),
        ("trg_model_versions_immutable", "model_versions"),
    ):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS fedmq_refuse_update()")
    with op.batch_alter_table("deltas", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deltas_round_id"))

    op.drop_table("deltas")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_round_id"))

    op.drop_table("tasks")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rounds_state"))
        batch_op.drop_index(batch_op.f("ix_rounds_run_id"))
        batch_op.drop_index(batch_op.f("ix_rounds_model_pk"))

    op.drop_table("rounds")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_model_pk"))

    op.drop_table("jobs")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_pending")

    op.drop_table("outbox")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_weights_blob_id"))
        batch_op.drop_index(batch_op.f("ix_model_versions_round_id"))
        batch_op.drop_index(batch_op.f("ix_model_versions_model_pk"))

    op.drop_table("model_versions")
    op.drop_table("blob_chunks")
    op.drop_table("workers")
    op.drop_table("models")
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blobs_sha256"))

    op.drop_table("blobs")

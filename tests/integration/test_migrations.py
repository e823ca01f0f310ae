"""Migrations on real databases: they match the ORM models, go down and up, and gate start-up."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, String, inspect, text

from common.errors import SchemaOutOfDateError
from common.settings import Settings
from coordinator.db import Database, current_revision, head_revision, require_current, upgrade
from coordinator.db.models import Base
from coordinator.db.schema import downgrade

pytestmark = pytest.mark.integration


@pytest.fixture
def db(database_url: str):
    database = Database.from_settings(Settings(database_url=database_url))
    yield database
    database.dispose()


def test_migrations_and_orm_models_do_not_drift_apart(db: Database):
    upgrade(db)

    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)

    assert differences == [], "the ORM models and migrations/versions differ: write a migration"


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(db: Database):
    upgrade(db)

    downgrade(db, "base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(db)

    assert set(Base.metadata.tables) <= set(inspect(db.engine).get_table_names())
    assert current_revision(db) == head_revision()


def test_start_up_check_says_what_to_run(db: Database):
    with pytest.raises(SchemaOutOfDateError, match="run `fedmq db upgrade`"):
        require_current(db)

    upgrade(db)
    require_current(db)


def test_a_database_from_a_newer_fedmq_is_refused(db: Database):
    upgrade(db)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'fffffffffff'"))

    with pytest.raises(SchemaOutOfDateError, match="newer than this fedmq"):
        require_current(db)


def test_upgrade_twice_changes_nothing(db: Database):
    first = upgrade(db)
    second = upgrade(db)

    assert first == (None, head_revision())
    assert second == (head_revision(), head_revision())


def test_the_drift_check_notices_a_column_missing_from_the_migrations(db: Database):
    upgrade(db)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["models"].append_column(Column("owner", String(64)))

    with db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), changed)

    assert [d[0] for d in differences] == ["add_column"]

"""Many rows in a few statements with their ids in order (coordinator/db/bulk.py), on both backends.

What a user would notice if this were wrong: a delta row pointing at another delta's weights, or
the coordinator's running aggregation counting a delta under another one's id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from common.errors import StorageError
from common.settings import Settings
from coordinator.db import Database, upgrade
from coordinator.db.bulk import insert_rows
from coordinator.db.models import Blob, utcnow

pytestmark = pytest.mark.integration


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database.from_settings(Settings(database_url=database_url))
    upgrade(database)
    try:
        yield database
    finally:
        database.dispose()


def _rows(tag: str, n: int) -> list[dict[str, object]]:
    now = utcnow()
    return [
        {
            "sha256": hashlib.sha256(f"{tag}-{i}".encode()).hexdigest(),
            "size": i,
            "chunk_size": 1,
            "created_at": now,
        }
        for i in range(n)
    ]


def _sha_by_id(db: Database) -> dict[int, str]:
    with db.session() as session:
        return {blob_id: sha256 for blob_id, sha256 in session.execute(select(Blob.id, Blob.sha256))}


def test_each_row_gets_its_own_new_id_in_order_after_rows_written_before(db: Database) -> None:
    # Prepare: rows written by the ORM, the newest deleted again (SQLite would reuse its id)
    with db.session(write=True) as session:
        session.add_all([Blob(sha256="a" * 64, size=1, chunk_size=1) for _ in range(5)])
    with db.session(write=True) as session:
        newest = session.scalar(select(Blob.id).order_by(Blob.id.desc()).limit(1))
        session.execute(delete(Blob).where(Blob.id == newest))
    before = _sha_by_id(db)

    # Execute: two calls in one transaction, then an ORM insert after them
    first, second = _rows("first", 700), _rows("second", 3)
    with db.session(write=True) as session:
        first_ids = insert_rows(session, Blob.__table__, first)  # type: ignore[arg-type]
        second_ids = insert_rows(session, Blob.__table__, second)  # type: ignore[arg-type]
        later = Blob(sha256="b" * 64, size=1, chunk_size=1)
        session.add(later)
        session.flush()
        later_id = later.id

    # Assert
    stored = _sha_by_id(db)
    ids = first_ids + second_ids
    assert len(set(ids)) == len(ids) == 703 and ids == sorted(ids)
    assert min(ids) > max(before) and later_id > max(ids)
    assert [stored[i] for i in ids] == [row["sha256"] for row in first + second]
    assert {i: stored[i] for i in before} == before  # nothing written before was touched
    with db.session(write=True) as session:
        assert insert_rows(session, Blob.__table__, []) == []  # type: ignore[arg-type]


def test_on_sqlite_a_transaction_without_the_write_lock_cannot_take_ids_another_writer_took(
    tmp_path: Path,
) -> None:
    # Prepare: a read transaction has seen the largest id when another writer commits new rows
    db = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path}/fedmq.db"))
    upgrade(db)
    try:
        with db.session(write=True) as session:
            insert_rows(session, Blob.__table__, _rows("old", 2))  # type: ignore[arg-type]
        with pytest.raises(StorageError), db.session() as stale:  # Execute
            stale.scalar(select(Blob.id).limit(1))  # its snapshot starts here
            with db.session(write=True) as other:
                insert_rows(other, Blob.__table__, _rows("other", 2))  # type: ignore[arg-type]
            insert_rows(stale, Blob.__table__, _rows("stale", 2))  # type: ignore[arg-type]

        # Assert: the other writer's rows stand, none of the stale transaction's were written
        stored = set(_sha_by_id(db).values())
        assert {row["sha256"] for row in _rows("other", 2)} <= stored
        assert not {row["sha256"] for row in _rows("stale", 2)} & stored
    finally:
        db.dispose()

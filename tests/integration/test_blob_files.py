"""Large blobs of a SQLite database live in files beside it (coordinator/db/blobs.py).

What a user notices: a 100 MB delta is not written into the WAL and the database file again, the
blob directory holds one file per large blob, a delta that arrived in chunks keeps the very file it
was reassembled in, damage is refused on read, and nothing is left behind by a rolled-back or
crashed transaction or a deleted blob. PostgreSQL keeps every blob in SQL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from common.errors import StorageError
from common.settings import Settings
from coordinator.db import Database, upgrade
from coordinator.db.blobs import (
    FILE_MIN_SIZE,
    FileRegion,
    blob_dir,
    delete_blobs,
    read_blob,
    sweep_blob_files,
    write_blob,
    write_blobs,
)
from coordinator.db.models import Blob, BlobChunk

pytestmark = pytest.mark.integration

SIZE = FILE_MIN_SIZE + 12345


@pytest.fixture
def db(database_url: str):
    database = Database.from_settings(Settings(database_url=database_url))
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path):
    database = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'fedmq.db'}"))
    upgrade(database)
    yield database
    database.dispose()


def random_bytes(size: int = SIZE, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def chunk_count(session) -> int:
    return int(session.scalar(select(func.count()).select_from(BlobChunk)) or 0)


def test_a_large_blob_round_trips_on_both_backends_and_only_sqlite_keeps_it_in_a_file(db: Database):
    data = random_bytes()

    with db.session(write=True) as session:
        blob_id = write_blob(session, data).id
    with db.session() as session:
        back = read_blob(session, blob_id)
        row = session.get(Blob, blob_id)
        chunks = chunk_count(session)
        directory = blob_dir(session)

    assert bytes(back) == data
    if db.backend == "sqlite":
        assert directory is not None and directory.name == "fedmq.db-blobs"
        assert row is not None and row.file is not None and chunks == 0
        assert (directory / row.file).stat().st_size == SIZE
    else:
        assert directory is None and row is not None and row.file is None and chunks > 0


def test_small_blobs_stay_in_sql(sqlite_db: Database):
    with sqlite_db.session(write=True) as session:
        ids = write_blobs(session, [b"tiny", random_bytes(FILE_MIN_SIZE - 1)])
    with sqlite_db.session() as session:
        assert [session.get(Blob, i).file for i in ids] == [None, None]  # type: ignore[union-attr]
        assert bytes(read_blob(session, ids[0])) == b"tiny"
        assert list((blob_dir(session) or Path("/nonexistent")).glob("*")) == []


def test_a_reassembled_delta_file_is_linked_not_written_again(sqlite_db: Database, tmp_path: Path):
    # Prepare: a "reassembled transfer": a header, then the payload at its tail.
    payload = random_bytes(seed=1)
    part = tmp_path / "transfers" / "t1.part"
    part.parent.mkdir()
    part.write_bytes(b"HEADER" * 10 + payload)
    region = FileRegion(part, 60, len(payload))

    # Execute
    with sqlite_db.session(write=True) as session:
        (blob_id,) = write_blobs(session, [payload], [region])
    part_inode = part.stat().st_ino
    part.unlink()  # what the reassembler does once the handler returned

    # Assert
    with sqlite_db.session() as session:
        row = session.get(Blob, blob_id)
        assert row is not None and row.file is not None and row.file_offset == 60
        directory = blob_dir(session)
        assert directory is not None
        assert (directory / row.file).stat().st_ino == part_inode
        assert bytes(read_blob(session, blob_id)) == payload


def test_damaged_or_missing_blob_files_are_refused(sqlite_db: Database):
    with sqlite_db.session(write=True) as session:
        first = write_blob(session, random_bytes(seed=2))
        second = write_blob(session, random_bytes(seed=3))
        directory = blob_dir(session)
    assert directory is not None and first.file is not None and second.file is not None
    with open(directory / first.file, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\xff")
    (directory / second.file).unlink()

    with sqlite_db.session() as session:
        with pytest.raises(StorageError, match="does not match their sha256"):
            read_blob(session, first.id)
        with pytest.raises(StorageError, match="is missing"):
            read_blob(session, second.id)


def test_a_rolled_back_blob_leaves_a_file_that_the_sweep_removes(sqlite_db: Database):
    # Prepare: one committed blob, one whose transaction fails after its file was written.
    with sqlite_db.session(write=True) as session:
        kept = write_blob(session, random_bytes(seed=4))
    with pytest.raises(RuntimeError), sqlite_db.session(write=True) as session:
        write_blob(session, random_bytes(seed=5))
        raise RuntimeError("the transaction fails")
    with sqlite_db.session() as session:
        directory = blob_dir(session)
    assert directory is not None and len(list(directory.iterdir())) == 2

    # Execute: a young orphan is spared (its transaction may still be open), an old one goes.
    with sqlite_db.session() as session:
        spared = sweep_blob_files(session)
    old = time.time() - 7200
    for path in directory.iterdir():
        os.utime(path, (old, old))
    with sqlite_db.session() as session:
        removed = sweep_blob_files(session)

    # Assert
    assert (spared, removed) == (0, 1)
    assert [p.name for p in directory.iterdir()] == [kept.file]
    with sqlite_db.session() as session:
        assert bytes(read_blob(session, kept.id)) == random_bytes(seed=4)


def test_a_deleted_blob_loses_its_file_only_when_the_delete_commits(sqlite_db: Database):
    with sqlite_db.session(write=True) as session:
        blob = write_blob(session, random_bytes(seed=6))
        directory = blob_dir(session)
    assert directory is not None and blob.file is not None
    path = directory / blob.file

    with pytest.raises(RuntimeError), sqlite_db.session(write=True) as session:
        delete_blobs(session, {blob.id})
        raise RuntimeError("the transaction fails")
    assert path.exists()
    with sqlite_db.session() as session:
        assert bytes(read_blob(session, blob.id)) == random_bytes(seed=6)

    with sqlite_db.session(write=True) as session:
        delete_blobs(session, {blob.id})
    assert not path.exists()


def test_a_region_with_a_verified_digest_is_not_hashed_again(
    sqlite_db: Database, tmp_path: Path, monkeypatch
):
    """A chunked delta's frame comes with the sha256 its transfer's check computed: the blob row
    takes it (read_blob still checks the bytes against it)."""
    import hashlib

    from coordinator.db import blobs

    payload = random_bytes(seed=4)
    part = tmp_path / "t2.part"
    part.write_bytes(b"H" * 60 + payload)
    digest = hashlib.sha256(payload).hexdigest()
    hashed: list[int] = []
    real = blobs._sha256
    monkeypatch.setattr(blobs, "_sha256", lambda parts: hashed.append(len(parts)) or real(parts))

    with sqlite_db.session(write=True) as session:
        (blob_id,) = write_blobs(session, [payload], [FileRegion(part, 60, len(payload), digest)])

    assert hashed == []
    with sqlite_db.session() as session:
        row = session.get(Blob, blob_id)
        assert row is not None and row.sha256 == digest
        assert bytes(read_blob(session, blob_id)) == payload

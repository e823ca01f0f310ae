"""Large byte strings in SQL as fixed-size chunks, written once, read back with one copy.

Why chunks: a 100 MB weight frame bound as one parameter makes drivers hold extra full copies (and
PostgreSQL's text protocol doubles it as hex). Chunks of :data:`CHUNK_SIZE` bytes are inserted one
at a time from zero-copy slices of the caller's buffer, and read one at a time into a single
pre-allocated ``bytearray``: peak memory is the frame plus one chunk on both backends.

Blob files: with a SQLite database in a file, a blob of at least :data:`FILE_MIN_SIZE` bytes is
kept in a file of the database's blob directory instead (``fedmq.db`` -> ``fedmq.db-blobs/``, beside
its ``-wal``; SQLite's own advice for blobs this large, "Internal Versus External BLOBs"). In SQL a
100 MB delta is written three times (the WAL, then the checkpoint's copy into the database file,
after the reassembly file it arrived in); as a file it is written once, and a delta that arrived in
chunks is not written again at all: its reassembled file is hard-linked into the directory (the
``source`` of :func:`write_blobs`). The row keeps the size, the sha256 and the file's name, so
reads are checked the same way. Order: the file is made durable (data, then directory entry) before
the transaction naming it commits, so a committed row always has its file; a file no committed row
names (the transaction rolled back, or the process died before the commit) is removed by
:func:`sweep_blob_files`; a deleted blob's file is removed after the deleting transaction commits.
The directory is part of the database: back them up, move and restore them together.
PostgreSQL (and in-memory SQLite) keep every blob in SQL: a standby coordinator on another host
sees the same blobs.

Contract: :func:`write_blob` stores bytes and returns the new :class:`Blob` row (flushed, so it has
an id); :func:`read_blob` returns a read-only ``memoryview`` whose sha256 was checked against the row,
raising :class:`~common.errors.StorageError` if a chunk or the file is missing or the content differs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import URL, delete, event, insert, select
from sqlalchemy.orm import Session

from common.durable import DirectWriter, fsync_path
from common.errors import NotFoundError, StorageError
from coordinator.db.bulk import insert_rows
from coordinator.db.models import Blob, BlobChunk, utcnow

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024
FILE_MIN_SIZE = CHUNK_SIZE  # smaller blobs stay in SQL: a row costs less than a file and two fsyncs
BLOB_DIR_SUFFIX = "-blobs"
ORPHAN_GRACE_S = 3600.0  # a file younger than this may belong to a transaction still open


Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class FileRegion:
    """``size`` bytes at ``offset`` of the file at ``path``: where a blob's bytes already are.

    The caller hands the file over for the blob (it is hard-linked, and must not change after);
    its bytes there must be the ones given to :func:`write_blobs`. ``sha256``, when set, is their
    digest as the caller verified it (a chunked transfer's checked tail), used instead of hashing
    them again.
    """

    path: Path
    offset: int
    size: int
    sha256: str | None = None


def blob_dir(session: Session) -> Path | None:
    """The blob directory of the session's database, or None where every blob stays in SQL."""
    return _blob_dir_of(session.get_bind().engine.url, os.getcwd())  # a relative path: per directory


@lru_cache(maxsize=16)
def _blob_dir_of(url: URL, cwd: str) -> Path | None:
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    directory = Path(str((Path(cwd) / database).resolve()) + BLOB_DIR_SUFFIX)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_path(directory.parent)
    return directory


_WRITERS = threading.local()


def _writer() -> DirectWriter:
    """This thread's writer (each keeps its own aligned buffer)."""
    writer: DirectWriter | None = getattr(_WRITERS, "writer", None)
    if writer is None:
        writer = _WRITERS.writer = DirectWriter()
    return writer


def _place_file(directory: Path, parts: Sequence[memoryview], source: FileRegion | None) -> tuple[str, int]:
    """Put a blob's bytes into a new file of ``directory`` (durable, but not its directory entry
    until :func:`_fsync_dir`); return the file's name and where the bytes start in it."""
    name = uuid.uuid4().hex
    target = directory / name
    if source is not None:
        try:
            fsync_path(source.path)  # chunks are synced at the end of their batch: this one is earlier
            os.link(source.path, target)
            os.utime(target)  # young again: sweep_blob_files spares files of open transactions by age
            return name, source.offset
        except OSError as exc:  # another file system, or links not allowed: write a copy
            logger.debug("blob file: cannot link %s (%s); writing a copy", source.path, exc)
    _writer().write_file(target, parts)  # O_DIRECT where it can: it is fsynced before commit anyway
    return name, 0


def write_blob(session: Session, data: Buffer | Sequence[Buffer]) -> Blob:
    """Store ``data`` (one buffer, or parts to concatenate) as a new blob in the session's transaction.

    Parts are hashed first, then cut into chunks through one chunk-sized staging buffer, so writing
    never holds a second copy of the whole (pass :attr:`common.codec.WeightFrame.parts` to avoid
    even the first). Returns the flushed :class:`Blob` row.
    """
    parts = (
        [memoryview(data).cast("B")]
        if isinstance(data, bytes | bytearray | memoryview)
        else [memoryview(part).cast("B") for part in data]
    )
    blob = Blob(sha256=_sha256(parts), size=sum(len(p) for p in parts), chunk_size=CHUNK_SIZE)
    directory = blob_dir(session) if blob.size >= FILE_MIN_SIZE else None
    if directory is not None:
        blob.file, blob.file_offset = _place_file(directory, parts, None)
        fsync_path(directory)
    session.add(blob)
    session.flush()
    if directory is None:
        seq = _write_chunks(session, blob.id, parts, blob.size)
        logger.debug("stored blob %d: %d bytes in %d chunks", blob.id, blob.size, seq)
    return blob


def write_blobs(
    session: Session, datas: Sequence[Buffer], sources: Sequence[FileRegion | None] | None = None
) -> list[int]:
    """Store each of ``datas`` as a new blob; return their ids, in order.

    Made for many small buffers (e.g. the deltas of a batch): their rows and chunks go in with one
    multi-row statement each, and the session is not flushed, so ORM rows added before keep their
    own batched flush. Buffers larger than a chunk are streamed in chunks as :func:`write_blob` does,
    or kept in files (module docstring); ``sources[i]``, when given, is a file already holding
    ``datas[i]``, taken over instead of written again.
    """
    views = [memoryview(data).cast("B") for data in datas]
    if sources is None:
        sources = [None] * len(views)
    if len(sources) != len(views):
        raise ValueError(f"{len(sources)} sources for {len(views)} blobs")
    for view, source in zip(views, sources, strict=True):
        if source is not None and source.size != len(view):
            raise ValueError(f"source of {source.size} bytes for a blob of {len(view)}")
    now = utcnow()
    rows: list[dict[str, object]] = [
        {
            "sha256": source.sha256 if source is not None and source.sha256 else _sha256([view]),
            "size": len(view),
            "chunk_size": CHUNK_SIZE,
            "created_at": now,
        }
        for view, source in zip(views, sources, strict=True)
    ]
    if not rows:
        return []
    directory = blob_dir(session)
    in_files = False
    for row, view, source in zip(rows, views, sources, strict=True):
        if directory is not None and len(view) >= FILE_MIN_SIZE:
            row["file"], row["file_offset"] = _place_file(directory, [view], source)
            in_files = True
        else:
            row["file"] = row["file_offset"] = None
    if in_files and directory is not None:
        fsync_path(directory)
    # Core: plain rows, none of the ORM bulk insert's bookkeeping
    ids = insert_rows(session, Blob.__table__, rows)  # type: ignore[arg-type]
    small = [
        {"blob_id": i, "seq": 0, "data": bytes(v)}
        for i, v, row in zip(ids, views, rows, strict=True)
        if 0 < len(v) <= CHUNK_SIZE and row["file"] is None
    ]
    if small:
        session.connection().execute(insert(BlobChunk.__table__), small)  # type: ignore[arg-type]
    for blob_id, view, row in zip(ids, views, rows, strict=True):
        if len(view) > CHUNK_SIZE and row["file"] is None:
            _write_chunks(session, blob_id, [view], len(view))
    return ids


def _sha256(parts: Sequence[memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _write_chunks(session: Session, blob_id: int, parts: Sequence[memoryview], size: int) -> int:
    """Cut ``parts`` into chunks of blob ``blob_id`` through one staging buffer; return the count."""
    conn = session.connection()
    insert_chunk = insert(BlobChunk.__table__)  # type: ignore[arg-type]
    staging = bytearray(min(CHUNK_SIZE, size))
    filled = seq = 0
    # One INSERT per chunk: a batched executemany would make the driver copy every chunk at once.
    for part in parts:
        position = 0
        while position < len(part):
            take = min(len(part) - position, CHUNK_SIZE - filled)
            staging[filled : filled + take] = part[position : position + take]
            filled += take
            position += take
            if filled == CHUNK_SIZE:
                conn.execute(insert_chunk, {"blob_id": blob_id, "seq": seq, "data": bytes(staging)})
                filled, seq = 0, seq + 1
    if filled:
        conn.execute(insert_chunk, {"blob_id": blob_id, "seq": seq, "data": bytes(staging[:filled])})
        seq += 1
    return seq


def read_blob(session: Session, blob_id: int) -> memoryview:
    """Read blob ``blob_id`` into one buffer, check its sha256, and return a read-only view of it."""
    blob = session.get(Blob, blob_id)
    if blob is None:
        raise NotFoundError(f"stored weights {blob_id} do not exist")
    if blob.file is not None:
        return _read_file_blob(session, blob)
    buffer = bytearray(blob.size)
    digest = hashlib.sha256()
    offset = 0
    for seq in range(_chunk_count(blob)):
        chunk = session.execute(
            select(BlobChunk.data).where(BlobChunk.blob_id == blob_id, BlobChunk.seq == seq)
        ).scalar_one_or_none()
        if chunk is None or offset + len(chunk) > blob.size:
            raise StorageError(f"stored weights {blob_id} are damaged: chunk {seq} is missing or too long")
        buffer[offset : offset + len(chunk)] = chunk
        digest.update(chunk)
        offset += len(chunk)
        del chunk
    if offset != blob.size or digest.hexdigest() != blob.sha256:
        raise StorageError(f"stored weights {blob_id} are damaged: content does not match its sha256")
    return memoryview(buffer).toreadonly()


def _read_file_blob(session: Session, blob: Blob) -> memoryview:
    directory = blob_dir(session)
    if directory is None:
        raise StorageError(f"stored weights {blob.id} are in a file, and this database has no blob directory")
    path = directory / str(blob.file)
    buffer = bytearray(blob.size)
    view = memoryview(buffer)
    try:
        with open(path, "rb") as handle:
            handle.seek(blob.file_offset or 0)
            filled = 0
            while filled < blob.size:
                n = handle.readinto(view[filled:])
                if not n:
                    break
                filled += n
    except FileNotFoundError:
        raise StorageError(f"stored weights {blob.id} are damaged: their file {path} is missing") from None
    if filled != blob.size or hashlib.sha256(buffer).hexdigest() != blob.sha256:
        raise StorageError(f"stored weights {blob.id} are damaged: {path} does not match their sha256")
    return view.toreadonly()


class BlobCache:
    """The few large blobs read or written last, in memory, by their sha256.

    Content-addressed, so a cached blob is right for every row naming that sha256, committed or
    not, on any connection: a version the round engine just stored is the next round's base, the
    release the relay publishes and what a fetch asks for, and each of them reads it from here
    instead of from SQL. At most ``capacity`` blobs are kept (least recently used dropped first).
    Thread-safe.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._blobs: OrderedDict[str, memoryview] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, sha256: str, data: bytes | memoryview) -> memoryview:
        """Keep ``data`` (whose sha256 the caller computed) as a read-only view; return it."""
        view = memoryview(data).toreadonly()
        with self._lock:
            self._blobs[sha256] = view
            self._blobs.move_to_end(sha256)
            while len(self._blobs) > self.capacity:
                self._blobs.popitem(last=False)
        return view

    def read(self, session: Session, blob_id: int, sha256: str) -> memoryview:
        """Blob ``blob_id`` (of content ``sha256``) from memory, else :func:`read_blob` (then kept)."""
        with self._lock:
            hit = self._blobs.get(sha256)
            if hit is not None:
                self._blobs.move_to_end(sha256)
                return hit
        return self.put(sha256, read_blob(session, blob_id))


def delete_blobs(session: Session, blob_ids: set[int]) -> None:
    """Delete the given blobs and their chunks (the caller checks nothing references them); their
    files go once the transaction commits."""
    if blob_ids:
        files = session.scalars(select(Blob.file).where(Blob.id.in_(blob_ids), Blob.file.is_not(None)))
        directory = blob_dir(session)
        if directory is not None:
            session.info.setdefault(_UNLINK_AFTER_COMMIT, []).extend(directory / str(f) for f in files)
        session.execute(delete(BlobChunk).where(BlobChunk.blob_id.in_(blob_ids)))
        session.execute(delete(Blob).where(Blob.id.in_(blob_ids)))


_UNLINK_AFTER_COMMIT = "fedmq_blob_files_to_unlink"


@event.listens_for(Session, "after_commit")
def _unlink_deleted_files(session: Session) -> None:
    for path in session.info.pop(_UNLINK_AFTER_COMMIT, []):
        path.unlink(missing_ok=True)


@event.listens_for(Session, "after_rollback")
def _keep_files_of_rolled_back_deletes(session: Session) -> None:
    session.info.pop(_UNLINK_AFTER_COMMIT, None)


def sweep_blob_files(session: Session, grace_s: float = ORPHAN_GRACE_S) -> int:
    """Remove the files of the blob directory that no blob row names and that are older than
    ``grace_s`` (a younger one may belong to a transaction not committed yet); return how many."""
    directory = blob_dir(session)
    if directory is None:
        return 0
    cutoff = time.time() - grace_s
    candidates = {}
    for path in directory.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                candidates[path.name] = path
        except FileNotFoundError:
            continue
    names = list(candidates)
    named: set[str] = set()
    for i in range(0, len(names), 500):
        named.update(
            str(f) for f in session.scalars(select(Blob.file).where(Blob.file.in_(names[i : i + 500])))
        )
    removed = 0
    for name, path in candidates.items():
        if name not in named:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d blob files no stored blob names (%s)", removed, directory)
    return removed


def _chunk_count(blob: Blob) -> int:
    return -(-blob.size // blob.chunk_size)

"""Large byte strings in SQL as fixed-size chunks, written once, read back with one copy.

Why chunks: a 100 MB weight frame bound as one parameter makes drivers hold extra full copies (and
PostgreSQL's text protocol doubles it as hex). Chunks of :data:`CHUNK_SIZE` bytes are inserted one
at a time from zero-copy slices of the caller's buffer, and read one at a time into a single
pre-allocated ``bytearray``: peak memory is the frame plus one chunk on both backends.

Contract: :func:`write_blob` stores bytes and returns the new :class:`Blob` row (flushed, so it has
an id); :func:`read_blob` returns a read-only ``memoryview`` whose sha256 was checked against the row,
raising :class:`~common.errors.StorageError` if a chunk is missing or the content differs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from common.errors import NotFoundError, StorageError
from coordinator.db.models import Blob, BlobChunk, utcnow

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024


Buffer = bytes | bytearray | memoryview


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
    session.add(blob)
    session.flush()
    seq = _write_chunks(session, blob.id, parts, blob.size)
    logger.debug("stored blob %d: %d bytes in %d chunks", blob.id, blob.size, seq)
    return blob


def write_blobs(session: Session, datas: Sequence[Buffer]) -> list[int]:
    """Store each of ``datas`` as a new blob; return their ids, in order.

    Made for many small buffers (e.g. the deltas of a batch): their rows and chunks go in with one
    multi-row statement each, and the session is not flushed, so ORM rows added before keep their
    own batched flush. Buffers larger than a chunk are streamed in chunks as :func:`write_blob` does.
    """
    views = [memoryview(data).cast("B") for data in datas]
    now = utcnow()
    rows = [
        {"sha256": _sha256([view]), "size": len(view), "chunk_size": CHUNK_SIZE, "created_at": now}
        for view in views
    ]
    if not rows:
        return []
    result = session.execute(insert(Blob).returning(Blob.id, sort_by_parameter_order=True), rows)
    ids = list(result.scalars())
    small = [
        {"blob_id": i, "seq": 0, "data": bytes(v)}
        for i, v in zip(ids, views, strict=True)
        if 0 < len(v) <= CHUNK_SIZE
    ]
    if small:
        session.connection().execute(insert(BlobChunk.__table__), small)  # type: ignore[arg-type]
    for blob_id, view in zip(ids, views, strict=True):
        if len(view) > CHUNK_SIZE:
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
    """Delete the given blobs and their chunks (the caller checks nothing references them)."""
    if blob_ids:
        session.execute(delete(BlobChunk).where(BlobChunk.blob_id.in_(blob_ids)))
        session.execute(delete(Blob).where(Blob.id.in_(blob_ids)))


def _chunk_count(blob: Blob) -> int:
    return -(-blob.size // blob.chunk_size)

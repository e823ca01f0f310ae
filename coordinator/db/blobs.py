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
from collections.abc import Sequence

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from common.errors import NotFoundError, StorageError
from coordinator.db.models import Blob, BlobChunk

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
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    blob = Blob(sha256=digest.hexdigest(), size=sum(len(p) for p in parts), chunk_size=CHUNK_SIZE)
    session.add(blob)
    session.flush()
    conn = session.connection()
    insert_chunk = insert(BlobChunk.__table__)  # type: ignore[arg-type]
    staging = bytearray(min(CHUNK_SIZE, blob.size))
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
                conn.execute(insert_chunk, {"blob_id": blob.id, "seq": seq, "data": bytes(staging)})
                filled, seq = 0, seq + 1
    if filled:
        conn.execute(insert_chunk, {"blob_id": blob.id, "seq": seq, "data": bytes(staging[:filled])})
        seq += 1
    logger.debug("stored blob %d: %d bytes in %d chunks", blob.id, blob.size, seq)
    return blob


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


def delete_blobs(session: Session, blob_ids: set[int]) -> None:
    """Delete the given blobs and their chunks (the caller checks nothing references them)."""
    if blob_ids:
        session.execute(delete(BlobChunk).where(BlobChunk.blob_id.in_(blob_ids)))
        session.execute(delete(Blob).where(Blob.id.in_(blob_ids)))


def _chunk_count(blob: Blob) -> int:
    return -(-blob.size // blob.chunk_size)

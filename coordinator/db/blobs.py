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

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from common.errors import NotFoundError, StorageError
from coordinator.db.models import Blob, BlobChunk

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024


def write_blob(session: Session, data: bytes | bytearray | memoryview, *, sha256: str | None = None) -> Blob:
    """Store ``data`` as a new blob in the session's transaction; ``sha256`` skips re-hashing."""
    view = memoryview(data).cast("B")
    digest = sha256 or hashlib.sha256(view).hexdigest()
    blob = Blob(sha256=digest, size=len(view), chunk_size=CHUNK_SIZE)
    session.add(blob)
    session.flush()
    # One INSERT per chunk: a batched executemany would make the driver copy every chunk at once.
    for seq, start in enumerate(range(0, len(view), CHUNK_SIZE)):
        session.execute(
            insert(BlobChunk), {"blob_id": blob.id, "seq": seq, "data": view[start : start + CHUNK_SIZE]}
        )
    logger.debug("stored blob %d: %d bytes in %d chunks", blob.id, blob.size, _chunk_count(blob))
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

"""Large bodies as numbered chunks, and their reassembly on disk with bounded memory.

Framing (AMQP headers on every chunk; the chunk's body is the raw slice):
``x-fedmq-transfer`` (transfer id), ``x-fedmq-chunk`` (index from 0), ``x-fedmq-chunks`` (count),
``x-fedmq-size`` (total bytes), ``x-fedmq-chunk-size`` (bytes per chunk but the last) and
``x-fedmq-sha256`` (hex digest of the whole body). Every chunk carries all of them, so chunks may
arrive in any order and any one of them can start a transfer.

A sender may split the digest in two instead: ``x-fedmq-head-size`` (H), ``x-fedmq-head-sha256``
(digest of the first H bytes) and ``x-fedmq-tail-sha256`` (digest of the rest), in place of
``x-fedmq-sha256``. Both are checked the same way; the receiver then also knows the verified digest
of the body's tail (:attr:`CompletedTransfer.tail_sha256`). fedmq's large bodies end in a weight
frame that the receiver needs the digest of anyway (a delta's blob, a release's signed manifest):
split where the frame starts, the body is hashed once instead of twice on each side.

:class:`Reassembler` writes each chunk at its offset in ``<dir>/<id>.part`` and records the indices
received in ``<id>.json`` (written after the data, fsynced, replaced atomically). Memory stays at one
chunk whatever the body size. A chunk is safe to ack once :meth:`Reassembler.add` returned, so a
process killed mid-transfer resumes from the same directory with the chunks RabbitMQ redelivers; a
transfer whose state cannot be read is discarded with a warning. A consumer that holds several
chunks at once stores them with ``add(..., sync=False)`` and makes them durable together with
:meth:`Reassembler.sync` before acking any: one fsync per file per batch instead of two per chunk
(4 MiB synchronous writes ran at ~370 MB/s here, one fsync after 400 MB at ~1.9 GB/s). Chunks
whose offsets and length allow it are written with ``O_DIRECT`` from one reused, page-aligned
buffer (the few bytes of an unaligned tail through the page cache) when the reassembler syncs
(``fsync=True``): such a body must reach the disk before its chunks are acked, and is written once,
to the disk, instead of into fresh page-cache pages the kernel then writes back (100 MB: 0.07 s
against 0.1-0.35 s of kernel time here; :mod:`common.durable`). A transfer written that way can
also be kept in memory while it arrives, within ``memory_budget`` bytes for all open transfers (0
by default: memory stays at one chunk), so its handler reads the body from memory instead of back
from the disk (100 MB: 0.09 s of the consumer's time here); a transfer over the budget, or resumed
after a restart, is read back from its file. A reassembler with a ``memory_budget`` writes with
``O_DIRECT`` even when it does not sync: its files are then read only after a restart (or linked
elsewhere, as a worker caches a release), and filling the page cache with them cost more kernel
time than the write to the disk (100 MB: ~0.3 s of system time with fresh pages, ~0.01 s direct).
Where the file system refuses ``O_DIRECT`` (tmpfs on older kernels, some FUSE mounts) the
reassembler writes through the page cache. When the
last chunk arrives the sha256 is checked (hashed as the chunks arrived when they came in order,
else read back) and a :class:`CompletedTransfer` returned; after the message is handled,
:meth:`Reassembler.finish` deletes the files and remembers the id so late duplicates are ignored.
A transfer that is discarded (bad sha256, damaged state, stale) is remembered too: its later chunks
raise :class:`TransferError`, so the consumer dead-letters them with the reason instead of dropping
them. Transfers that stop receiving chunks (a lost chunk) are dropped by :meth:`Reassembler.expire`.

All chunks of a transfer must reach the same reassembler: a queue that receives chunked bodies has
one consumer at a time (per-worker queues, single-active-consumer coordinator queues).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.durable import BLOCK, DirectWriter, aligned_buffer, close_fd, fsync_path, pwrite_all
from common.errors import TransferError

logger = logging.getLogger(__name__)

TRANSFER_HEADER = "x-fedmq-transfer"
INDEX_HEADER = "x-fedmq-chunk"
COUNT_HEADER = "x-fedmq-chunks"
SIZE_HEADER = "x-fedmq-size"
CHUNK_SIZE_HEADER = "x-fedmq-chunk-size"
SHA256_HEADER = "x-fedmq-sha256"
HEAD_SIZE_HEADER = "x-fedmq-head-size"
HEAD_SHA256_HEADER = "x-fedmq-head-sha256"
TAIL_SHA256_HEADER = "x-fedmq-tail-sha256"
_FRAMING = (TRANSFER_HEADER, INDEX_HEADER, COUNT_HEADER, SIZE_HEADER, CHUNK_SIZE_HEADER)
CHUNK_HEADERS = (*_FRAMING, SHA256_HEADER, HEAD_SIZE_HEADER, HEAD_SHA256_HEADER, TAIL_SHA256_HEADER)

_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class ChunkHeader:
    """The framing of one chunk; validated on construction.

    ``sha256`` is the digest of the body after its first ``head_size`` bytes, whose own digest is
    ``head_sha256``; with ``head_size`` 0 (no split) it is the whole body's.
    """

    transfer_id: str
    index: int
    count: int
    total_size: int
    chunk_size: int
    sha256: str
    head_size: int = 0
    head_sha256: str | None = None

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.transfer_id):
            raise TransferError("chunk transfer id must be 32 lowercase hex digits")
        if not _SHA_RE.fullmatch(self.sha256):
            raise TransferError("chunk sha256 must be 64 lowercase hex digits")
        if self.head_size == 0:
            if self.head_sha256 is not None:
                raise TransferError("chunk head sha256 without a head size")
        elif not 0 < self.head_size < self.total_size:
            raise TransferError(f"chunk head size {self.head_size} outside 1..{self.total_size - 1}")
        elif self.head_sha256 is None or not _SHA_RE.fullmatch(self.head_sha256):
            raise TransferError("chunk head sha256 must be 64 lowercase hex digits")
        if self.chunk_size <= 0 or self.total_size <= 0 or self.count <= 0:
            raise TransferError("chunk sizes and count must be positive")
        if self.count != -(-self.total_size // self.chunk_size):
            raise TransferError(
                f"chunk count {self.count} does not match size {self.total_size} / {self.chunk_size}"
            )
        if not 0 <= self.index < self.count:
            raise TransferError(f"chunk index {self.index} outside 0..{self.count - 1}")

    @property
    def offset(self) -> int:
        return self.index * self.chunk_size

    @property
    def expected_length(self) -> int:
        return min(self.chunk_size, self.total_size - self.offset)

    def same_transfer(self, other: ChunkHeader) -> bool:
        return replace(self, index=0) == replace(other, index=0)

    def to_headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            TRANSFER_HEADER: self.transfer_id,
            INDEX_HEADER: self.index,
            COUNT_HEADER: self.count,
            SIZE_HEADER: self.total_size,
            CHUNK_SIZE_HEADER: self.chunk_size,
        }
        if self.head_size:
            headers.update(
                {
                    HEAD_SIZE_HEADER: self.head_size,
                    HEAD_SHA256_HEADER: self.head_sha256,
                    TAIL_SHA256_HEADER: self.sha256,
                }
            )
        else:
            headers[SHA256_HEADER] = self.sha256
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> ChunkHeader | None:
        """The chunk framing in ``headers``; ``None`` for an ordinary message; TransferError if broken."""
        if not headers or TRANSFER_HEADER not in headers:
            return None
        split = HEAD_SIZE_HEADER in headers
        names = (
            (*_FRAMING, HEAD_SIZE_HEADER, HEAD_SHA256_HEADER, TAIL_SHA256_HEADER)
            if split
            else (*_FRAMING, SHA256_HEADER)
        )
        try:
            raw = {name: headers[name] for name in names}
            text = {k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}
            return cls(
                transfer_id=str(text[TRANSFER_HEADER]),
                index=int(text[INDEX_HEADER]),
                count=int(text[COUNT_HEADER]),
                total_size=int(text[SIZE_HEADER]),
                chunk_size=int(text[CHUNK_SIZE_HEADER]),
                sha256=str(text[TAIL_SHA256_HEADER if split else SHA256_HEADER]),
                head_size=int(text[HEAD_SIZE_HEADER]) if split else 0,
                head_sha256=str(text[HEAD_SHA256_HEADER]) if split else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError, UnicodeDecodeError) as exc:
            raise TransferError(f"malformed chunk headers: {exc!r}") from exc


def strip_chunk_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """``headers`` without the chunk framing (what the sender's own headers were)."""
    return {k: v for k, v in (headers or {}).items() if k not in CHUNK_HEADERS}


def split_body(
    body: bytes | bytearray, chunk_size: int, tail_offset: int = 0, tail_sha256: str | None = None
) -> Iterator[tuple[ChunkHeader, memoryview]]:
    """Cut ``body`` into chunks of ``chunk_size`` bytes (views, no copies) with their framing.

    With ``tail_offset`` the digest is split there (module docstring); ``tail_sha256`` is the
    digest of ``body[tail_offset:]`` when the caller knows it already (it is then not computed).
    """
    if not body:
        raise TransferError("an empty body is never chunked")
    if not 0 <= tail_offset < len(body):
        raise ValueError(f"tail offset {tail_offset} outside a body of {len(body)} bytes")
    view = memoryview(body).cast("B")
    head_sha256 = hashlib.sha256(view[:tail_offset]).hexdigest() if tail_offset else None
    digest = tail_sha256 if tail_sha256 is not None else hashlib.sha256(view[tail_offset:]).hexdigest()
    transfer_id = uuid.uuid4().hex
    count = -(-len(body) // chunk_size)
    for index in range(count):
        header = ChunkHeader(
            transfer_id, index, count, len(body), chunk_size, digest, tail_offset, head_sha256
        )
        yield header, view[header.offset : header.offset + header.expected_length]


@dataclass(frozen=True)
class CompletedTransfer:
    """A reassembled, sha256-verified body in a file (valid until :meth:`Reassembler.finish`);
    ``data`` holds the same bytes when the transfer was also kept in memory. ``tail_sha256`` is the
    verified digest of the body from ``tail_offset`` on (the whole body's when the sender did not
    split its digest)."""

    transfer_id: str
    path: Path
    size: int
    data: memoryview | None = None
    tail_offset: int = 0
    tail_sha256: str = ""


def _write_replace(path: Path, text: str, fsync: bool) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class _RunningHash:
    """sha256 of a transfer's chunks received in order so far (``next_index`` is the next one):
    of its head, then of its tail, when the sender split the digest (module docstring)."""

    next_index: int
    digest: Any
    head: Any = None
    head_size: int = 0

    def hash(self, offset: int, data: bytes | memoryview) -> None:
        """Hash ``data``, the body's bytes from ``offset`` on (the next ones in order)."""
        view = memoryview(data).cast("B")
        if self.head is not None and offset < self.head_size:
            cut = self.head_size - offset
            self.head.update(view[:cut])
            view = view[cut:]
        self.digest.update(view)


class _Background:
    """One thread that runs a reassembler's disk writes and hashing, in submission order.

    A durable reassembler's ``O_DIRECT`` writes wait for the disk, and hashing a chunk takes as
    long again; in this thread (both release the GIL) they overlap with the consumer receiving the
    next chunks and handling complete messages. :meth:`drain` waits for everything submitted and
    raises the first error any of it raised.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._done:
            self._pending += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:  # after an error nothing more is written until drained
                    job()
            except BaseException as exc:  # handed to the consumer's thread by drain()
                self._error = exc
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def drain(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
            error, self._error = self._error, None
        if error is not None:
            raise error


@dataclass
class _Open:
    """A transfer this reassembler is receiving: its framing, state and open data file.

    Kept in memory between chunks so that storing one is one ``pwrite`` (each file operation
    releases and re-takes the GIL, which the consumer's I/O thread holds while it parses frames).
    """

    header: ChunkHeader  # with index 0
    sender: str | None
    received: set[int]
    part: Path
    meta: Path
    fd: int
    running: _RunningHash | None  # None: chunks came before a restart, the body is read back
    direct_fd: int = -1  # the same file opened with O_DIRECT, or -1
    memory: memoryview | None = None  # the body as it arrives (within Reassembler.memory_budget)


def _new_head_hash(header: ChunkHeader) -> Any:
    return hashlib.sha256() if header.head_size else None


_MAX_OPEN = 64  # open transfers kept in memory; older ones are closed (their state kept on disk)


class Reassembler:
    """Reassembles chunked transfers in ``directory`` (created; reused across restarts).

    Not thread-safe: one consumer thread owns one reassembler. ``max_transfer_size`` bounds the disk
    one sender can make us use; ``stale_after_s`` is how long an incomplete transfer (or the memory of
    a finished one) is kept without news.
    """

    def __init__(
        self,
        directory: Path,
        max_transfer_size: int = 4096 * 1024 * 1024,
        stale_after_s: float = 3600.0,
        fsync: bool = True,
        direct: bool | None = None,
        memory_budget: int = 0,
    ) -> None:
        self.directory = directory
        self.max_transfer_size = max_transfer_size
        self.stale_after_s = stale_after_s
        self.fsync = fsync
        # O_DIRECT where chunks must reach the disk before they are acked anyway (``fsync``), or
        # where bodies are kept in memory and their files are not read back (module docstring); a
        # reassembler that does neither keeps the page cache, where a short-lived file may never be
        # written at all. Turned off for good once the file system refuses it.
        self._writer = DirectWriter((fsync or memory_budget > 0) if direct is None else direct)
        # A reassembler writing with O_DIRECT writes and hashes chunks in a thread of its own
        self._background: _Background | None = None
        self._background_name = f"fedmq-chunks-{directory.name}"
        self.memory_budget = memory_budget  # bytes of directly written transfers also kept in memory
        self._memory_used = 0
        self._unsynced: set[str] = set()
        self._open: dict[str, _Open] = {}  # transfers with chunks in this process, oldest first
        directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, transfer_id: str) -> tuple[Path, Path, Path]:
        base = self.directory / transfer_id
        return base.with_suffix(".part"), base.with_suffix(".json"), base.with_suffix(".done")

    def _discarded_marker(self, transfer_id: str) -> Path:
        return (self.directory / transfer_id).with_suffix(".discarded")

    def _load_state(self, header: ChunkHeader, sender: str | None) -> set[int] | None:
        part, meta, _ = self._paths(header.transfer_id)
        if not meta.exists():
            return None
        try:
            state = json.loads(meta.read_text())
            known = ChunkHeader(**{**state["header"], "index": 0})
            received = {int(i) for i in state["received"]}
            started_by = state.get("sender")
            if not part.exists() or part.stat().st_size != known.total_size:
                raise ValueError("data file missing or of the wrong size")
        except (OSError, ValueError, KeyError, TypeError, TransferError) as exc:
            logger.warning("discarding unreadable transfer %s: %s", header.transfer_id, exc)
            self.discard(header.transfer_id)
            return None
        if not known.same_transfer(header):
            raise TransferError(f"chunk of transfer {header.transfer_id} disagrees with earlier chunks")
        if started_by != sender:
            raise TransferError(
                f"chunk of transfer {header.transfer_id} sent by {sender!r}, not by {started_by!r} who started it"
            )
        return received

    def add(
        self, header: ChunkHeader, data: bytes | memoryview, sender: str | None = None, sync: bool = True
    ) -> CompletedTransfer | None:
        """Store one chunk; return the verified transfer once every chunk is in, else ``None``.

        With ``sync=False`` the chunk is written but not yet durable: call :meth:`sync` before
        acking it.

        ``sender`` is the broker-validated ``user_id`` of the chunk: every chunk of a transfer must
        come from the user who sent its first one. Duplicates are harmless (a duplicate of a finished
        transfer is ignored). Raises :class:`TransferError` for a chunk of the wrong length or from
        another sender, conflicting framing, a body over ``max_transfer_size``, or — on completion —
        a sha256 mismatch (the transfer is discarded).
        """
        entry = self._open.get(header.transfer_id)
        if entry is None:
            entry = self._start(header, data, sender)
            if entry is None:
                return None
        else:
            self._check_chunk(header, data)
            if not entry.header.same_transfer(header):
                raise TransferError(f"chunk of transfer {header.transfer_id} disagrees with earlier chunks")
            if entry.sender != sender:
                raise TransferError(
                    f"chunk of transfer {header.transfer_id} sent by {sender!r}, "
                    f"not by {entry.sender!r} who started it"
                )
        if header.index not in entry.received:
            if entry.memory is not None:
                entry.memory[header.offset : header.offset + len(data)] = data
            running = entry.running
            if running is not None and running.next_index == header.index:
                running.next_index += 1
            else:
                running = None
            self._submit(entry, header, data, running)
            entry.received.add(header.index)
            if sync:
                self._persist(entry)
            else:
                self._unsynced.add(header.transfer_id)
        if len(entry.received) < header.count:
            return None
        self._verify(entry)
        return CompletedTransfer(
            header.transfer_id, entry.part, header.total_size, entry.memory, header.head_size, header.sha256
        )

    @property
    def direct(self) -> bool:
        """Whether chunks are written with O_DIRECT (off once the file system refused it)."""
        return self._writer.enabled

    @property
    def direct_bytes(self) -> int:
        """Bytes written with O_DIRECT so far (the rest went through the page cache)."""
        return self._writer.direct_bytes

    def _submit(
        self, entry: _Open, header: ChunkHeader, data: bytes | memoryview, running: _RunningHash | None
    ) -> None:
        """Write one chunk (and hash it, when it is the next in order): here until a transfer is
        written with O_DIRECT, then every chunk in the background thread, in order (a running
        digest must see its chunks in turn). :meth:`_drain` waits for them."""

        if entry.memory is not None:  # block-aligned: written to the disk from there, uncopied
            data = entry.memory[header.offset : header.offset + len(data)]

        def store() -> None:
            self._write(entry, header, data)
            if running is not None:
                running.hash(header.offset, data)

        if self._background is None:
            if entry.direct_fd < 0:
                store()
                return
            self._background = _Background(self._background_name)
        self._background.submit(store)  # once started, every chunk goes there: hashed in order

    def _drain(self) -> None:
        """Wait for the background writes; if one failed, forget every open transfer (their state
        on disk is older than what was acked for none of them) and raise its error."""
        if self._background is None:
            return
        try:
            self._background.drain()
        except BaseException:
            for transfer_id in list(self._open):
                self._close(transfer_id, drained=True)
            self._unsynced.clear()
            raise

    def _write(self, entry: _Open, header: ChunkHeader, data: bytes | memoryview) -> None:
        """Write one chunk at its offset: whole blocks with O_DIRECT when open, the rest cached."""
        if entry.direct_fd < 0:
            pwrite_all(entry.fd, data, header.offset)
        elif not self._writer.pwrite(entry.direct_fd, entry.fd, data, header.offset):
            entry.direct_fd = close_fd(entry.direct_fd)

    def _open_direct(self, part: Path, header: ChunkHeader) -> int:
        """``part`` opened for O_DIRECT writes, or -1 (off, unaligned chunks, or refused)."""
        if header.chunk_size % BLOCK:
            return -1
        return self._writer.open(part)

    def _check_chunk(self, header: ChunkHeader, data: bytes | memoryview) -> None:
        if header.total_size > self.max_transfer_size:
            raise TransferError(f"transfer of {header.total_size} bytes exceeds {self.max_transfer_size}")
        if len(data) != header.expected_length:
            raise TransferError(
                f"chunk {header.index} has {len(data)} bytes, expected {header.expected_length}"
            )

    def _start(self, header: ChunkHeader, data: bytes | memoryview, sender: str | None) -> _Open | None:
        """The open transfer ``header`` belongs to, from disk or new; None if it finished already."""
        part, meta, done = self._paths(header.transfer_id)
        if done.exists():
            logger.debug("ignoring chunk %d of finished transfer %s", header.index, header.transfer_id)
            return None
        if self._discarded_marker(header.transfer_id).exists():
            raise TransferError(
                f"transfer {header.transfer_id} was discarded earlier; chunk {header.index} refused"
            )
        self._check_chunk(header, data)
        received = self._load_state(header, sender)
        if received is None and self._discarded_marker(header.transfer_id).exists():
            raise TransferError(
                f"transfer {header.transfer_id} was damaged and discarded; chunk {header.index} refused"
            )
        running: _RunningHash | None = None
        if received is None:
            received = set()
            running = _RunningHash(0, hashlib.sha256(), _new_head_hash(header), header.head_size)
            with open(part, "wb") as handle:
                handle.truncate(header.total_size)
        fd = os.open(part, os.O_WRONLY)
        entry = _Open(replace(header, index=0), sender, received, part, meta, fd, running)
        entry.direct_fd = self._open_direct(part, header)
        if (
            entry.direct_fd >= 0
            and running is not None  # a new transfer: one resumed after a restart is read back
            and self._memory_used + header.total_size <= self.memory_budget
        ):
            entry.memory = aligned_buffer(header.total_size)
            self._memory_used += header.total_size
        self._open[header.transfer_id] = entry
        while len(self._open) > _MAX_OPEN:  # many transfers at once: close the oldest, kept on disk
            oldest = next(iter(self._open))
            self._drain()
            self._write_state(self._open[oldest], fsync=False)
            self._close(oldest)
        return entry

    def _write_state(self, entry: _Open, fsync: bool) -> None:
        state = {
            "header": {k: v for k, v in vars(entry.header).items() if k != "index"},
            "received": sorted(entry.received),
            "sender": entry.sender,
        }
        _write_replace(entry.meta, json.dumps(state), fsync=fsync)

    def _persist(self, entry: _Open) -> None:
        """Record the chunks of ``entry`` on disk: the data first, then the state naming them."""
        self._drain()
        if self.fsync:
            os.fsync(entry.fd)
        self._write_state(entry, fsync=self.fsync)

    def sync(self) -> None:
        """Make every chunk stored with ``add(..., sync=False)`` durable (data, then state)."""
        self._drain()
        pending, self._unsynced = self._unsynced, set()
        for transfer_id in sorted(pending):
            entry = self._open.get(transfer_id)
            if entry is not None:
                self._persist(entry)
                continue
            if not self.fsync:
                continue
            part, meta, _ = self._paths(transfer_id)  # closed early; its state was written then
            try:
                fsync_path(part)
                fsync_path(meta)
            except FileNotFoundError:
                continue  # finished or discarded meanwhile: nothing left to keep

    def _close(self, transfer_id: str, drained: bool = False) -> None:
        if not drained:
            self._drain()
        entry = self._open.pop(transfer_id, None)
        if entry is not None:
            if entry.memory is not None:
                self._memory_used -= len(entry.memory)
                entry.memory = None
            entry.direct_fd = close_fd(entry.direct_fd)
            os.close(entry.fd)

    def _verify(self, entry: _Open) -> None:
        self._drain()
        header, running = entry.header, entry.running
        if running is None or running.next_index != header.count:
            # chunks came out of order, or some before a restart: read the body back
            running = _RunningHash(0, hashlib.sha256(), _new_head_hash(header), header.head_size)
            with open(entry.part, "rb") as handle:
                offset = 0
                while block := handle.read(_READ_BLOCK):
                    running.hash(offset, block)
                    offset += len(block)
        head_ok = running.head is None or running.head.hexdigest() == header.head_sha256
        if not head_ok or running.digest.hexdigest() != header.sha256:
            self.discard(header.transfer_id)
            raise TransferError(f"transfer {header.transfer_id}: sha256 of the reassembled body differs")

    def finish(self, transfer_id: str) -> None:
        """The transfer was handled: delete its data, remember it to ignore late duplicates."""
        part, meta, done = self._paths(transfer_id)
        done.touch()
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        self._forget(transfer_id)

    def _forget(self, transfer_id: str) -> None:
        self._unsynced.discard(transfer_id)
        self._close(transfer_id)

    def discard(self, transfer_id: str) -> None:
        """Drop an incomplete or rejected transfer: its later chunks raise :class:`TransferError`."""
        part, meta, _ = self._paths(transfer_id)
        self._discarded_marker(transfer_id).touch()
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        self._forget(transfer_id)

    def in_progress(self) -> list[str]:
        """Ids of transfers with chunks stored and not finished."""
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def expire(self, now: float | None = None) -> list[str]:
        """Drop incomplete transfers and finished-ids not touched for ``stale_after_s``; return them."""
        now = time.time() if now is None else now
        dropped: list[str] = []
        markers = [*self.directory.glob("*.done"), *self.directory.glob("*.discarded")]
        # data files whose state was never written (a crash before the first chunk was acked)
        markers += [p for p in self.directory.glob("*.part") if not p.with_suffix(".json").exists()]
        for path in list(self.directory.glob("*.json")) + markers:
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age <= self.stale_after_s:
                continue
            if path.suffix == ".json":
                logger.warning("transfer %s incomplete for %.0f s: discarding it", path.stem, age)
                self.discard(path.stem)
                dropped.append(path.stem)
            else:
                path.unlink(missing_ok=True)
        return sorted(dropped)

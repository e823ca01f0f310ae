"""Chunked transfers: framing and reassembly on disk, including the edge cases of a real network."""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.broker.chunks import ChunkHeader, Reassembler, split_body
from common.errors import TransferError

CHUNK = 1024


def _chunks(body: bytes, chunk_size: int = CHUNK) -> list[tuple[ChunkHeader, bytes]]:
    return [(header, bytes(data)) for header, data in split_body(body, chunk_size)]


def _feed(reassembler: Reassembler, chunks: list[tuple[ChunkHeader, bytes]]):
    results = [reassembler.add(header, data) for header, data in chunks]
    return [r for r in results if r is not None]


def test_split_frames_every_chunk_with_the_whole_transfer(tmp_path):
    body = os.urandom(3 * CHUNK + 10)

    chunks = _chunks(body)

    assert [h.index for h, _ in chunks] == [0, 1, 2, 3]
    assert {(h.transfer_id, h.count, h.total_size, h.sha256) for h, _ in chunks} == {
        (chunks[0][0].transfer_id, 4, len(body), hashlib.sha256(body).hexdigest())
    }
    assert b"".join(data for _, data in chunks) == body
    assert ChunkHeader.from_headers(chunks[2][0].to_headers()) == chunks[2][0]


def test_chunks_in_order_give_back_the_body(tmp_path):
    body = os.urandom(5 * CHUNK)
    reassembler = Reassembler(tmp_path)

    completed = _feed(reassembler, _chunks(body))

    assert len(completed) == 1
    assert completed[0].path.read_bytes() == body


def test_chunks_out_of_order_give_back_the_body(tmp_path):
    body = os.urandom(7 * CHUNK + 3)
    chunks = _chunks(body)
    random.Random(4).shuffle(chunks)

    completed = _feed(Reassembler(tmp_path), chunks)

    assert [c.path.read_bytes() for c in completed] == [body]


def test_a_duplicate_chunk_is_harmless_and_a_late_one_is_ignored(tmp_path):
    body = os.urandom(3 * CHUNK)
    chunks = _chunks(body)
    reassembler = Reassembler(tmp_path)

    completed = _feed(reassembler, [chunks[0], chunks[0], chunks[1], chunks[2]])
    assert [c.path.read_bytes() for c in completed] == [body]
    reassembler.finish(completed[0].transfer_id)

    assert reassembler.add(*chunks[1]) is None
    assert reassembler.in_progress() == []


def test_a_missing_chunk_never_completes_and_is_discarded_when_stale(tmp_path):
    chunks = _chunks(os.urandom(4 * CHUNK))
    reassembler = Reassembler(tmp_path, stale_after_s=60)

    completed = _feed(reassembler, chunks[:2] + chunks[3:])

    assert completed == []
    assert reassembler.in_progress() == [chunks[0][0].transfer_id]
    assert reassembler.expire() == []

    assert reassembler.expire(now=time.time() + 120) == [chunks[0][0].transfer_id]
    assert reassembler.in_progress() == []
    assert list(tmp_path.glob("*.part")) == []


def test_a_wrong_sha256_is_refused_and_the_transfer_dropped(tmp_path):
    body = os.urandom(3 * CHUNK)
    chunks = _chunks(body)
    header, data = chunks[1]
    chunks[1] = (header, bytes([data[0] ^ 0xFF]) + data[1:])
    reassembler = Reassembler(tmp_path)

    with pytest.raises(TransferError, match="sha256"):
        _feed(reassembler, chunks)

    assert reassembler.in_progress() == []
    assert list(tmp_path.glob("*.part")) == []


def test_a_chunk_of_the_wrong_length_is_refused(tmp_path):
    header, data = _chunks(os.urandom(3 * CHUNK))[0]

    with pytest.raises(TransferError, match="bytes"):
        Reassembler(tmp_path).add(header, data[:-1])


def test_chunks_that_disagree_about_the_transfer_are_refused(tmp_path):
    chunks = _chunks(os.urandom(3 * CHUNK))
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0])
    first = chunks[1][0]
    liar = ChunkHeader(first.transfer_id, 1, first.count, first.total_size, first.chunk_size, "0" * 64)

    with pytest.raises(TransferError, match="disagrees"):
        reassembler.add(liar, chunks[1][1])


def test_a_chunk_from_another_sender_cannot_join_a_transfer(tmp_path):
    chunks = _chunks(os.urandom(3 * CHUNK))
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0], sender="worker-1")

    with pytest.raises(TransferError, match="worker-2"):
        reassembler.add(*chunks[1], sender="worker-2")
    assert reassembler.add(*chunks[1], sender="worker-1") is None
    assert reassembler.add(*chunks[2], sender="worker-1") is not None


def test_a_body_over_the_limit_is_refused_before_anything_is_written(tmp_path):
    header, data = _chunks(os.urandom(3 * CHUNK))[0]

    with pytest.raises(TransferError, match="exceeds"):
        Reassembler(tmp_path, max_transfer_size=2 * CHUNK).add(header, data)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [
        {"x-fedmq-chunk": 9},
        {"x-fedmq-chunks": 2},
        {"x-fedmq-sha256": "not-hex"},
        {"x-fedmq-transfer": "../../etc/passwd"},
        {"x-fedmq-size": "many"},
    ],
)
def test_malformed_framing_is_refused(change):
    header, _ = _chunks(os.urandom(3 * CHUNK))[0]

    with pytest.raises(TransferError):
        ChunkHeader.from_headers({**header.to_headers(), **change})


def test_a_restart_mid_transfer_resumes_from_the_same_directory(tmp_path):
    body = os.urandom(6 * CHUNK)
    chunks = _chunks(body)
    _feed(Reassembler(tmp_path), chunks[:4])

    restarted = Reassembler(tmp_path)
    completed = _feed(restarted, chunks[3:])  # chunk 3 redelivered: its ack was lost in the crash

    assert [c.path.read_bytes() for c in completed] == [body]


def test_a_transfer_whose_state_was_damaged_in_a_crash_is_discarded_cleanly(tmp_path):
    chunks = _chunks(os.urandom(4 * CHUNK))
    _feed(Reassembler(tmp_path), chunks[:2])
    (tmp_path / f"{chunks[0][0].transfer_id}.json").write_text("{not json")

    restarted = Reassembler(tmp_path)

    with pytest.raises(TransferError, match="discarded"):
        restarted.add(*chunks[2])
    with pytest.raises(TransferError, match="discarded"):
        restarted.add(*chunks[3])
    assert restarted.in_progress() == []


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=5 * 64),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(min_value=0, max_value=100), max_size=5),
)
def test_any_order_with_duplicates_gives_back_the_body(tmp_path_factory, size, order, duplicates):
    body = os.urandom(size)
    chunks = _chunks(body, 64)
    sent = chunks + [chunks[i % len(chunks)] for i in duplicates]
    order.shuffle(sent)
    reassembler = Reassembler(tmp_path_factory.mktemp("r"), fsync=False)

    completed = _feed(reassembler, sent)

    assert completed and all(c.path.read_bytes() == body for c in completed)


def test_a_body_damaged_on_disk_before_a_restart_is_refused(tmp_path):
    """After a restart the digest cannot come from the chunks seen: the file is read back."""
    body = os.urandom(4 * CHUNK)
    chunks = _chunks(body)
    _feed(Reassembler(tmp_path), chunks[:2])
    part = tmp_path / f"{chunks[0][0].transfer_id}.part"
    damaged = bytearray(part.read_bytes())
    damaged[10] ^= 0xFF
    part.write_bytes(bytes(damaged))

    restarted = Reassembler(tmp_path)
    with pytest.raises(TransferError, match="sha256"):
        _feed(restarted, chunks[2:])
    assert list(tmp_path.glob("*.part")) == []


def _counting_fsync(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_chunks_stored_without_sync_become_durable_together_on_sync(tmp_path, monkeypatch):
    body = os.urandom(8 * CHUNK)
    chunks = _chunks(body)
    reassembler = Reassembler(tmp_path)
    fsyncs = _counting_fsync(monkeypatch)

    for header, data in chunks[:5]:
        assert reassembler.add(header, data, sync=False) is None
    assert fsyncs == []  # nothing durable yet: the caller must not ack these
    reassembler.sync()
    assert len(fsyncs) == 2  # the data file and the state file, once for five chunks

    restarted = Reassembler(tmp_path)  # what a crash after the acks would find
    assert [c.path.read_bytes() for c in _feed(restarted, chunks[5:])] == [body]


def test_every_chunk_is_durable_when_add_returns_by_default(tmp_path, monkeypatch):
    chunks = _chunks(os.urandom(3 * CHUNK))
    reassembler = Reassembler(tmp_path)
    fsyncs = _counting_fsync(monkeypatch)

    reassembler.add(*chunks[0])

    assert len(fsyncs) == 2  # data, then state
    reassembler.sync()
    assert len(fsyncs) == 2  # nothing was left pending


def test_more_transfers_at_once_than_kept_open_all_complete(tmp_path):
    bodies = [os.urandom(3 * CHUNK) for _ in range(80)]  # more than the reassembler keeps open
    transfers = [_chunks(body) for body in bodies]
    reassembler = Reassembler(tmp_path)

    completed = []
    for round_ in range(3):  # chunk 0 of every transfer, then chunk 1 of every one, ...
        completed += _feed(reassembler, [chunks[round_] for chunks in transfers])

    assert sorted(c.path.read_bytes() for c in completed) == sorted(bodies)


def test_a_data_file_left_without_state_by_a_crash_is_cleaned_up_when_stale(tmp_path):
    header, data = _chunks(os.urandom(3 * CHUNK))[0]
    reassembler = Reassembler(tmp_path, stale_after_s=60)
    reassembler.add(header, data, sync=False)  # killed before the batch was synced and acked

    restarted = Reassembler(tmp_path, stale_after_s=60)
    restarted.expire(now=time.time() + 61)

    assert list(tmp_path.glob("*.part")) == []


ALIGNED = 4 * 4096  # a chunk size O_DIRECT can write (offsets and lengths in whole blocks)


@pytest.mark.parametrize(
    "tail", [0, 1, 4095, 4097], ids=["no tail", "1 byte", "a block less 1", "a block and 1"]
)
def test_a_durable_reassembler_writes_whole_blocks_directly_and_gives_back_the_body(tmp_path, tail):
    body = os.urandom(3 * ALIGNED + tail)
    chunks = _chunks(body, ALIGNED)
    random.Random(tail).shuffle(chunks)
    reassembler = Reassembler(tmp_path)

    completed = _feed(reassembler, chunks[:1] + chunks)  # a duplicate too

    assert [c.path.read_bytes() for c in completed] == [body]
    assert reassembler.direct_bytes == 3 * ALIGNED + tail - tail % 4096


def test_a_direct_transfer_resumes_after_a_restart(tmp_path):
    body = os.urandom(5 * ALIGNED + 77)
    chunks = _chunks(body, ALIGNED)
    _feed(Reassembler(tmp_path), chunks[:3])

    completed = _feed(Reassembler(tmp_path), chunks[2:])

    assert [c.path.read_bytes() for c in completed] == [body]


def test_a_reassembler_that_need_not_sync_and_unaligned_chunks_use_the_page_cache(tmp_path):
    body = os.urandom(3 * ALIGNED)
    cached = Reassembler(tmp_path / "a", fsync=False)
    unaligned = Reassembler(tmp_path / "b")

    assert [c.path.read_bytes() for c in _feed(cached, _chunks(body, ALIGNED))] == [body]
    assert [c.path.read_bytes() for c in _feed(unaligned, _chunks(body, ALIGNED + 512))] == [body]
    assert cached.direct_bytes == 0 and unaligned.direct_bytes == 0


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_that_refuses_o_direct_gets_every_chunk_through_the_page_cache(
    tmp_path, monkeypatch, refused
):
    from tests.unit.test_durable_writes import refuse_o_direct

    refuse_o_direct(monkeypatch, refused)
    body = os.urandom(4 * ALIGNED + 5)
    reassembler = Reassembler(tmp_path)

    completed = _feed(reassembler, _chunks(body, ALIGNED))

    assert [c.path.read_bytes() for c in completed] == [body]
    assert reassembler.direct_bytes == 0 and not reassembler.direct


def test_a_directly_written_transfer_is_also_kept_in_memory_within_the_budget(tmp_path):
    bodies = [os.urandom(3 * ALIGNED + 9) for _ in range(3)]
    streams = [_chunks(body, ALIGNED) for body in bodies]
    reassembler = Reassembler(tmp_path, memory_budget=2 * len(bodies[0]))

    interleaved = [chunk for group in zip(*streams, strict=True) for chunk in group]
    completed = {c.transfer_id: c for c in _feed(reassembler, interleaved)}

    kept = [completed[s[0][0].transfer_id] for s in streams]
    assert [c.path.read_bytes() for c in kept] == bodies  # every file is whole
    assert [c.data for c in kept] == [bodies[0], bodies[1], None]  # the third was over the budget
    for c in kept:
        reassembler.finish(c.transfer_id)
    (again,) = _feed(reassembler, _chunks(bodies[2], ALIGNED))
    assert again.data == bodies[2]  # finished transfers gave their memory back


def test_a_reassembler_that_need_not_sync_but_keeps_bodies_in_memory_writes_past_the_page_cache(
    tmp_path, monkeypatch
):
    # a worker's releases: no fsync, the body decoded from memory, the file linked into a cache
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    body = os.urandom(3 * ALIGNED + 100)
    reassembler = Reassembler(tmp_path, fsync=False, memory_budget=1 << 30)

    (completed,) = _feed(reassembler, _chunks(body, ALIGNED))

    assert completed.data == body and completed.path.read_bytes() == body
    assert reassembler.direct and reassembler.direct_bytes == 3 * ALIGNED
    assert synced == []


def test_a_transfer_resumed_after_a_restart_is_read_back_from_its_file(tmp_path):
    body = os.urandom(4 * ALIGNED)
    chunks = _chunks(body, ALIGNED)
    _feed(Reassembler(tmp_path, memory_budget=1 << 30), chunks[:2])

    (completed,) = _feed(Reassembler(tmp_path, memory_budget=1 << 30), chunks[2:])

    assert completed.data is None and completed.path.read_bytes() == body


def test_without_a_memory_budget_a_transfer_is_only_in_its_file(tmp_path):
    body = os.urandom(2 * ALIGNED)

    (completed,) = _feed(Reassembler(tmp_path), _chunks(body, ALIGNED))

    assert completed.data is None and completed.path.read_bytes() == body


# --------------------------------------------------------------------------- split digests


def _split_chunks(
    body: bytes, head: int, chunk_size: int = CHUNK, tail_sha256: str | None = None
) -> list[tuple[ChunkHeader, bytes]]:
    return [(h, bytes(d)) for h, d in split_body(body, chunk_size, head, tail_sha256)]


@pytest.mark.parametrize("head", [1, 100, CHUNK, CHUNK + 1, 3 * CHUNK - 1])
def test_a_split_digest_gives_back_the_body_and_the_verified_digest_of_its_tail(tmp_path, head):
    body = os.urandom(3 * CHUNK + 10)
    chunks = _split_chunks(body, head)

    (completed,) = _feed(Reassembler(tmp_path), chunks)

    assert completed.path.read_bytes() == body
    assert (completed.tail_offset, completed.tail_sha256) == (head, hashlib.sha256(body[head:]).hexdigest())
    headers = chunks[0][0].to_headers()
    assert "x-fedmq-sha256" not in headers  # a receiver that knows only whole digests refuses it
    assert headers["x-fedmq-head-sha256"] == hashlib.sha256(body[:head]).hexdigest()
    assert ChunkHeader.from_headers(headers) == chunks[0][0]


def test_a_whole_digest_names_the_whole_body_as_its_tail(tmp_path):
    body = os.urandom(2 * CHUNK + 1)

    (completed,) = _feed(Reassembler(tmp_path), _chunks(body))

    assert (completed.tail_offset, completed.tail_sha256) == (0, hashlib.sha256(body).hexdigest())


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(min_value=2, max_value=5 * 64),
    cut=st.floats(min_value=0.0, max_value=1.0),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(min_value=0, max_value=100), max_size=4),
)
def test_a_split_digest_survives_any_order_with_duplicates(tmp_path_factory, size, cut, order, duplicates):
    body = os.urandom(size)
    head = min(size - 1, max(1, int(cut * size)))
    chunks = _split_chunks(body, head, 64)
    sent = chunks + [chunks[i % len(chunks)] for i in duplicates]
    order.shuffle(sent)

    completed = _feed(Reassembler(tmp_path_factory.mktemp("r"), fsync=False), sent)

    assert completed and all(c.path.read_bytes() == body for c in completed)
    assert {c.tail_sha256 for c in completed} == {hashlib.sha256(body[head:]).hexdigest()}


@pytest.mark.parametrize("where", ["head", "tail"])
def test_a_split_transfer_damaged_in_its_head_or_its_tail_is_refused(tmp_path, where):
    body = os.urandom(4 * CHUNK)
    head = CHUNK + 7
    chunks = _split_chunks(body, head)
    position = 3 if where == "head" else CHUNK + 100
    index, offset = divmod(position, CHUNK)
    damaged = bytearray(chunks[index][1])
    damaged[offset] ^= 0x01
    chunks[index] = (chunks[index][0], bytes(damaged))

    with pytest.raises(TransferError, match="sha256"):
        _feed(Reassembler(tmp_path), chunks)
    assert list(tmp_path.glob("*.part")) == []


def test_a_tail_digest_the_sender_supplied_is_the_one_checked(tmp_path):
    """The sender passes a digest it knows instead of hashing the tail: a wrong one fails the transfer."""
    body = os.urandom(3 * CHUNK)
    good = _split_chunks(body, 50, tail_sha256=hashlib.sha256(body[50:]).hexdigest())
    wrong = _split_chunks(body, 50, tail_sha256=hashlib.sha256(b"other").hexdigest())

    assert len(_feed(Reassembler(tmp_path / "good"), good)) == 1
    with pytest.raises(TransferError, match="sha256"):
        _feed(Reassembler(tmp_path / "wrong"), wrong)


def test_a_split_transfer_resumes_after_a_restart_and_is_read_back(tmp_path):
    body = os.urandom(6 * CHUNK)
    chunks = _split_chunks(body, 2 * CHUNK + 5)
    _feed(Reassembler(tmp_path), chunks[:4])

    (completed,) = _feed(Reassembler(tmp_path), chunks[3:])

    assert completed.path.read_bytes() == body
    assert completed.tail_sha256 == hashlib.sha256(body[2 * CHUNK + 5 :]).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        {"x-fedmq-head-size": 0},
        {"x-fedmq-head-size": 3 * CHUNK},  # no tail left
        {"x-fedmq-head-sha256": "not-hex"},
        {"x-fedmq-tail-sha256": None},
    ],
)
def test_malformed_split_framing_is_refused(change):
    header, _ = _split_chunks(os.urandom(3 * CHUNK), 10)[0]

    with pytest.raises(TransferError):
        ChunkHeader.from_headers({**header.to_headers(), **change})


def test_a_chunk_whose_digest_is_split_elsewhere_does_not_join_the_transfer(tmp_path):
    body = os.urandom(3 * CHUNK)
    chunks = _split_chunks(body, 10)
    other = replace(chunks[1][0], head_size=11, head_sha256=hashlib.sha256(body[:11]).hexdigest())
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0])

    with pytest.raises(TransferError, match="disagrees"):
        reassembler.add(other, chunks[1][1])


# --------------------------------------------------------------------------- background writes


def test_a_durable_reassembler_writes_and_hashes_off_the_callers_thread(tmp_path, monkeypatch):
    import threading

    from common.durable import DirectWriter

    threads: set[str] = set()
    real = DirectWriter.pwrite

    def pwrite(self, *args):
        threads.add(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(DirectWriter, "pwrite", pwrite)
    body = os.urandom(8 * 4096 * 4)
    reassembler = Reassembler(tmp_path, fsync=True)

    (completed,) = _feed(reassembler, _chunks(body, 4 * 4096))

    assert completed.path.read_bytes() == body
    assert reassembler.direct and threads and threading.current_thread().name not in threads


def test_a_write_that_fails_in_the_background_fails_the_batch_and_the_redelivery_completes(
    tmp_path, monkeypatch
):
    """The error reaches the consumer before any chunk of the batch is acked; RabbitMQ gives the
    batch back, and the transfer completes from the state last made durable."""
    from common.durable import DirectWriter

    real = DirectWriter.pwrite
    failures = [2]  # the third write fails once, as on a full disk

    def pwrite(self, direct_fd, fd, data, offset):
        if failures and offset == failures[0] * 4 * 4096:
            failures.pop()
            raise OSError(28, "No space left on device")
        return real(self, direct_fd, fd, data, offset)

    monkeypatch.setattr(DirectWriter, "pwrite", pwrite)
    body = os.urandom(6 * 4 * 4096)
    chunks = _chunks(body, 4 * 4096)
    reassembler = Reassembler(tmp_path, fsync=True)
    for header, data in chunks[:2]:
        reassembler.add(header, data, sync=False)
    reassembler.sync()  # chunks 0 and 1 are durable (acked)
    assert reassembler.direct  # as the tests above: the test's directory takes O_DIRECT

    with pytest.raises(OSError, match="No space"):
        for header, data in chunks[2:4]:
            reassembler.add(header, data, sync=False)
        reassembler.sync()

    results = [reassembler.add(header, data, sync=False) for header, data in chunks[2:]]  # redelivered
    reassembler.sync()
    (completed,) = [r for r in results if r is not None]
    assert completed.path.read_bytes() == body

"""Writes that bypass the page cache (common/durable.py): the bytes on disk are exactly the parts."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import durable
from common.durable import BLOCK, DirectWriter


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 70_001]), max_size=6))
def test_a_file_written_from_parts_holds_exactly_their_concatenation(tmp_path_factory, sizes):
    parts = [os.urandom(size) for size in sizes]
    path = tmp_path_factory.mktemp("w") / "blob"
    writer = DirectWriter()

    writer.write_file(path, [memoryview(p) for p in parts])

    body = b"".join(parts)
    assert path.read_bytes() == body
    assert writer.direct_bytes == len(body) - len(body) % BLOCK  # every whole block went direct


def test_a_large_file_is_written_through_the_reused_buffer_in_pieces(tmp_path):
    body = os.urandom(9 * 1024 * 1024 + 5)  # more than the 4 MiB buffer
    writer = DirectWriter()

    writer.write_file(tmp_path / "blob", [body[:3], body[3:]])  # an unaligned first part

    assert (tmp_path / "blob").read_bytes() == body and writer.direct_bytes == len(body) - 5


@pytest.mark.parametrize("start", [0, 1], ids=["block-aligned", "one byte off"])
def test_memory_that_starts_on_a_block_is_written_from_where_it_is(tmp_path, monkeypatch, start):
    memory = durable.aligned_buffer(9 * 1024 * 1024 + 5 + start)
    memory[:] = os.urandom(len(memory))
    view = memory[start:]
    written_from: list[int] = []
    real = os.pwritev

    def spy(fd, buffers, offset):
        written_from.extend(durable.is_block_aligned(memoryview(b)) for b in buffers)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", spy)
    writer = DirectWriter()
    path = tmp_path / "blob"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    direct_fd = writer.open(path)

    assert writer.pwrite(direct_fd, fd, view, 0)

    os.close(direct_fd)
    os.close(fd)
    assert path.read_bytes() == bytes(view)
    assert writer.direct_bytes == len(view) - len(view) % BLOCK
    # aligned memory goes to the disk uncopied; other memory through the writer's own buffer
    assert (writer._buffer is None) == (start == 0)
    assert written_from and all(written_from)


def test_an_existing_file_is_never_overwritten(tmp_path):
    (tmp_path / "blob").write_bytes(b"kept")

    with pytest.raises(FileExistsError):
        DirectWriter().write_file(tmp_path / "blob", [b"new"])
    assert (tmp_path / "blob").read_bytes() == b"kept"


def refuse_o_direct(monkeypatch: pytest.MonkeyPatch, refused: str) -> None:
    """Make this process's file system refuse O_DIRECT as tmpfs does: at ``open`` or at ``write``."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    if refused == "open":
        real_open = os.open
        monkeypatch.setattr(
            os,
            "open",
            lambda path, flags, *a: refuse() if flags & durable.O_DIRECT else real_open(path, flags, *a),
        )
    else:
        monkeypatch.setattr(os, "pwritev", refuse)


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_that_refuses_o_direct_gets_the_bytes_through_the_page_cache(
    tmp_path, monkeypatch, refused
):
    refuse_o_direct(monkeypatch, refused)
    body = os.urandom(5 * BLOCK + 3)
    writer = DirectWriter()

    writer.write_file(tmp_path / "blob", [body[: 2 * BLOCK], body[2 * BLOCK :]])

    assert (tmp_path / "blob").read_bytes() == body
    assert writer.direct_bytes == 0 and not writer.enabled


def test_a_short_write_is_completed():
    import tempfile

    with tempfile.TemporaryFile() as handle:
        real = os.pwrite
        calls: list[int] = []

        def short(fd, data, offset):
            calls.append(len(data))
            return real(fd, bytes(data)[:3], offset)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "pwrite", short)
            durable.pwrite_all(handle.fileno(), b"0123456789", 0)
        handle.seek(0)
        assert handle.read() == b"0123456789" and calls == [10, 7, 4, 1]

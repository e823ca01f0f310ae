"""The worker's model store: a newly announced version is awaited from the broadcast, not fetched."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from common.errors import FedmqError
from tests.unit.test_worker_refuses_envelopes import MODEL, make_release
from worker.models import ModelStore


def answering(store: ModelStore, release, fetched: list[int]):
    """A fetcher whose request the coordinator answers with ``release``; records each request."""

    def fetch(model: str, version: int) -> None:
        fetched.append(version)
        store.add(release.encode())

    return fetch


def test_a_task_for_the_next_version_waits_for_its_broadcast_instead_of_fetching(store, key):
    store.add(make_release(key, version=1).encode())
    v2 = make_release(key, version=2)
    fetched: list[int] = []
    broadcast = threading.Timer(0.3, lambda: store.add(v2.encode()))

    broadcast.start()
    found = store.get(MODEL, 2, v2.weights_sha256, lambda m, v: fetched.append(v), 5, broadcast_wait_s=10)

    assert found.version == 2 and fetched == []


def test_a_broadcast_that_does_not_come_is_fetched_after_the_wait(store, key):
    store.add(make_release(key, version=1).encode())
    v2 = make_release(key, version=2)
    fetched: list[int] = []
    fetch = answering(store, v2, fetched)

    found = store.get(MODEL, 2, v2.weights_sha256, fetch, 5, broadcast_wait_s=0.2)

    assert found.version == 2 and fetched == [2]


@pytest.mark.parametrize("held", [None, 3], ids=["model never held", "older version"])
def test_an_unknown_model_or_an_older_version_is_fetched_at_once(store, key, held):
    if held is not None:
        store.add(make_release(key, version=held).encode())
    v2 = make_release(key, version=2)
    fetched: list[int] = []
    fetch = answering(store, v2, fetched)

    # A wait longer than the test's timeout would be noticed: the fetch must come first.
    found = store.get(MODEL, 2, v2.weights_sha256, fetch, 5, broadcast_wait_s=600)

    assert found.version == 2 and fetched == [2]


def test_a_release_that_never_arrives_is_an_error(store, key):
    store.add(make_release(key, version=1).encode())

    with pytest.raises(FedmqError, match="did not arrive"):
        store.get(MODEL, 2, "0" * 64, lambda m, v: None, 0.2, broadcast_wait_s=0.2)


def test_a_model_is_built_once_per_code_and_each_load_sets_all_of_the_versions_weights(
    store, key, monkeypatch
):
    from common.model import DynamicDLModel

    inits: list[int] = []
    original = DynamicDLModel.init_model
    monkeypatch.setattr(DynamicDLModel, "init_model", lambda self: (inits.append(1), original(self))[1])
    v1 = store.add(make_release(key, version=1).encode())
    v2 = store.add(make_release(key, version=2).encode())
    inits.clear()  # making the releases built models

    first = store.load(v1)
    first.set_weights([w * 0 + 99 for w in first.get_weights()])  # what training leaves behind
    second = store.load(v2)

    assert len(inits) == 1 and second is first
    for got, want in zip(second.get_weights(), v2.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(inits) == 1


def test_a_new_code_for_the_same_model_builds_a_new_model(store, key):
    v1 = store.add(make_release(key, version=1).encode())
    v2 = store.add(make_release(key, version=2, learning_rate=0.5).encode())  # other metadata: other code

    first, second = store.load(v1), store.load(v2)

    assert v1.code_sha256 != v2.code_sha256 and second is not first
    assert second.metadata["learning_rate"] == 0.5


def test_a_reassembled_release_file_is_linked_into_the_cache_not_written_again(store, key, tmp_path):
    body = make_release(key, version=1).encode()
    transfer = tmp_path / "transfer.part"
    transfer.write_bytes(body)

    store.add(body, source=transfer)

    (cached,) = store.cache_dir.rglob("*.release")
    assert cached.read_bytes() == body and cached.stat().st_ino == transfer.stat().st_ino
    transfer.unlink()  # the reassembler deletes its file once the release is handled
    assert cached.read_bytes() == body


def test_a_restarted_worker_still_refuses_a_replayed_release_and_awaits_the_next_broadcast(store, key):
    from common.errors import StaleVersionError

    store.add(make_release(key, version=3).encode())
    restarted = ModelStore(store.cache_dir, key.public_key())  # a new process, the same cache
    v4 = make_release(key, version=4)
    fetched: list[int] = []
    broadcast = threading.Timer(0.3, lambda: restarted.add(v4.encode()))

    with pytest.raises(StaleVersionError):
        restarted.add(make_release(key, version=2).encode())
    broadcast.start()
    found = restarted.get(
        MODEL, 4, v4.weights_sha256, answering(restarted, v4, fetched), 5, broadcast_wait_s=10
    )

    assert restarted.latest(MODEL) == 4 and found.version == 4 and fetched == []


def cached_versions(store: ModelStore) -> list[int]:
    return sorted(int(p.stem[1:]) for p in store.cache_dir.rglob("v*.release"))


def test_the_cache_keeps_the_newest_versions_of_a_model_and_removes_older_ones(store, key):
    for version in range(1, 7):
        store.add(make_release(key, version=version).encode())

    assert store.keep_versions == 3 and cached_versions(store) == [4, 5, 6]


def test_an_older_version_a_task_asked_for_stays_cached_beside_the_newest(tmp_path, key):
    store = ModelStore(tmp_path / "cache", key.public_key(), keep_versions=2)
    for version in (5, 6, 7):
        store.add(make_release(key, version=version).encode())
    v2 = make_release(key, version=2)

    found = store.get(MODEL, 2, v2.weights_sha256, answering(store, v2, []), 5)

    assert found.version == 2 and cached_versions(store) == [2, 6, 7]
    store.add(make_release(key, version=8).encode())
    assert cached_versions(store) == [7, 8]


def test_a_version_removed_from_the_cache_is_fetched_again_when_a_task_names_it(tmp_path, key):
    store = ModelStore(tmp_path / "cache", key.public_key(), keep_versions=1)
    v1 = make_release(key, version=1)
    store.add(v1.encode())
    store.add(make_release(key, version=2).encode())
    store.add(make_release(key, version=3).encode())  # v1 leaves memory (newest two) and disk
    fetched: list[int] = []

    found = store.get(MODEL, 1, v1.weights_sha256, answering(store, v1, fetched), 5)

    assert found.version == 1 and fetched == [1]


def test_a_cache_that_keeps_no_version_is_refused(tmp_path, key):
    with pytest.raises(ValueError, match="keep_versions"):
        ModelStore(tmp_path / "cache", key.public_key(), keep_versions=0)


def _hashed_sizes(monkeypatch) -> list[int]:
    """Sizes of what common.release hashes from now on."""
    import hashlib
    import types

    import common.release

    sizes: list[int] = []

    def sha256(data=b""):
        sizes.append(len(memoryview(data).cast("B")))
        return hashlib.sha256(data)

    monkeypatch.setattr(common.release, "hashlib", types.SimpleNamespace(sha256=sha256))
    return sizes


def test_a_frame_digest_the_transfer_verified_is_not_computed_again(store, key, monkeypatch):
    import hashlib

    from common.errors import SignatureError
    from common.release import release_frame_size

    release = make_release(key, version=1)
    body = release.encode()
    frame_offset = len(body) - release_frame_size(release)
    frame_sha256 = hashlib.sha256(body[frame_offset:]).hexdigest()
    sizes = _hashed_sizes(monkeypatch)

    store.add(body, verified_tail=(frame_offset, frame_sha256))
    assert len(body) - frame_offset not in sizes  # the code was hashed, the weights were not

    sizes.clear()
    store.add(make_release(key, version=2).encode(), verified_tail=(0, hashlib.sha256(b"x").hexdigest()))
    assert len(body) - frame_offset in sizes  # a digest of another part of the body: hashed here

    v3 = make_release(key, version=3)
    v3_offset = len(v3.encode()) - release_frame_size(v3)
    with pytest.raises(SignatureError, match="signed manifest"):
        store.add(v3.encode(), verified_tail=(v3_offset, hashlib.sha256(b"other weights").hexdigest()))

"""A worker refuses every model envelope it must not trust, before it unpickles or compiles anything.

The worker's model store (:class:`worker.models.ModelStore`) and :func:`common.signing.load_signed_model`
get tampered, unsigned, foreign-key, replayed-old-version and expired releases. Spies on
``pickle.loads``, ``dill.loads`` and ``compile_function`` record every call (and pass it through):
a refused release leaves them untouched, and the positive controls prove the spies see the calls a
trusted release does make.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable
from typing import Any

import dill
import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import codec, keyfiles, signing
from common.errors import (
    BadSignatureError,
    ExpiredEnvelopeError,
    FedmqError,
    MissingSignatureError,
    PayloadMismatchError,
    SignatureError,
    StaleVersionError,
    UnknownKeyError,
)
from common.messages import ModelRelease
from common.model import DynamicDLModel
from common.model import blob as model_blob
from common.model import dynamic as model_dynamic
from common.model import source as model_source
from common.model.bundle import split_model
from common.model.numpy_model import make_linear_model
from common.release import CODE_ENVELOPE_VERSION, KIND_MODEL_WEIGHTS, build_release, version_manifest
from worker.models import ModelStore

MODEL = "digits"


# --------------------------------------------------------------------------------------- spies


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every unpickling or compiling call made during the test, in order (calls pass through)."""
    made: list[str] = []

    def spy(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            made.append(name)
            return original(*args, **kwargs)

        return wrapper

    for owner, attr, name in (
        (pickle, "loads", "pickle.loads"),
        (pickle, "load", "pickle.load"),
        (dill, "loads", "dill.loads"),
        (dill, "load", "dill.load"),
        (model_source, "compile_function", "compile_function"),
        (model_dynamic, "compile_function", "compile_function"),
        (model_blob, "compile_function", "compile_function"),
    ):
        monkeypatch.setattr(owner, attr, spy(name, getattr(owner, attr)))
    return made


# --------------------------------------------------------------------------- building releases


def seal_at(
    when: float, payload: bytes, *, key: Ed25519PrivateKey, expires_in: float | None = None, **kw: Any
) -> bytes:
    """``signing.seal`` as if run at unix time ``when`` (to make envelopes that have expired)."""
    real = time.time
    try:
        time.time = lambda: when
        return signing.seal(payload, key=key, expires_in=expires_in, **kw)
    finally:
        time.time = real


def make_release(
    key: Ed25519PrivateKey,
    version: int = 2,
    *,
    code_key: Ed25519PrivateKey | None = None,
    sealed_at: float | None = None,
    expires_in: float | None = None,
    learning_rate: float = 0.1,
) -> ModelRelease:
    """A release built the way the coordinator's registry builds one (see tests/unit/test_release.py)."""
    model = make_linear_model(4, 3, model_id=MODEL, learning_rate=learning_rate)
    code, weights = split_model(model)
    weights = [w + version for w in weights]  # each version its own weights
    code_bytes, frame = code.to_bytes(), codec.encode_weights(weights)
    when = time.time() if sealed_at is None else sealed_at
    code_env = seal_at(
        when,
        code_bytes,
        key=code_key or key,
        expires_in=expires_in,
        kind=signing.KIND_MODEL_CODE,
        model_id=MODEL,
        version=CODE_ENVELOPE_VERSION,
    )
    manifest = version_manifest(
        MODEL,
        version,
        version - 1,
        hashlib.sha256(frame).hexdigest(),
        len(frame),
        hashlib.sha256(code_bytes).hexdigest(),
    )
    manifest_env = seal_at(
        when,
        manifest,
        key=key,
        expires_in=expires_in,
        kind=KIND_MODEL_WEIGHTS,
        model_id=MODEL,
        version=version,
    )
    return build_release(
        MODEL,
        version,
        code_env,
        manifest_env,
        frame,
        hashlib.sha256(code_bytes).hexdigest(),
        hashlib.sha256(frame).hexdigest(),
    )


def with_payload(release: ModelRelease, payload: bytes, **changes: Any) -> ModelRelease:
    return ModelRelease(**{**release.__dict__, "payload": payload, **changes})


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _meta(envelope: bytes) -> tuple[dict[str, Any], bytes]:
    meta_size = int.from_bytes(envelope[4:8], "little")
    return msgpack.unpackb(envelope[8 : 8 + meta_size], raw=False), envelope[8 + meta_size :]


def _repack(meta: dict[str, Any], payload: bytes) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    return b"FMQE" + len(packed).to_bytes(4, "little") + packed + payload


def unsigned(envelope: bytes) -> bytes:
    """The same envelope with its signature removed."""
    meta, payload = _meta(envelope)
    del meta["sig"]
    return _repack(meta, payload)


def with_signature(envelope: bytes, sig: bytes) -> bytes:
    """The same envelope carrying signature ``sig`` instead of its own."""
    meta, payload = _meta(envelope)
    return _repack({**meta, "sig": sig}, payload)


def flipped_signature(envelope: bytes) -> bytes:
    meta, _ = _meta(envelope)
    return with_signature(envelope, flip(meta["sig"], 0))


def parts(release: ModelRelease) -> tuple[bytes, bytes, bytes]:
    payload = bytes(release.payload)
    code_end = release.code_size
    manifest_end = code_end + release.manifest_size
    return payload[:code_end], payload[code_end:manifest_end], payload[manifest_end:]


def rebuilt(release: ModelRelease, code_env: bytes, manifest_env: bytes, frame: bytes) -> ModelRelease:
    return with_payload(
        release, code_env + manifest_env + frame, code_size=len(code_env), manifest_size=len(manifest_env)
    )


# ------------------------------------------------------------------------------------ the cases


def hostile_releases(key: Ed25519PrivateKey) -> dict[str, tuple[ModelRelease, type[FedmqError]]]:
    good = make_release(key)
    code_env, manifest_env, frame = parts(good)
    foreign = keyfiles.generate_key()
    return {
        "tampered weights": (
            rebuilt(good, code_env, manifest_env, flip(frame, len(frame) - 1)),
            PayloadMismatchError,
        ),
        "tampered code": (
            rebuilt(good, flip(code_env, len(code_env) - 3), manifest_env, frame),
            PayloadMismatchError,
        ),
        "tampered signed header": (rebuilt(good, code_env, flip(manifest_env, 40), frame), SignatureError),
        "tampered signature": (
            rebuilt(good, code_env, flipped_signature(manifest_env), frame),
            BadSignatureError,
        ),
        "unsigned code": (rebuilt(good, unsigned(code_env), manifest_env, frame), MissingSignatureError),
        "unsigned manifest": (rebuilt(good, code_env, unsigned(manifest_env), frame), MissingSignatureError),
        "re-signed with another key": (make_release(foreign), UnknownKeyError),
        "code re-signed with another key": (make_release(key, code_key=foreign), UnknownKeyError),
        "expired": (make_release(key, sealed_at=time.time() - 7200, expires_in=3600), ExpiredEnvelopeError),
        "relabelled as another version": (with_payload(good, bytes(good.payload), version=3), SignatureError),
        "another model's code": (
            rebuilt(good, parts(make_release(key, learning_rate=0.5))[0], manifest_env, frame),
            PayloadMismatchError,
        ),
    }


CASES = sorted(hostile_releases(keyfiles.generate_key()))


def no_fetch(model: str, version: int) -> None:
    raise AssertionError(f"unexpected fetch of {model} v{version}")


@pytest.mark.parametrize("case", CASES)
def test_the_store_refuses_a_hostile_release_before_unpickling_or_compiling(
    case: str, store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    release, error = hostile_releases(key)[case]
    calls.clear()  # building the releases compiled the test model's code

    with pytest.raises(error):
        store.add(release.encode())

    assert calls == []
    assert store.latest(MODEL) is None
    assert not list(store.cache_dir.rglob("*.release"))  # nothing of it was cached


@pytest.mark.parametrize("case", CASES)
def test_a_task_naming_a_hostile_release_gets_an_error_not_a_model(
    case: str, store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    release, _ = hostile_releases(key)[case]
    delivered: list[str] = []
    calls.clear()

    def fetch(model: str, version: int) -> None:  # the reply arrives; the consumer dead-letters it
        try:
            store.add(release.encode())
        except SignatureError as exc:
            delivered.append(type(exc).__name__)

    with pytest.raises(FedmqError):
        store.get(MODEL, release.version, release.weights_sha256, fetch, timeout_s=0.2)

    assert delivered and calls == []


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_cached_release_is_refused_deleted_and_fetched_again(
    case: str, store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    release, _ = hostile_releases(key)[case]
    good = make_release(key, version=release.version)
    cached = store.cache_dir / MODEL / f"v{release.version}.release"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(release.encode())
    fetched: list[int] = []
    calls.clear()

    def fetch(model: str, version: int) -> None:
        fetched.append(version)
        store.add(good.encode())

    found = store.get(MODEL, release.version, good.weights_sha256, fetch, timeout_s=5)

    assert fetched == [release.version] and found.weights_sha256 == good.weights_sha256
    assert calls == []  # nothing compiled until the caller loads the verified release
    store.load(found)
    assert "compile_function" in calls  # the spies see what a trusted release does


def test_a_trusted_release_loads_and_the_spies_see_it_compile(
    store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    release = make_release(key)
    calls.clear()

    verified = store.add(release.encode())
    assert calls == []
    model = store.load(verified)

    assert model(np.ones((2, 4), dtype=np.float32)).shape == (2, 3)
    assert "compile_function" in calls and "dill.loads" not in calls


def test_a_task_naming_other_weights_than_the_signed_release_is_refused(
    store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    store.add(make_release(key).encode())
    calls.clear()

    with pytest.raises(SignatureError, match="other weights"):
        store.get(MODEL, 2, "0" * 64, no_fetch, timeout_s=1)
    assert calls == []


# ------------------------------------------------------------------------------- replayed versions


def test_an_announced_release_older_than_the_newest_accepted_is_refused_as_a_replay(
    store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    store.add(make_release(key, version=3).encode())
    replay = make_release(key, version=2).encode()
    calls.clear()

    with pytest.raises(StaleVersionError, match="replayed"):
        store.add(replay)

    assert store.latest(MODEL) == 3
    assert not (store.cache_dir / MODEL / "v2.release").exists()
    assert calls == []


def test_the_same_or_a_newer_version_announced_again_is_accepted(store: ModelStore, key: Ed25519PrivateKey):
    store.add(make_release(key, version=3).encode())

    store.add(make_release(key, version=3).encode())  # a redelivery of the same release
    store.add(make_release(key, version=4).encode())

    assert store.latest(MODEL) == 4


def test_a_task_may_still_ask_for_an_older_version_explicitly(store: ModelStore, key: Ed25519PrivateKey):
    old = make_release(key, version=2)
    store.add(make_release(key, version=3).encode())

    def fetch(model: str, version: int) -> None:
        store.add(old.encode())

    found = store.get(MODEL, 2, old.weights_sha256, fetch, timeout_s=5)

    assert found.version == 2 and store.latest(MODEL) == 3  # the newest version stays the newest


def test_an_older_version_in_the_cache_serves_a_task_that_names_it(store: ModelStore, key: Ed25519PrivateKey):
    old = make_release(key, version=2)
    store.add(old.encode())
    store.add(make_release(key, version=3).encode())
    store.add(make_release(key, version=4).encode())  # v2 leaves memory, stays on disk

    found = store.get(MODEL, 2, old.weights_sha256, no_fetch, timeout_s=1)

    assert found.version == 2 and store.latest(MODEL) == 4


def test_a_replayed_release_that_is_also_tampered_is_refused_as_a_replay_without_being_read(
    store: ModelStore, key: Ed25519PrivateKey, calls: list[str]
):
    store.add(make_release(key, version=5).encode())
    old = make_release(key, version=2)
    code_env, manifest_env, frame = parts(old)
    calls.clear()

    with pytest.raises(StaleVersionError):
        store.add(rebuilt(old, code_env, manifest_env, flip(frame, 10)).encode())
    assert calls == []


# -------------------------------------------------------------------------- load_signed_model


def dafne_envelope(key: Ed25519PrivateKey, **kwargs: Any) -> bytes:
    blob = make_linear_model(4, 3, model_id=MODEL).dumps()
    sealed_at = kwargs.pop("sealed_at", time.time())
    return seal_at(sealed_at, blob, key=key, kind="dafne-model", model_id=MODEL, **kwargs)


def hostile_envelopes(key: Ed25519PrivateKey) -> dict[str, tuple[bytes, dict[str, Any], type[FedmqError]]]:
    good = dafne_envelope(key, version=4)
    return {
        "tampered payload": (flip(good, len(good) - 5), {}, PayloadMismatchError),
        "tampered header": (flip(good, 40), {}, SignatureError),
        "unsigned": (unsigned(good), {}, MissingSignatureError),
        "signed by another key": (dafne_envelope(keyfiles.generate_key(), version=4), {}, UnknownKeyError),
        "expired": (
            dafne_envelope(key, version=4, sealed_at=time.time() - 7200, expires_in=3600),
            {},
            ExpiredEnvelopeError,
        ),
        "replayed old version": (dafne_envelope(key, version=2), {"min_version": 4}, StaleVersionError),
        "a pickle, not an envelope": (good[8 + int.from_bytes(good[4:8], "little") :], {}, SignatureError),
        "forged signature bytes": (with_signature(good, bytes(64)), {}, BadSignatureError),
    }


ENVELOPE_CASES = sorted(hostile_envelopes(keyfiles.generate_key()))


@pytest.mark.parametrize("case", ENVELOPE_CASES)
def test_load_signed_model_refuses_before_unpickling(case: str, key: Ed25519PrivateKey, calls: list[str]):
    data, kwargs, error = hostile_envelopes(key)[case]
    calls.clear()

    with pytest.raises(error):
        signing.load_signed_model(data, key.public_key(), **kwargs)

    assert calls == []


def test_load_signed_model_unpickles_a_trusted_envelope_and_the_spies_see_it(
    key: Ed25519PrivateKey, calls: list[str]
):
    envelope = dafne_envelope(key, version=4)
    calls.clear()

    model = signing.load_signed_model(envelope, key.public_key(), min_version=4)

    assert isinstance(model, DynamicDLModel)
    assert calls[0] == "dill.loads" and "compile_function" in calls

"""Signed releases: a worker gets code and weights only when every signature and digest checks out."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common import codec, keyfiles, signing
from common.errors import PayloadMismatchError, SignatureError, UnknownKeyError
from common.messages import ModelRelease, decode
from common.model.bundle import join_model, split_model
from common.model.numpy_model import make_linear_model
from common.release import (
    CODE_ENVELOPE_VERSION,
    KIND_MODEL_WEIGHTS,
    build_release,
    encode_release,
    open_release,
    release_frame_size,
    version_manifest,
)


def make_release(key, version: int = 2, frame: bytes | None = None, model: str = "digits") -> ModelRelease:
    code, weights = split_model(make_linear_model(4, 3))
    code_bytes = code.to_bytes()
    frame = codec.encode_weights(weights) if frame is None else frame
    code_env = signing.seal(
        code_bytes, key=key, kind=signing.KIND_MODEL_CODE, model_id=model, version=CODE_ENVELOPE_VERSION
    )
    manifest = version_manifest(
        model,
        version,
        version - 1,
        hashlib.sha256(frame).hexdigest(),
        len(frame),
        hashlib.sha256(code_bytes).hexdigest(),
    )
    manifest_env = signing.seal(manifest, key=key, kind=KIND_MODEL_WEIGHTS, model_id=model, version=version)
    return build_release(
        model,
        version,
        code_env,
        manifest_env,
        frame,
        hashlib.sha256(code_bytes).hexdigest(),
        hashlib.sha256(frame).hexdigest(),
    )


def test_a_release_opens_to_the_signed_code_and_weights():
    key = keyfiles.generate_key()
    release = decode(make_release(key).encode(), ModelRelease)

    verified = open_release(release, key.public_key())
    model = join_model(verified.code, verified.weights)

    assert verified.version == 2 and verified.parent == 1
    assert model(np.ones((2, 4))).shape == (2, 3)


def test_tampered_weights_are_refused():
    key = keyfiles.generate_key()
    release = make_release(key)
    payload = bytearray(release.payload)
    payload[-1] ^= 0xFF
    tampered = ModelRelease(**{**release.__dict__, "payload": bytes(payload)})

    with pytest.raises(PayloadMismatchError, match="differ from the signed manifest"):
        open_release(tampered, key.public_key())


def test_a_release_signed_by_another_key_is_refused():
    key, other = keyfiles.generate_key(), keyfiles.generate_key()
    with pytest.raises(UnknownKeyError):
        open_release(make_release(other), key.public_key())


def test_a_release_claiming_another_version_is_refused():
    key = keyfiles.generate_key()
    release = make_release(key, version=2)
    relabelled = ModelRelease(**{**release.__dict__, "version": 3})
    with pytest.raises(SignatureError):
        open_release(relabelled, key.public_key())


def test_a_release_for_another_model_is_refused():
    key = keyfiles.generate_key()
    release = make_release(key, model="a")
    renamed = ModelRelease(**{**release.__dict__, "model": "b"})
    with pytest.raises(SignatureError):
        open_release(renamed, key.public_key())


def test_encode_release_writes_the_same_body_and_says_where_the_frame_starts():
    key = keyfiles.generate_key()
    release = make_release(key)
    frame_size = len(release.payload) - release.code_size - release.manifest_size
    payload = memoryview(release.payload)
    code_env = bytes(payload[: release.code_size])
    manifest_env = bytes(payload[release.code_size : release.code_size + release.manifest_size])
    frame = payload[-frame_size:]

    encoded = encode_release(
        release.model,
        release.version,
        code_env,
        manifest_env,
        frame,
        release.code_sha256,
        release.weights_sha256,
    )

    assert bytes(encoded.body) == release.encode()
    assert bytes(encoded.body[encoded.frame_offset :]) == bytes(frame)
    assert encoded.frame_offset == len(encoded.body) - release_frame_size(release)
    assert encoded.weights_sha256 == hashlib.sha256(frame).hexdigest()


def test_a_frame_digest_the_caller_verified_is_still_checked_against_the_signed_manifest():
    """A chunked transfer's tail digest stands in for hashing the frame, never for the manifest check."""
    key = keyfiles.generate_key()
    release = make_release(key)
    frame = memoryview(release.payload)[release.code_size + release.manifest_size :]

    verified = open_release(release, key.public_key(), frame_sha256=hashlib.sha256(frame).hexdigest())
    assert verified.weights_sha256 == release.weights_sha256
    with pytest.raises(PayloadMismatchError, match="differ from the signed manifest"):
        open_release(release, key.public_key(), frame_sha256=hashlib.sha256(b"other weights").hexdigest())

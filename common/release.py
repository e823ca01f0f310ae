"""Signed model releases: what a worker needs to run one version, and how it checks it.

A release carries three parts (see :class:`common.messages.ModelRelease`):

1. the model's code envelope: ``seal(ModelCode bytes, kind="model-code", model_id=NAME, version=0)``,
   signed once when the model is registered;
2. the version's manifest envelope: ``seal(manifest, kind="model-weights", model_id=NAME,
   version=V)``, where the manifest (deterministic msgpack) names the model, version, parent, the
   weights frame's sha256 and size, and the code's sha256;
3. the weights frame itself (:mod:`common.codec`), not copied into an envelope.

:func:`open_release` verifies both signatures against the coordinator's key, then the frame's and
the code's sha256 against the signed manifest, and only then parses anything: the caller gets the
:class:`ModelCode` (still text: nothing compiled) and the decoded weights. Any mismatch raises a
:class:`~common.errors.SignatureError` subclass; malformed parts raise DecodeError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Final

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import codec
from common.errors import DecodeError, PayloadMismatchError
from common.messages import ModelRelease
from common.model.bundle import ModelCode
from common.signing import KIND_MODEL_CODE, open_envelope

KIND_MODEL_WEIGHTS: Final = "model-weights"
CODE_ENVELOPE_VERSION: Final = 0
_MANIFEST_KEYS = frozenset({"v", "type", "model", "version", "parent", "sha256", "size", "code_sha256"})


def version_manifest(
    model: str, version: int, parent: int | None, weights_sha256: str, weights_size: int, code_sha256: str
) -> bytes:
    """The deterministic bytes signed for one version."""
    body = {
        "v": 1,
        "type": "model-weights",
        "model": model,
        "version": version,
        "parent": parent,
        "sha256": weights_sha256,
        "size": weights_size,
        "code_sha256": code_sha256,
    }
    packed: bytes = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
    return packed


def parse_manifest(payload: bytes | memoryview) -> dict[str, Any]:
    """Parse a (verified) manifest; DecodeError if it is not one."""
    try:
        manifest = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"version manifest does not parse: {exc}") from exc
    if type(manifest) is not dict or set(manifest) != _MANIFEST_KEYS or manifest["type"] != "model-weights":
        raise DecodeError("not a version manifest")
    return manifest


def build_release(
    model: str,
    version: int,
    code_envelope: bytes,
    manifest_envelope: bytes,
    frame: bytes | memoryview,
    code_sha256: str,
    weights_sha256: str,
) -> ModelRelease:
    """A release message from the stored parts (no signing here: the registry signed them)."""
    head = _release_head(model, version, code_envelope, manifest_envelope, code_sha256, weights_sha256)
    return replace(head, payload=b"".join((code_envelope, manifest_envelope, frame)))


def _release_head(
    model: str,
    version: int,
    code_envelope: bytes,
    manifest_envelope: bytes,
    code_sha256: str,
    weights_sha256: str,
) -> ModelRelease:
    """The release message's fields, without its payload."""
    return ModelRelease(
        model=model,
        version=version,
        code_sha256=code_sha256,
        weights_sha256=weights_sha256,
        code_size=len(code_envelope),
        manifest_size=len(manifest_envelope),
    )


@dataclass(frozen=True)
class EncodedRelease:
    """A release's message body, where its weight frame starts in it, and the frame's sha256."""

    body: bytearray
    frame_offset: int
    weights_sha256: str


def encode_release(
    model: str,
    version: int,
    code_envelope: bytes,
    manifest_envelope: bytes,
    frame: bytes | memoryview,
    code_sha256: str,
    weights_sha256: str,
) -> EncodedRelease:
    """The body of :func:`build_release`'s message, written in one buffer (one copy of the frame).

    The frame ends the body; a publisher splits the chunked body's digest there and passes the
    frame's known sha256, so neither side hashes the weights for the transfer once more.
    """
    head = _release_head(model, version, code_envelope, manifest_envelope, code_sha256, weights_sha256)
    body = head.encode_parts((code_envelope, manifest_envelope, frame))
    return EncodedRelease(body, len(body) - len(memoryview(frame).cast("B")), weights_sha256)


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose signatures and digests all checked out (the code is still text)."""

    model: str
    version: int
    parent: int | None
    code: ModelCode
    weights: list[np.ndarray]
    weights_sha256: str
    code_sha256: str


def release_frame_size(release: ModelRelease) -> int:
    """Bytes of the weight frame that ends ``release``'s body (its payload's last part)."""
    return max(0, len(release.payload) - release.code_size - release.manifest_size)


def open_release(
    release: ModelRelease,
    trusted: Ed25519PublicKey,
    *,
    limits: codec.CodecLimits = codec.DEFAULT_LIMITS,
    frame_sha256: str | None = None,
) -> VerifiedRelease:
    """Verify everything in ``release`` (see the module docstring) and decode it.

    ``frame_sha256`` is the weight frame's sha256 when the caller computed it already from these
    very bytes (a chunked transfer's verified tail digest, :mod:`common.broker.chunks`); it is
    compared with the signed manifest instead of hashing the frame once more. The code is always
    hashed here.
    """
    payload = memoryview(release.payload)
    code_end = release.code_size
    manifest_end = code_end + release.manifest_size
    if release.code_size < 0 or release.manifest_size < 0 or manifest_end > len(payload):
        raise DecodeError("release: part sizes exceed the payload")
    _, code_bytes = open_envelope(
        payload[:code_end], trusted, expected_kind=KIND_MODEL_CODE, expected_model_id=release.model
    )
    header, manifest_bytes = open_envelope(
        payload[code_end:manifest_end],
        trusted,
        expected_kind=KIND_MODEL_WEIGHTS,
        expected_model_id=release.model,
    )
    manifest = parse_manifest(manifest_bytes)
    frame = payload[manifest_end:]
    if header.version != release.version or manifest["version"] != release.version:
        raise PayloadMismatchError(
            f"release says version {release.version}, its signed manifest {header.version}"
        )
    if manifest["model"] != release.model:
        raise PayloadMismatchError(f"signed manifest is for model {manifest['model']!r}")
    weights_sha = frame_sha256 if frame_sha256 is not None else hashlib.sha256(frame).hexdigest()
    if weights_sha != manifest["sha256"] or len(frame) != manifest["size"]:
        raise PayloadMismatchError(
            f"weights of {release.model} v{release.version} differ from the signed manifest"
        )
    code_sha = hashlib.sha256(code_bytes).hexdigest()
    if code_sha != manifest["code_sha256"]:
        raise PayloadMismatchError(f"code of {release.model} differs from the code the manifest names")
    return VerifiedRelease(
        model=release.model,
        version=release.version,
        parent=manifest["parent"],
        code=ModelCode.from_bytes(code_bytes),
        weights=codec.decode_weights(frame, limits=limits),
        weights_sha256=weights_sha,
        code_sha256=code_sha,
    )

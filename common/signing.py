"""Ed25519-signed model envelopes: seal a payload, open it (verify first), load a model from it.

Model code reaches workers only inside a signed envelope; a worker opens it with the coordinator's
public key and unpickles nothing until every check below has passed (fail closed).

Envelope bytes (``seal`` writes them, ``open_envelope`` reads them)::

    b"FMQE" | u32 little-endian n | n bytes of msgpack | payload (raw bytes, to the end)

The msgpack part is ``{"v": 1, "type": "envelope", "header": <bin>, "sig": <bin, 64 bytes>}``.
``header`` holds the canonical encoding of :class:`EnvelopeHeader` (a msgpack map with its keys
sorted); the Ed25519 signature covers exactly those bytes, and the header carries the payload's
sha256 and size, so the signature binds the payload too without the payload being copied: the
payload returned by ``open_envelope`` is a zero-copy ``memoryview`` of the input.

What a caller sees when an envelope must not be trusted (all are :class:`SignatureError`):

- bytes that are not an envelope (magic, lengths, msgpack, field types) -> EnvelopeFormatError
- no signature or an empty one -> MissingSignatureError
- signed by another key (its key id differs from the trusted key's) -> UnknownKeyError
- a signature that does not verify (a changed header, a forged key id) -> BadSignatureError
- a payload whose size or sha256 differs from the signed header -> PayloadMismatchError
- another kind or model than the caller expects -> UnexpectedEnvelopeError
- past its ``expires`` time -> ExpiredEnvelopeError
- a version below the caller's ``min_version`` (a replay) -> StaleVersionError

Keys: :mod:`common.keyfiles` reads and writes them. The key id is the first 16 hex digits of sha256
over the raw public key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, overload

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import (
    BadSignatureError,
    EnvelopeFormatError,
    ExpiredEnvelopeError,
    MissingSignatureError,
    PayloadMismatchError,
    StaleVersionError,
    UnexpectedEnvelopeError,
    UnknownKeyError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

KIND_MODEL_CODE: Final = "model-code"
KIND_MODEL_RELEASE: Final = "model-release"

MAGIC: Final = b"FMQE"
ENVELOPE_VERSION: Final = 1
SIGNATURE_SIZE: Final = 64
KEY_ID_LENGTH: Final = 16
MAX_KIND_LENGTH: Final = 64
MAX_MODEL_ID_LENGTH: Final = 256
_PREFIX = struct.Struct("<4sI")
_MAX_META_SIZE: Final = 4096  # outer msgpack part: a header (<= ~1.3 KiB), a 64-byte signature
_HEADER_FIELDS: Final = frozenset(
    {"created", "expires", "key_id", "kind", "model_id", "sha256", "size", "version"}
)
_META_FIELDS: Final = frozenset({"v", "type", "header", "sig"})


@dataclasses.dataclass(frozen=True)
class EnvelopeHeader:
    """What the signature vouches for: which model and version the payload is, and the payload's digest.

    ``created`` and ``expires`` are unix times in seconds; ``expires`` is None for no expiry.
    """

    kind: str
    model_id: str
    version: int
    sha256: str
    size: int
    created: float
    key_id: str
    expires: float | None = None

    def to_bytes(self) -> bytes:
        """The canonical encoding (msgpack map, keys sorted) that the signature covers."""
        fields = dataclasses.asdict(self)
        return msgpack.packb({name: fields[name] for name in sorted(fields)}, use_bin_type=True)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key: names a key in headers and logs."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LENGTH]


# --------------------------------------------------------------------------------------------- sealing


def seal(
    payload: bytes | bytearray | memoryview,
    *,
    key: Ed25519PrivateKey,
    kind: str,
    model_id: str,
    version: int,
    expires_in: float | None = None,
) -> bytes:
    """Sign ``payload`` as ``version`` of ``model_id`` and return the envelope bytes.

    ``expires_in`` (seconds from now) bounds how long a worker accepts the envelope. Raises
    ValueError for arguments no worker would accept (the limits are the ones ``open_envelope`` checks).
    """
    if not kind or len(kind) > MAX_KIND_LENGTH:
        raise ValueError(f"kind must be 1..{MAX_KIND_LENGTH} characters, got {kind!r}")
    if not model_id or len(model_id) > MAX_MODEL_ID_LENGTH:
        raise ValueError(f"model_id must be 1..{MAX_MODEL_ID_LENGTH} characters, got {model_id!r}")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    if expires_in is not None and not (math.isfinite(expires_in) and expires_in > 0):
        raise ValueError(f"expires_in must be a positive number of seconds, got {expires_in!r}")
    created = time.time()
    header = EnvelopeHeader(
        kind=kind,
        model_id=model_id,
        version=version,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(memoryview(payload).cast("B")),
        created=created,
        key_id=key_id(key.public_key()),
        expires=None if expires_in is None else created + float(expires_in),
    )
    header_bytes = header.to_bytes()
    meta = msgpack.packb(
        {"v": ENVELOPE_VERSION, "type": "envelope", "header": header_bytes, "sig": key.sign(header_bytes)},
        use_bin_type=True,
    )
    logger.debug(
        "sealed %s %s v%d (%d bytes) with key %s", kind, model_id, version, header.size, header.key_id
    )
    return b"".join((_PREFIX.pack(MAGIC, len(meta)), meta, payload))


# --------------------------------------------------------------------------------------------- opening


def open_envelope(
    data: bytes | bytearray | memoryview,
    trusted: Ed25519PublicKey,
    *,
    now: float | None = None,
    min_version: int | None = None,
    expected_kind: str | None = None,
    expected_model_id: str | None = None,
) -> tuple[EnvelopeHeader, memoryview]:
    """Verify an envelope against the ``trusted`` key; return its header and a view of its payload.

    Checks, in order: format, signature present, key id, signature, payload size and sha256, kind
    and model id (when expected ones are given), expiry (at ``now``, default the current time),
    version >= ``min_version``. The first failing check raises its :class:`SignatureError` subclass
    (see the module docstring); nothing is deserialized beyond the envelope's own small msgpack map.

    The signature is verified before the header is decoded; when it fails, the header's claimed
    key id only decides the message: another key's id gives UnknownKeyError, anything else (a
    changed header, a forged key id, an unreadable header) BadSignatureError.
    """
    view = memoryview(data).cast("B")
    header_bytes, signature, payload = _split(view)
    if not signature:
        raise MissingSignatureError("the envelope carries no signature")
    trusted_id = key_id(trusted)
    try:
        trusted.verify(signature, header_bytes)
    except InvalidSignature:
        # Tell a foreign key from a tampered header; the unverified key id is used for that only.
        claimed = _claimed_key_id(header_bytes)
        if claimed is not None and claimed != trusted_id:
            raise UnknownKeyError(
                f"the envelope is signed with key {claimed}, not the trusted key {trusted_id}"
            ) from None
        raise BadSignatureError(f"the signature does not verify with the trusted key {trusted_id}") from None
    header = _decode_header(header_bytes)
    if header.key_id != trusted_id:
        raise UnknownKeyError(f"the envelope names key {header.key_id}, not the trusted key {trusted_id}")
    _check_payload(header, payload)
    _check_expectations(header, now, min_version, expected_kind, expected_model_id)
    logger.debug("opened %s %s v%d signed by %s", header.kind, header.model_id, header.version, trusted_id)
    return header, payload


@overload
def load_signed_model(
    data: bytes | bytearray | memoryview,
    trusted: Ed25519PublicKey,
    *,
    loader: None = None,
    now: float | None = None,
    min_version: int | None = None,
    expected_kind: str | None = None,
    expected_model_id: str | None = None,
) -> Any: ...


@overload
def load_signed_model(
    data: bytes | bytearray | memoryview,
    trusted: Ed25519PublicKey,
    *,
    loader: Callable[[bytes], T],
    now: float | None = None,
    min_version: int | None = None,
    expected_kind: str | None = None,
    expected_model_id: str | None = None,
) -> T: ...


def load_signed_model(
    data: bytes | bytearray | memoryview,
    trusted: Ed25519PublicKey,
    *,
    loader: Callable[[bytes], Any] | None = None,
    now: float | None = None,
    min_version: int | None = None,
    expected_kind: str | None = None,
    expected_model_id: str | None = None,
) -> Any:
    """Open the envelope (every check of :func:`open_envelope`), then and only then deserialize it.

    ``loader`` turns the verified payload into an object; the default is
    ``common.model.DynamicDLModel.Loads``, which unpickles — which is why it runs last.
    """
    _header, payload = open_envelope(
        data,
        trusted,
        now=now,
        min_version=min_version,
        expected_kind=expected_kind,
        expected_model_id=expected_model_id,
    )
    return (loader or _load_dynamic_model)(bytes(payload))


def _load_dynamic_model(blob: bytes) -> Any:
    # Imported here, not at the top: the unpickling machinery is loaded only after verification.
    model_module = importlib.import_module("common.model")
    return model_module.DynamicDLModel.Loads(blob)


def _split(view: memoryview) -> tuple[bytes, bytes, memoryview]:
    """Frame and outer map -> (header bytes, signature, payload view); EnvelopeFormatError otherwise."""
    if len(view) < _PREFIX.size:
        raise EnvelopeFormatError(f"not an envelope: {len(view)} bytes is shorter than the frame prefix")
    magic, meta_size = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise EnvelopeFormatError("not an envelope: the bytes do not start with the FMQE marker")
    end = _PREFIX.size + meta_size
    if meta_size > _MAX_META_SIZE or end > len(view):
        raise EnvelopeFormatError(f"not an envelope: its header length {meta_size} is out of bounds")
    meta = _unpack_map(view[_PREFIX.size : end], "envelope")
    if type(meta.get("v")) is not int or meta["v"] != ENVELOPE_VERSION or meta.get("type") != "envelope":
        raise EnvelopeFormatError(f"unsupported envelope: v={meta.get('v')!r} type={meta.get('type')!r}")
    if not set(meta) <= _META_FIELDS or not isinstance(meta.get("header"), bytes):
        raise EnvelopeFormatError(f"malformed envelope: fields {sorted(meta)!r}")
    signature = meta.get("sig", b"")
    if not isinstance(signature, bytes):
        raise EnvelopeFormatError("malformed envelope: the signature is not bytes")
    if signature and len(signature) != SIGNATURE_SIZE:
        raise BadSignatureError(f"the signature is {len(signature)} bytes, an Ed25519 signature is 64")
    return meta["header"], signature, view[end:]


def _unpack_map(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """Decode a small msgpack map with tight limits, no arrays, no ext types."""

    def refuse_ext(code: int, _data: bytes) -> Any:
        raise EnvelopeFormatError(f"malformed {what}: msgpack ext type {code} is not allowed")

    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=False,
            ext_hook=refuse_ext,
            max_str_len=MAX_MODEL_ID_LENGTH * 4,
            max_bin_len=_MAX_META_SIZE,
            max_array_len=0,
            max_map_len=len(_HEADER_FIELDS),
            max_ext_len=0,
        )
    except EnvelopeFormatError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise EnvelopeFormatError(f"malformed {what}: {exc}") from None
    if not isinstance(value, dict):
        raise EnvelopeFormatError(f"malformed {what}: expected a map, got {type(value).__name__}")
    return value


def _claimed_key_id(header_bytes: bytes) -> str | None:
    """The key id an unverified header claims, or None if it cannot be read."""
    try:
        claimed = _unpack_map(header_bytes, "header").get("key_id")
    except EnvelopeFormatError:
        return None
    return claimed if isinstance(claimed, str) else None


def _decode_header(header_bytes: bytes) -> EnvelopeHeader:
    """Signed header bytes -> EnvelopeHeader; they must be exactly what ``seal`` writes."""
    fields = _unpack_map(header_bytes, "header")
    if set(fields) != _HEADER_FIELDS:
        raise EnvelopeFormatError(f"malformed header: fields {sorted(fields)!r}")
    header = EnvelopeHeader(**fields)
    expected_types: dict[str, tuple[type, ...]] = {
        "kind": (str,),
        "model_id": (str,),
        "version": (int,),
        "sha256": (str,),
        "size": (int,),
        "created": (float,),
        "key_id": (str,),
        "expires": (float, type(None)),
    }
    for name, types in expected_types.items():
        value = getattr(header, name)
        if isinstance(value, bool) or not isinstance(value, types):
            raise EnvelopeFormatError(f"malformed header: {name} is {type(value).__name__}")
    if header.to_bytes() != header_bytes:
        raise EnvelopeFormatError("malformed header: not in canonical form")
    return header


def _check_payload(header: EnvelopeHeader, payload: memoryview) -> None:
    if len(payload) != header.size:
        raise PayloadMismatchError(
            f"the payload is {len(payload)} bytes, the signed header says {header.size}"
        )
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise PayloadMismatchError("the payload's sha256 differs from the signed header's")


def _check_expectations(
    header: EnvelopeHeader,
    now: float | None,
    min_version: int | None,
    expected_kind: str | None,
    expected_model_id: str | None,
) -> None:
    if expected_kind is not None and header.kind != expected_kind:
        raise UnexpectedEnvelopeError(f"expected a {expected_kind!r} envelope, got {header.kind!r}")
    if expected_model_id is not None and header.model_id != expected_model_id:
        raise UnexpectedEnvelopeError(
            f"expected an envelope for model {expected_model_id!r}, got {header.model_id!r}"
        )
    current = time.time() if now is None else now
    if header.expires is not None and current >= header.expires:
        raise ExpiredEnvelopeError(
            f"{header.model_id} v{header.version} expired {current - header.expires:.0f} s ago"
        )
    if min_version is not None and header.version < min_version:
        raise StaleVersionError(
            f"{header.model_id} v{header.version} is older than v{min_version}, the oldest still accepted"
        )

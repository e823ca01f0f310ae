"""Signed model envelopes: a worker refuses every untrustworthy envelope before anything is unpickled."""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Callable
from typing import Any

import dill
import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.errors import (
    BadSignatureError,
    EnvelopeFormatError,
    ExpiredEnvelopeError,
    MissingSignatureError,
    PayloadMismatchError,
    SignatureError,
    StaleVersionError,
    UnexpectedEnvelopeError,
    UnknownKeyError,
)
from common.signing import (
    KIND_MODEL_CODE,
    KIND_MODEL_RELEASE,
    EnvelopeHeader,
    key_id,
    load_signed_model,
    open_envelope,
    seal,
)

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
PAYLOAD = dill.dumps({"model_id": "unet", "weights": [1.0, 2.0], "apply": "def apply(m, x):\n    return x\n"})


def _seal(payload: bytes = PAYLOAD, key: Ed25519PrivateKey = KEY, **overrides: Any) -> bytes:
    options: dict[str, Any] = {"kind": KIND_MODEL_CODE, "model_id": "unet", "version": 3} | overrides
    return seal(payload, key=key, **options)


def _split(envelope: bytes) -> tuple[dict[str, Any], bytes]:
    """(outer msgpack map, payload) of an envelope, for tests that build tampered ones."""
    _magic, size = struct.unpack_from("<4sI", envelope)
    return msgpack.unpackb(envelope[8 : 8 + size]), envelope[8 + size :]


def _frame(meta: dict[str, Any], payload: bytes) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    return struct.pack("<4sI", b"FMQE", len(packed)) + packed + payload


def _resign(envelope: bytes, key: Ed25519PrivateKey, **header_changes: Any) -> bytes:
    """An envelope whose header is changed and properly signed by ``key``."""
    meta, payload = _split(envelope)
    header = msgpack.unpackb(meta["header"]) | header_changes
    meta["header"] = msgpack.packb(dict(sorted(header.items())), use_bin_type=True)
    meta["sig"] = key.sign(meta["header"])
    return _frame(meta, payload)


@pytest.fixture
def unpickle_spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Replace dill's and pickle's load functions by spies that record calls and still work."""
    calls: dict[str, list[Any]] = {}
    for module in (dill, pickle):
        for name in ("loads", "load"):
            label = f"{module.__name__}.{name}"
            calls[label] = []
            real = getattr(module, name)

            def spy(*args: Any, _real: Callable[..., Any] = real, _calls: list[Any] = calls[label]) -> Any:
                _calls.append(args)
                return _real(*args)

            monkeypatch.setattr(module, name, spy)
    return calls


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_returns_signed_header_and_payload() -> None:
    # Prepare
    envelope = _seal(expires_in=60)

    # Execute
    header, payload = open_envelope(envelope, KEY.public_key())

    # Assert
    assert bytes(payload) == PAYLOAD
    assert isinstance(payload, memoryview)
    assert header.kind == KIND_MODEL_CODE
    assert (header.model_id, header.version, header.size) == ("unet", 3, len(PAYLOAD))
    assert header.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert header.key_id == key_id(KEY.public_key())
    assert header.expires is not None and header.expires == pytest.approx(header.created + 60)


def test_payload_view_is_not_a_copy() -> None:
    # Prepare
    envelope = bytearray(_seal())

    # Execute
    _header, payload = open_envelope(envelope, KEY.public_key())
    envelope[-1] ^= 0xFF

    # Assert
    assert payload[-1] == envelope[-1]


def test_key_id_is_16_hex_digits_of_sha256_of_raw_public_key() -> None:
    raw = KEY.public_key().public_bytes_raw()
    assert key_id(KEY.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_load_signed_model_calls_loader_exactly_once(unpickle_spies: dict[str, list[Any]]) -> None:
    # Prepare
    envelope = _seal()

    # Execute
    model = load_signed_model(envelope, KEY.public_key(), loader=lambda blob: dill.loads(blob))

    # Assert
    assert model["model_id"] == "unet"
    assert len(unpickle_spies["dill.loads"]) == 1


def test_load_signed_model_defaults_to_a_working_dynamic_model(unpickle_spies: dict[str, list[Any]]) -> None:
    # Prepare
    from common.model.numpy_model import make_linear_model

    model = make_linear_model(4, 3, model_id="linear")
    envelope = _seal(model.dumps(), model_id="linear")
    data = np.ones((2, 4), dtype="float32")

    # Execute
    loaded = load_signed_model(envelope, KEY.public_key(), expected_model_id="linear")

    # Assert
    assert loaded.model_id == "linear"
    np.testing.assert_allclose(loaded(data), model(data))
    assert len(unpickle_spies["dill.loads"]) == 1


def test_checks_pass_for_the_expected_envelope() -> None:
    header, _payload = open_envelope(
        _seal(version=7, expires_in=60),
        KEY.public_key(),
        min_version=7,
        expected_kind=KIND_MODEL_CODE,
        expected_model_id="unet",
    )
    assert header.version == 7


# ------------------------------------------------------------------------------------- refusals


def _flip_header_byte(envelope: bytes) -> bytes:
    """Change one character of the signed model id ("unet" -> "tnet"): a valid but unsigned header."""
    position = envelope.index(b"unet")
    return envelope[:position] + b"t" + envelope[position + 1 :]


def _flip_payload_byte(envelope: bytes) -> bytes:
    return envelope[:-1] + bytes([envelope[-1] ^ 0x01])


def _without_signature(envelope: bytes) -> bytes:
    meta, payload = _split(envelope)
    del meta["sig"]
    return _frame(meta, payload)


def _empty_signature(envelope: bytes) -> bytes:
    meta, payload = _split(envelope)
    meta["sig"] = b""
    return _frame(meta, payload)


def _forged_key_id(envelope: bytes) -> bytes:
    """Signed by another key, with the trusted key's id written into the header."""
    return _resign(envelope, OTHER_KEY, key_id=key_id(KEY.public_key()))


def _swapped_payload(envelope: bytes) -> bytes:
    meta, _payload = _split(envelope)
    return _frame(meta, dill.dumps({"model_id": "evil"}))


REFUSALS: dict[str, tuple[Callable[[], bytes], dict[str, Any], type[SignatureError]]] = {
    "garbage": (lambda: b"\x80\x04not an envelope at all", {}, EnvelopeFormatError),
    "bare pickle": (lambda: PAYLOAD, {}, EnvelopeFormatError),
    "truncated": (lambda: _seal()[:20], {}, EnvelopeFormatError),
    "flipped header byte": (lambda: _flip_header_byte(_seal()), {}, BadSignatureError),
    "flipped payload byte": (lambda: _flip_payload_byte(_seal()), {}, PayloadMismatchError),
    "swapped payload": (lambda: _swapped_payload(_seal()), {}, PayloadMismatchError),
    "extra payload byte": (lambda: _seal() + b"\x00", {}, PayloadMismatchError),
    "missing signature": (lambda: _without_signature(_seal()), {}, MissingSignatureError),
    "empty signature": (lambda: _empty_signature(_seal()), {}, MissingSignatureError),
    "another key": (lambda: _seal(key=OTHER_KEY), {}, UnknownKeyError),
    "forged key id": (lambda: _forged_key_id(_seal()), {}, BadSignatureError),
    "another kind": (lambda: _seal(), {"expected_kind": KIND_MODEL_RELEASE}, UnexpectedEnvelopeError),
    "another model": (lambda: _seal(), {"expected_model_id": "resnet"}, UnexpectedEnvelopeError),
    "expired": (lambda: _seal(expires_in=60), {"now": 2e10}, ExpiredEnvelopeError),
    "replayed old version": (lambda: _seal(version=3), {"min_version": 4}, StaleVersionError),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_untrusted_envelope_is_refused_with_its_own_error(case: str) -> None:
    # Prepare
    make, checks, error = REFUSALS[case]
    envelope = make()

    # Execute / Assert
    with pytest.raises(error) as raised:
        open_envelope(envelope, KEY.public_key(), **checks)
    assert type(raised.value) is error
    assert str(raised.value)


@pytest.mark.parametrize("case", REFUSALS)
@pytest.mark.parametrize("with_loader", [True, False], ids=["dill-loader", "default-loader"])
def test_nothing_is_unpickled_when_an_envelope_is_refused(
    case: str, with_loader: bool, unpickle_spies: dict[str, list[Any]]
) -> None:
    # Prepare
    make, checks, error = REFUSALS[case]
    envelope = make()
    loader_calls: list[bytes] = []

    def loader(blob: bytes) -> Any:
        loader_calls.append(blob)
        return dill.loads(blob)

    # Execute
    with pytest.raises(error):
        if with_loader:
            load_signed_model(envelope, KEY.public_key(), loader=loader, **checks)
        else:
            load_signed_model(envelope, KEY.public_key(), **checks)

    # Assert
    assert loader_calls == []
    assert unpickle_spies == {"dill.loads": [], "dill.load": [], "pickle.loads": [], "pickle.load": []}


def test_error_for_another_key_names_both_key_ids() -> None:
    with pytest.raises(UnknownKeyError) as raised:
        open_envelope(_seal(key=OTHER_KEY), KEY.public_key())
    assert key_id(OTHER_KEY.public_key()) in str(raised.value)
    assert key_id(KEY.public_key()) in str(raised.value)


def test_refusals_are_signature_errors_and_envelope_format_is_a_decode_error() -> None:
    from common.errors import DecodeError

    assert all(issubclass(error, SignatureError) for _make, _checks, error in REFUSALS.values())
    assert issubclass(EnvelopeFormatError, DecodeError)


def test_header_with_unknown_fields_is_refused_even_when_signed() -> None:
    envelope = _resign(_seal(), KEY, extra="field")
    with pytest.raises(EnvelopeFormatError):
        open_envelope(envelope, KEY.public_key())


def test_header_signed_by_the_trusted_key_but_naming_another_key_is_refused() -> None:
    envelope = _resign(_seal(), KEY, key_id="0123456789abcdef")
    with pytest.raises(UnknownKeyError, match="0123456789abcdef"):
        open_envelope(envelope, KEY.public_key())


def test_signed_header_not_in_canonical_form_is_refused() -> None:
    # Prepare: the same fields, keys in reverse order, properly signed
    meta, payload = _split(_seal())
    header = msgpack.unpackb(meta["header"])
    meta["header"] = msgpack.packb(dict(reversed(sorted(header.items()))), use_bin_type=True)
    meta["sig"] = KEY.sign(meta["header"])

    # Execute / Assert
    with pytest.raises(EnvelopeFormatError, match="canonical"):
        open_envelope(_frame(meta, payload), KEY.public_key())


def test_signature_of_the_wrong_length_is_a_bad_signature() -> None:
    meta, payload = _split(_seal())
    meta["sig"] = meta["sig"][:63]
    with pytest.raises(BadSignatureError, match="63 bytes"):
        open_envelope(_frame(meta, payload), KEY.public_key())


def test_envelope_with_msgpack_ext_type_is_refused() -> None:
    meta, payload = _split(_seal())
    packed = msgpack.packb(meta | {"v": msgpack.ExtType(5, b"x")}, use_bin_type=True)
    envelope = struct.pack("<4sI", b"FMQE", len(packed)) + packed + payload
    with pytest.raises(EnvelopeFormatError):
        open_envelope(envelope, KEY.public_key())


def test_oversized_header_length_is_refused_before_parsing() -> None:
    envelope = struct.pack("<4sI", b"FMQE", 2**31) + b"\x80" * 100
    with pytest.raises(EnvelopeFormatError, match="out of bounds"):
        open_envelope(envelope, KEY.public_key())


@pytest.mark.parametrize(
    "options",
    [
        {"kind": ""},
        {"model_id": ""},
        {"model_id": "m" * 257},
        {"version": -1},
        {"version": True},
        {"expires_in": 0},
        {"expires_in": float("nan")},
    ],
)
def test_seal_refuses_arguments_no_worker_would_accept(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _seal(**options)


def test_seal_accepts_the_longest_model_id_in_any_script() -> None:
    model_id = "模" * 256
    header, _payload = open_envelope(_seal(model_id=model_id), KEY.public_key())
    assert header.model_id == model_id


def test_header_encoding_is_canonical() -> None:
    header = EnvelopeHeader("model-code", "unet", 1, "0" * 64, 10, 1.5, "k" * 16, None)
    assert list(msgpack.unpackb(header.to_bytes())) == sorted(
        ["kind", "model_id", "version", "sha256", "size", "created", "key_id", "expires"]
    )
    assert header.to_bytes() == EnvelopeHeader(**msgpack.unpackb(header.to_bytes())).to_bytes()


# ---------------------------------------------------------------------------------------- fuzzing

VALID = _seal(expires_in=10**6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_signature_errors(data: bytes) -> None:
    with pytest.raises(SignatureError):
        open_envelope(data, KEY.public_key())


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_only_raise_signature_errors(data: bytes) -> None:
    with pytest.raises(SignatureError):
        open_envelope(b"FMQE" + data, KEY.public_key())


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid envelope with bytes flipped, inserted, deleted, or cut off: never equal to the original."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete" and data:
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    mutated = bytes(data)
    assume(mutated != VALID)
    return mutated


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutations())
def test_mutated_envelope_is_never_opened(mutated: bytes) -> None:
    with pytest.raises(SignatureError):
        open_envelope(mutated, KEY.public_key())

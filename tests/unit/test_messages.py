"""Application messages: round trips, zero-copy payloads, and refusal of anything malformed."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import codec
from common.errors import DecodeError
from common.messages import (
    DeltaReport,
    Heartbeat,
    ModelRelease,
    StartRun,
    TrainTask,
    decode,
)


def a_delta(payload: bytes = b"") -> DeltaReport:
    return DeltaReport(
        task_id="t-1",
        round_id=3,
        worker="alice",
        model="digits",
        base_version=2,
        base_weights_sha256="ab" * 32,
        sample_count=120,
        metrics={"loss": 0.25, "accuracy": 0.9},
        payload=payload,
    )


def test_delta_report_round_trip_keeps_the_frame_zero_copy():
    weights = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(4, dtype=np.float32)]
    body = a_delta(codec.encode_weights(weights)).encode()

    message = decode(body, DeltaReport)
    arrays = codec.decode_weights(message.payload)

    assert message.sample_count == 120 and message.metrics == {"loss": 0.25, "accuracy": 0.9}
    assert np.shares_memory(arrays[0], np.frombuffer(body, dtype=np.uint8))
    np.testing.assert_array_equal(arrays[0], weights[0])


def test_messages_without_payload_round_trip():
    start = StartRun(
        run_id="r1", model="digits", rounds=5, min_workers=3, deadline_s=600.0, options={"k": [1]}
    )
    task = TrainTask(task_id="t", round_id=1, model="digits", version=4, weights_sha256="00" * 32)

    assert decode(start.encode()) == start
    assert decode(task.encode(), TrainTask) == task


def test_release_round_trip():
    release = ModelRelease(
        model="m",
        version=1,
        code_sha256="c",
        weights_sha256="w",
        code_size=3,
        manifest_size=2,
        payload=b"CODMAW",
    )
    got = decode(release.encode(), ModelRelease)
    assert got == release and bytes(got.payload) == b"CODMAW"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "truncated"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"v": 2, "type": "heartbeat"}), "schema version"),
        (msgpack.packb({"v": 1, "type": "exec-this"}), "unknown type"),
        (
            msgpack.packb({"v": 1, "type": "heartbeat", "worker": "w", "sent_at": 1.0, "payload": 0, "x": 1}),
            "unknown fields",
        ),
        (msgpack.packb({"v": 1, "type": "heartbeat", "worker": "w", "payload": 0}), "missing fields"),
        (
            msgpack.packb({"v": 1, "type": "heartbeat", "worker": 5, "sent_at": 1.0, "payload": 0}),
            "expected str",
        ),
        (
            msgpack.packb(
                {"v": 1, "type": "heartbeat", "worker": "w", "sent_at": float("nan"), "payload": 0}
            ),
            "finite",
        ),
        (
            msgpack.packb({"v": 1, "type": "heartbeat", "worker": "w", "sent_at": 1.0, "payload": 5}) + b"xx",
            "payload",
        ),
        (
            msgpack.packb({"v": 1, "type": "heartbeat", "worker": "w", "sent_at": 1.0, "payload": 2}) + b"xx",
            "payload",
        ),
        (msgpack.packb(msgpack.ExtType(1, b"x")), "ext|not msgpack"),
        (pickle.dumps({"v": 1, "type": "heartbeat"}), "not msgpack|expected a map|schema version"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body, message):
    with pytest.raises(DecodeError, match=message):
        decode(body)


def test_a_message_of_the_wrong_type_is_refused():
    body = Heartbeat(worker="w", sent_at=1.0).encode()
    with pytest.raises(DecodeError, match="expected 'delta-report'"):
        decode(body, DeltaReport)


def test_metrics_must_be_numbers():
    body = a_delta().encode().replace(b"\xa4loss\xcb", b"\xa4loss\xc0", 1)  # loss: nil
    with pytest.raises(DecodeError):
        decode(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_give_decode_errors(body):
    try:
        decode(body)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_bodies_only_ever_give_decode_errors_or_a_valid_message(data):
    body = bytearray(a_delta(b"\x00" * 16).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
    try:
        message = decode(bytes(body))
    except DecodeError:
        return
    # Whatever survives the checks is a well-formed message: it re-encodes to an equal one.
    again = decode(message.encode())
    assert again == message and bytes(getattr(again, "payload", b"")) == bytes(
        getattr(message, "payload", b"")
    )


def test_a_delta_encoded_with_its_frame_is_the_same_body_as_with_the_encoded_payload():
    delta = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, dtype=np.float32)]
    plain = a_delta(codec.encode_weights(delta)).encode()

    framed = a_delta().encode_with_frame(codec.layout_frame(delta))

    assert bytes(framed) == plain
    decoded = decode(framed)
    assert [a.tolist() for a in codec.decode_weights(decoded.payload)] == [a.tolist() for a in delta]
    with pytest.raises(TypeError, match="only payload"):
        a_delta(b"x").encode_with_frame(codec.layout_frame(delta))

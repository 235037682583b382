"""Wire format: round trips, and hostile bytes only ever raise DecodeError."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.membership.messages import (
    VERSION,
    Ack,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    MemberState,
    Nack,
    Ping,
    PushPull,
    Suspect,
    decode_packet,
    encode_packet,
    wire_size,
)

names = st.text(min_size=1, max_size=20)
addrs = st.text(min_size=1, max_size=40)
incs = st.integers(min_value=0, max_value=2**63 - 1)
seqs = st.integers(min_value=0, max_value=2**32 - 1)
tags = st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=4)
member_states = st.builds(MemberState, names, addrs, incs, st.integers(0, 3), tags)

messages = st.one_of(
    st.builds(Ping, seqs, names, names, addrs),
    st.builds(IndirectPing, seqs, names, addrs, names, addrs, st.booleans()),
    st.builds(Ack, seqs),
    st.builds(Nack, seqs),
    st.builds(Alive, incs, names, addrs, tags),
    st.builds(Suspect, incs, names, names),
    st.builds(Dead, incs, names, names),
    st.builds(PushPull, names, st.booleans(), st.booleans(), st.lists(member_states, max_size=5)),
)


@given(st.lists(messages, min_size=1, max_size=8))
def test_round_trip(msgs):
    assert decode_packet(encode_packet(msgs)) == msgs


def _decode_only_raises_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_packet(data)


probe_messages = st.one_of(
    st.builds(Ping, seqs, names, names, addrs, st.booleans()),
    st.builds(IndirectPing, seqs, names, addrs, names, addrs, st.booleans(),
              st.integers(0, 2**40)),
    st.builds(Ack, st.integers(-2**63, 2**64 - 1)),
    st.builds(Nack, seqs),
)


@given(st.one_of(probe_messages, messages))
def test_wire_size_is_the_encoded_size(msg):
    # the probe messages' sizes are counted, not encoded: the count must be the encoder's
    assert wire_size(msg) == len(cbor2.dumps(msg.to_wire()))


@pytest.mark.parametrize("n", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1, -24,
                               -25, -257, -2**32, -2**32 - 1])
def test_wire_size_at_the_cbor_length_boundaries(n):
    for msg in (Ack(n), Ping(n, "é" * 30, "x" * 300, "a:1")):
        assert wire_size(msg) == len(cbor2.dumps(msg.to_wire()))


@pytest.mark.parametrize("length", [0, 1, 23, 24, 25, 255, 256, 65535, 65536])
def test_wire_size_at_the_text_length_boundaries(length):
    for text in ("x" * length, "é" * (length // 2)):
        msg = IndirectPing(7, text, "a:1", text, "b:2", True, 3)
        assert wire_size(msg) == len(cbor2.dumps(msg.to_wire()))


@settings(max_examples=10_000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_decode_error(data):
    _decode_only_raises_decode_error(data)


@settings(max_examples=3_000, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_mutated_packets_never_raise_anything_but_decode_error(msgs, data):
    raw = bytearray(encode_packet(msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _decode_only_raises_decode_error(bytes(raw))


# valid CBOR, wrong shapes: every strategy of arbitrary CBOR values
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@settings(max_examples=1_500, deadline=None)
@given(cbor_values)
def test_wrong_shapes_never_raise_anything_but_decode_error(value):
    _decode_only_raises_decode_error(cbor2.dumps([VERSION, [value]]))
    _decode_only_raises_decode_error(cbor2.dumps(value))


@pytest.mark.parametrize("packet, reason", [
    ([1, [[3, 1]]], "version"),
    ([VERSION, []], "1.."),
    ([VERSION, [[99, 1]]], "unknown message type"),
    ([VERSION, [[3, -1]]], "unsigned"),
    ([VERSION, [[3, 1, 2]]], "fields"),
    ([VERSION, [[5, 1, "", "a:1", {}, b"", b""]]], "text"),
    ([VERSION, [[5, 1, "n", "a:1", {"k": 5}, b"", b""]]], "text"),
    ([VERSION, [[5, 1, "n", "a:1", {}, b"short", b""]]], "bytes"),
    ([VERSION, [[5, 1, "n", "a:1", {}, b"k" * 32, b"s" * 63]]], "bytes"),
    ([VERSION, [[5, 1, "n", "a:1", {}]]], "fields"),
    ([VERSION, [[7, 2**64, "n", "m"]]], "unsigned"),
    ([VERSION, [[1, 1, "x" * 129, "a", "b", False]]], "text"),
    ([VERSION, [[8, "n", True, False, [["a", "b", 1, 9, {}, b"", b""]]]]], "unsigned"),
    ([VERSION, [[8, "n", True, False, [["a", "b", 1, 0, {}]]]]], "7-item"),
])
def test_specific_bad_packets_name_the_problem(packet, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_packet(cbor2.dumps(packet))


def test_tags_and_deep_nesting_are_bounded():
    with pytest.raises(DecodeError):
        decode_packet(cbor2.dumps([VERSION, [[5, 1, "n", "a", {str(i): "" for i in range(65)},
                                              b"", b""]]]))
    deep: list = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(DecodeError):
        decode_packet(cbor2.dumps([VERSION, [deep]]))

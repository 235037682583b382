"""Broker messages and copies (meshd/broker/messages.py)."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import wire
from meshd.broker.messages import (
    MAX_HEADERS,
    WireError,
    build,
    copy,
    decode_copy,
    new_id,
)
from meshd.errors import MeshError

LIMIT = 1 << 16


def test_new_ids_are_26_characters_unique_and_time_ordered():
    ids = [new_id(1000.0 + i / 1000) for i in range(200)]
    assert all(len(i) == 26 for i in ids)
    assert len(set(ids)) == 200
    assert ids == sorted(ids), "a later millisecond sorts later"


def test_a_built_message_round_trips_as_a_copy():
    m = build("orders.created", {"n": 1}, {"k": "v"}, "ada", LIMIT, now=5.0)
    assert (m.topic, m.body, m.headers, m.publisher, m.published_at) == (
        "orders.created", {"n": 1}, {"k": "v"}, "ada", 5.0)
    raw = wire.loads(cbor2.dumps(copy("team-a", m.to_wire(), True, ["billing", "audit"])))
    ns, back, plain, groups = decode_copy(raw, LIMIT)
    assert (ns, back, plain, groups) == ("team-a", m, True, ["audit", "billing"])
    assert build("t", b"\x00", None, "n", LIMIT, msg_id="given").id == "given"


@pytest.mark.parametrize("args, says", [
    (("orders.*", {}, None), "wildcard"),
    (("t", {}, {"k": 1}), "header"),
    (("t", {}, {"": "v"}), "header"),
    (("t", {}, {f"h{i}": "v" for i in range(MAX_HEADERS + 1)}), "at most"),
    (("t", b"x" * (LIMIT + 1), None), "exceeds the 65536-byte limit"),
    (("t", object(), None), "bytes or a JSON value"),
])
def test_bad_client_messages_are_400_saying_why(args, says):
    with pytest.raises(MeshError) as err:
        build(*args, "ada", LIMIT)
    assert err.value.status == 400 and says in err.value.detail


def _good() -> dict:
    return copy("default", build("t.x", {"a": 1}, {"h": "v"}, "ada", LIMIT,
                                 now=1.0).to_wire(), False, ["g"])


@pytest.mark.parametrize("break_it", [
    lambda c: c.pop("plain"),
    lambda c: c.update(extra=1),
    lambda c: c.update(ns="Bad NS"),
    lambda c: c.update(plain="yes"),
    lambda c: c.update(groups=["ok", 7]),
    lambda c: c.update(groups=[""]),
    lambda c: c["msg"].update(topic="a..b"),
    lambda c: c["msg"].update(topic="a.>"),
    lambda c: c["msg"].update(id=""),
    lambda c: c["msg"].update(published_at=True),
    lambda c: c["msg"].update(publisher=""),
    lambda c: c["msg"].update(headers={"k": b"bytes"}),
    lambda c: c["msg"].update(body=b"x" * (LIMIT + 1)),
    lambda c: c["msg"].pop("body"),
])
def test_malformed_copies_are_wire_errors(break_it):
    c = _good()
    break_it(c)
    with pytest.raises(WireError):
        decode_copy(c, LIMIT)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                    | st.binary(max_size=5),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=5), kids, max_size=4), max_leaves=20))
def test_anything_a_peer_sends_is_a_copy_or_a_wire_error(value):
    with contextlib.suppress(WireError):  # any other exception fails the test
        decode_copy(value, LIMIT)


ANY = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) \
    | st.binary(max_size=8) | st.lists(st.text(max_size=3), max_size=3) \
    | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["ns", "plain", "groups", "msg.id", "msg.topic", "msg.headers",
                        "msg.body", "msg.published_at", "msg.publisher"]), ANY)
def test_a_copy_with_any_field_replaced_is_a_copy_or_a_wire_error(where, value):
    c = _good()
    if where.startswith("msg."):
        c["msg"][where[4:]] = value
    else:
        c[where] = value
    try:
        ns, m, plain, groups = decode_copy(c, LIMIT)
    except WireError:
        return
    assert isinstance(ns, str) and isinstance(plain, bool) and isinstance(m.headers, dict)
    assert all(isinstance(g, str) and g for g in groups)


def test_ids_are_the_number_in_26_crockford_digits_most_significant_first():
    """The fast encoding (two digits per table lookup) equals the ULID definition: the
    128-bit number (48 bits of milliseconds, 80 random) as 26 base32 digits."""
    import random
    from unittest import mock

    from meshd.broker import messages as m

    def reference(n: int) -> str:
        return "".join(m._CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))

    rng = random.Random(7)
    for now, rand in [(0.0, bytes(10)), (281474976710.655, b"\xff" * 10)] + [
            (rng.uniform(0, 2e9), rng.randbytes(10)) for _ in range(2000)]:
        with mock.patch.object(m.os, "urandom", return_value=rand):
            got = m.new_id(now)
        ms = int(now * 1000) & ((1 << 48) - 1)
        assert got == reference((ms << 80) | int.from_bytes(rand, "big"))


def test_ids_from_a_pool_are_unique_valid_and_time_ordered():
    from meshd.broker.messages import Ids

    ids = Ids()
    made = [ids.new(1000.0 + i / 1000) for i in range(1000)]  # crosses pool refills
    assert len(set(made)) == 1000 and all(len(i) == 26 for i in made)
    assert made == sorted(made)
    assert made[0][:10] == new_id(1000.0)[:10]  # the same milliseconds digits


@pytest.mark.parametrize("body", [b"", b"x" * 23, b"x" * 24, b"x" * 255, b"x" * 256,
                                  b"x" * 70_000, "", "abc", "x" * 300, "h\u00e9", {"a": [1]},
                                  [1, 2.5, None], 7])
def test_the_size_of_a_body_is_its_cbor_encoding_plus_headers(body):
    from meshd.broker.messages import _size

    assert _size(body, {}) == len(cbor2.dumps(body))
    assert _size(body, {"kk": "vvv"}) == len(cbor2.dumps(body)) + 5

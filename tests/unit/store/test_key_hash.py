"""The store's key hash (records.key_hash) takes a faster way for states without an LWW
register; both ways must give the same bytes, or replicas of different versions would
disagree on every digest. Property-tested against the general way (canonical CBOR of
crdt.canonical), with keys and tags of any text, unsorted and repeated."""

from __future__ import annotations

import hashlib

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.store import crdt
from meshd.store.records import key_hash

texts = st.text(max_size=6)
sets = st.fixed_dictionaries({
    "adds": st.dictionaries(texts, st.lists(texts, max_size=4), max_size=5),
    "removed": st.lists(texts, max_size=5)})
counts = st.dictionaries(texts, st.integers(0, 2**40), max_size=4)
counters = st.fixed_dictionaries({"p": counts, "n": counts, "bp": counts, "bn": counts})
states = st.fixed_dictionaries({}, optional={"set": sets, "counter": counters})


def general(key: str, state: crdt.State) -> int:
    data = key.encode() + b"\x00" + cbor2.dumps(crdt.canonical(state), canonical=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@settings(max_examples=400)
@given(texts, states)
def test_the_fast_way_gives_the_general_way_s_hash(key, state):
    assert key_hash(key, state) == general(key, state)


ascii_keys = st.text(alphabet="ab-09é", max_size=8)


@settings(max_examples=300)
@given(ascii_keys, st.dictionaries(ascii_keys, st.integers(1, 9), max_size=8),
       st.dictionaries(ascii_keys, st.lists(ascii_keys, max_size=3), max_size=8))
def test_keys_of_many_lengths_are_laid_out_in_canonical_order(key, counts, adds):
    # node ids and elements of different lengths: canonical order is shorter first, which
    # plain sorting is not ("n10" < "n9"); "é" mixes in keys whose encoding is longer
    state = {"counter": {"p": counts, "n": {}, "bp": {}, "bn": {}},
             "set": {"adds": adds, "removed": []}}
    assert key_hash(key, state) == general(key, state)


def test_order_and_repeats_do_not_change_the_hash_and_content_does():
    a = {"set": {"adds": {"bb": ["t2", "t1"], "a": ["t3"]}, "removed": ["t2", "t2"]},
         "counter": {"p": {"node-10": 3, "n2": 1}, "n": {}, "bp": {"x": 0}, "bn": {}}}
    b = {"counter": {"bn": {}, "bp": {}, "n": {}, "p": {"n2": 1, "node-10": 3}},
         "set": {"adds": {"a": ["t3", "t3"], "bb": ["t1", "t2"]}, "removed": ["t2"]}}
    assert key_hash("k", a) == key_hash("k", b) == general("k", a)
    b["set"]["adds"]["a"].append("t4")
    assert key_hash("k", a) != key_hash("k", b)
    assert key_hash("k", a) != key_hash("k2", a)

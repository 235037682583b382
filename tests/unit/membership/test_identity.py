"""Rule S5 in the core: names bound to identity keys, alives applied only when verified.

The shell's signature check is stood in for by `verify` (an alive is genuine when its sig
starts with GOOD); the core only ever asks for that verdict, so the rules are the same.
"""

from __future__ import annotations

import random

from meshd.membership.core import Membership, tags_size
from meshd.membership.messages import ALIVE, Alive, Dead, MemberState, Ping

from .helpers import addr, settings

GOOD = b"good-signature"
KEY_A, KEY_B, KEY_X = b"A" * 32, b"B" * 32, b"X" * 32


def _verify(msg: Alive) -> bool:
    return msg.sig.startswith(GOOD)


def _core(name: str = "a", key: bytes = KEY_A) -> Membership:
    core = Membership(name, addr(name), settings(), random.Random(name), 0.0, key=key,
                      sign=lambda payload: GOOD, verify=_verify)
    core.restore([MemberState("b", addr("b"), 1, ALIVE, {}, KEY_B, GOOD)], 0.0)
    return core


def _kinds(out) -> list[tuple[str, str]]:
    return [(e.kind, e.node) for e in out.events]


def test_a_new_member_is_added_only_with_a_verified_alive():
    a = _core()
    out = a.receive(addr("c"), [Alive(1, "c", addr("c"), {}, KEY_X, b"forged")], 1.0)
    assert "c" not in a.members and _kinds(out) == []
    assert a.bad_alives == 1
    out = a.receive(addr("c"), [Alive(1, "c", addr("c"), {"r": "1"}, KEY_X, GOOD)], 1.0)
    assert _kinds(out) == [("join", "c")]
    m = a.members["c"]
    assert (m.key, m.sig, m.tags, m.incarnation) == (KEY_X, GOOD, {"r": "1"}, 1)


def test_an_alive_signed_by_another_key_is_a_conflict_and_changes_nothing():
    a = _core()
    out = a.receive("evil:1", [Alive(5, "b", "evil:1", {}, KEY_X, GOOD)], 1.0)
    assert _kinds(out) == [("conflict", "b")]
    assert "another identity" in out.events[0].detail
    m = a.members["b"]
    assert (m.addr, m.key, m.incarnation) == (addr("b"), KEY_B, 1)
    # not newer, or not verified: not even worth a conflict
    assert _kinds(a.receive("evil:1", [Alive(1, "b", "evil:1", {}, KEY_X, GOOD)], 1.0)) == []
    assert _kinds(a.receive("evil:1", [Alive(9, "b", "evil:1", {}, KEY_X, b"no")], 1.0)) == []


def test_a_newer_alive_with_the_members_own_key_moves_it_to_a_new_address():
    a = _core()
    assert _kinds(a.receive("new:1", [Alive(1, "b", "new:1", {}, KEY_B, GOOD)], 1.0)) == []
    assert a.members["b"].addr == addr("b"), "same incarnation: not a move"
    out = a.receive("new:1", [Alive(2, "b", "new:1", {}, KEY_B, GOOD)], 1.0)
    assert _kinds(out) == [("update", "b")]
    assert (a.members["b"].addr, a.members["b"].incarnation) == ("new:1", 2)


def test_an_unverified_newer_alive_is_refused_and_counted():
    a = _core()
    a.receive(addr("b"), [Alive(2, "b", addr("b"), {"t": "x"}, KEY_B, b"forged")], 1.0)
    assert (a.members["b"].incarnation, a.members["b"].tags) == (1, {})
    assert a.bad_alives == 1


def test_the_stored_signature_follows_the_members_latest_alive():
    a = _core()
    a.receive(addr("b"), [Alive(2, "b", addr("b"), {}, KEY_B, GOOD + b"-2")], 1.0)
    assert a.members["b"].sig == GOOD + b"-2"
    assert a.members["b"].to_state().sig == GOOD + b"-2", "push-pull passes it on"


def test_an_alive_about_us_with_another_key_is_a_conflict_not_a_refutation():
    a = _core()
    out = a.receive("evil:1", [Alive(3, "a", "evil:1", {}, KEY_X, GOOD)], 1.0)
    assert _kinds(out) == [("conflict", "a")]
    assert (out.events[0].addr, out.events[0].incarnation) == ("evil:1", 3)
    assert a.me.incarnation == 0, "refuting cannot stop another identity"
    out = a.receive("evil:1", [Alive(3, "a", "evil:1", {}, KEY_X, b"forged")], 1.0)
    assert _kinds(out) == [] and a.bad_alives == 1


def test_an_alive_about_us_with_our_key_from_another_address_is_refuted():
    a = _core()
    a.receive("old:1", [Alive(4, "a", "old:1", {}, KEY_A, GOOD)], 1.0)
    assert a.me.incarnation == 5, "our earlier life: refuted like any stale alive"
    assert a.me.addr == addr("a")


def test_without_keys_an_alive_about_us_from_another_address_is_a_conflict():
    a = Membership("a", addr("a"), settings(), random.Random(1), 0.0)
    out = a.receive("other:1", [Alive(0, "a", "other:1", {})], 1.0)
    assert _kinds(out) == [("conflict", "a")]
    assert "also used by other:1" in out.events[0].detail
    assert a.me.incarnation == 0
    out = a.receive(addr("b"), [Alive(0, "a", addr("a"), {"stale": "1"})], 1.0)
    assert a.me.incarnation == 1, "same address, different tags: refuted"


def test_tags_up_to_the_limit_are_taken_and_one_byte_more_is_refused():
    a = _core()
    limit = settings().max_meta_bytes
    fit = {"t": "x" * (limit - tags_size({"t": "x" * 300}) + 300)}
    assert tags_size(fit) == limit
    over = {"t": fit["t"] + "x"}
    a.receive(addr("b"), [Alive(2, "b", addr("b"), over, KEY_B, GOOD)], 1.0)
    assert a.members["b"].incarnation == 1
    a.receive(addr("b"), [Alive(2, "b", addr("b"), fit, KEY_B, GOOD)], 1.0)
    assert a.members["b"].tags == fit
    a.receive(addr("c"), [Alive(1, "c", addr("c"), over, KEY_X, GOOD)], 1.0)
    assert "c" not in a.members
    a.receive(addr("c"), [Alive(1, "c", addr("c"), fit, KEY_X, GOOD)], 1.0)
    assert "c" in a.members


def test_a_dead_member_that_comes_back_is_live_and_probed_again():
    a = _core()
    a.receive(addr("c"), [Dead(1, "b", "c")], 1.0)
    assert a.members["b"].status == "dead" and a.num_live() == 1  # self only
    out = a.receive(addr("b"), [Alive(2, "b", addr("b"), {}, KEY_B, GOOD)], 2.0)
    assert _kinds(out) == [("join", "b")]
    assert a.num_live() == 2
    pinged = []
    t = 2.0
    while not pinged and t < 10.0:
        t += 0.1
        pinged = [m for s in a.tick(t).sends for m in s.msgs
                  if isinstance(m, Ping) and m.target == "b"]
    assert pinged, "b came back but is never probed"


def test_keys_are_looked_up_by_live_member_and_by_address():
    a = _core()
    assert a.name_of_key(KEY_B) == "b"
    assert a.key_at(addr("b")) == KEY_B
    assert a.name_of_key(KEY_X) is None and a.key_at("nowhere:1") is None
    a.receive(addr("c"), [Dead(1, "b", "c")], 1.0)
    assert a.name_of_key(KEY_B) is None, "a dead member is no live identity"
    assert a.key_at(addr("b")) == KEY_B, "its address still expects its key"
    a.receive(addr("c"), [Alive(1, "c", addr("b"), {}, KEY_X, GOOD)], 1.0)
    assert a.name_of_key(KEY_X) == "c"
    assert a.key_at(addr("b")) == KEY_X, "the live member at an address wins over a dead one"


def test_an_evicted_member_is_dead_at_once_and_cannot_refute_unverified():
    a = _core()
    out = a.evict("b", 1.0)
    assert [(e.kind, e.node, e.detail) for e in out.events] == [("dead", "b", "by a")]
    assert a.members["b"].status == "dead"
    assert _kinds(a.evict("b", 2.0)) == [], "already dead"
    assert _kinds(a.evict("a", 2.0)) == [] and a.me.status == "alive", "never ourselves"
    assert _kinds(a.evict("nobody", 2.0)) == []
    a.receive(addr("b"), [Alive(2, "b", addr("b"), {}, KEY_B, b"revoked")], 3.0)
    assert a.members["b"].status == "dead"


def test_a_join_whose_stream_fails_is_reported_at_once():
    a = _core()
    a.join(["seed:1", addr("a")], 0.0)
    out = a.stream_failed("seed:1", 0.5, "refused")
    assert [(e.kind, e.addr, e.detail) for e in out.events] == [("join-failed", "seed:1",
                                                                   "refused")]
    assert a.stream_failed("seed:1", 0.6).events == [], "reported once"
    assert a.stream_failed("other:1", 0.7).events == [], "not a join we made"

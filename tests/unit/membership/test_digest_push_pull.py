"""Anti-entropy by digest (core rule A1, issue 22): what differs travels, nothing else."""

from __future__ import annotations

import cbor2
import pytest

from meshd.membership.messages import (
    ALIVE,
    DEAD,
    DIGEST_BUCKETS,
    VERSION,
    Alive,
    DecodeError,
    Digest,
    DigestReply,
    MemberState,
    PushPull,
    Suspect,
    decode_packet,
    encode_packet,
)
from meshd.membership.table import pack_digest

from .helpers import Harness, addr


def _round(h: Harness, name: str) -> int:
    """Run the cluster (probes answered) until `name` starts a push-pull round; leaves its
    Digest alone in the outbox and returns the index in `h.sent` it was sent at."""
    t = h.now
    while True:
        t += 0.5
        mark = len(h.sent)
        h.tick_all(t)
        held = [(o, s) for o, s in h.outbox if o == name and isinstance(s.msgs[0], Digest)]
        if held:
            h.outbox = [(o, s) for o, s in h.outbox if not isinstance(s.msgs[0], Digest)]
            h.deliver()
            h.outbox = held
            return mark + next(i for i, (o, s) in enumerate(h.sent[mark:]) if s is held[0][1])
        h.outbox = [(o, s) for o, s in h.outbox if not isinstance(s.msgs[0], Digest)]
        h.deliver()
        assert t < 10 * h.s.push_pull_interval, "no push-pull round"


def _exchange(h: Harness, mark: int) -> list:
    """Deliver the held Digest and what it causes; returns the anti-entropy messages that
    travelled from `mark` on, in order."""
    h.deliver()
    return [s.msgs[0] for _, s in h.sent[mark:]
            if isinstance(s.msgs[0], Digest | DigestReply | PushPull)]


def test_tables_that_agree_exchange_a_digest_and_an_empty_answer_only():
    h = Harness()
    h.add(*[f"n{i}" for i in range(40)])
    travelled = _exchange(h, _round(h, "n0"))
    assert len(travelled[0].buckets) == 4 * DIGEST_BUCKETS
    assert [type(m) for m in travelled] == [Digest, DigestReply]
    reply = travelled[1]
    assert reply.want == b"" and reply.states == []
    assert h.cores["n0"].push_pulls["same"] == 1


def test_a_member_one_side_lacks_travels_alone_and_only_that_way():
    h = Harness()
    h.add(*[f"n{i}" for i in range(40)])
    # n0 knows a newcomer nobody else heard of
    h.cores["n0"].receive(addr("x"), [Alive(0, "x", addr("x"), {})], h.now)
    h.cores["n0"]._broadcasts.drop("x")  # gossip would carry it first
    travelled = _exchange(h, _round(h, "n0"))
    assert [type(m) for m in travelled] == [Digest, DigestReply, PushPull]
    peer = next(n for n, c in h.cores.items() if n != "n0" and "x" in c.members)
    reply, back = travelled[1], travelled[2]
    assert reply.want and len(reply.states) < 40  # one bucket's members, not the table
    assert back.reply and [st.node for st in back.states] == ["x"]
    assert h.cores[peer].members["x"].state == ALIVE
    # the full table never travelled
    assert all(len(getattr(m, "states", [])) < 40 for m in travelled)


def test_the_answer_brings_news_the_asker_lacks():
    h = Harness()
    h.add(*[f"n{i}" for i in range(10)])
    # n5 changed its tags; everyone heard but n0 (the gossip never reached it)
    h.cores["n5"].update_tags({"k": "v"}, h.now)
    news = Alive(1, "n5", addr("n5"), {"k": "v"})
    for name, core in h.cores.items():
        if name not in ("n0", "n5"):
            core.receive(addr("n5"), [news], h.now)
        core._broadcasts.drop("n5")  # gossip would carry it first
    mark = _round(h, "n0")
    assert h.cores["n0"].members["n5"].incarnation == 0
    travelled = _exchange(h, mark)
    assert [type(m) for m in travelled] == [Digest, DigestReply]  # n0 knows nothing better
    n5 = h.cores["n0"].members["n5"]
    assert n5.incarnation == 1 and n5.tags == {"k": "v"}


def test_a_node_learns_it_is_thought_dead_and_refutes():
    h = Harness()
    h.add("a", "b")
    h.cores["b"].receive(addr("c"), [Suspect(0, "a", "c")], h.now)
    _exchange(h, _round(h, "a"))
    a = h.cores["a"]
    assert a.me.incarnation == 1 and a.refutations == 1
    assert h.cores["b"].members["a"].state == ALIVE  # the refutation went back with it
    assert h.cores["b"].members["a"].incarnation == 1


def test_members_that_do_not_speak_version_3_get_the_full_table():
    h = Harness()
    h.add("a", "b", "c")
    h.cores["a"].takes_digests = lambda name: False
    h.outbox.clear()
    t = h.now
    while not any(o == "a" and isinstance(s.msgs[0], PushPull) for o, s in h.sent):
        t += 1.0
        h.tick("a", t)
    sent = [s.msgs[0] for o, s in h.sent if o == "a" and s.reliable]
    assert not any(isinstance(m, Digest) for m in sent)
    full = next(m for m in sent if isinstance(m, PushPull))
    assert {st.node for st in full.states} == {"a", "b", "c"}
    assert h.cores["a"].push_pulls["full"] == 1


def test_digest_messages_round_trip_in_a_version_3_packet():
    d = Digest("a", pack_digest([i * 7919 for i in range(DIGEST_BUCKETS)]))
    r = DigestReply("b", bytes(DIGEST_BUCKETS // 8),
                    [MemberState("c", addr("c"), 2, DEAD, {"t": "1"})])
    for msg in (d, r):
        packet = encode_packet([msg])
        assert cbor2.loads(packet)[0] == 3
        assert decode_packet(packet) == [msg]
    # a packet without them stays version 2, which older nodes read
    assert cbor2.loads(encode_packet([PushPull("a", False, False, [])]))[0] == VERSION == 2


@pytest.mark.parametrize("item", [
    [9, "a", b"\x00" * 10],  # short digest
    [9, "a", b"\x00" * (4 * DIGEST_BUCKETS + 4)],  # long digest
    [9, "", b"\x00" * (4 * DIGEST_BUCKETS)],  # no name
    [10, "a", b"\x01" * 5, []],  # a bitmap of the wrong size
    [10, "a", b"", [["c", "c:1", 0, 9, {}, b"", b""]]],  # a state that is no state
    [10, "a", b"", "nope"],
])
def test_bad_digest_messages_are_refused(item):
    with pytest.raises(DecodeError):
        decode_packet(cbor2.dumps([3, [item]]))


def test_a_version_2_packet_may_not_carry_digests():
    with pytest.raises(DecodeError, match="protocol 3"):
        decode_packet(cbor2.dumps([2, [[9, "a", b"\x00" * (4 * DIGEST_BUCKETS)]]]))

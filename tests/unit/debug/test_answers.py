"""Other nodes' debug answers are checked and stamped as theirs; a service's log quota; relay
tags carry only sampled calls' trace context."""

from __future__ import annotations

import pytest
import trio

from meshd.debug import answers
from meshd.debug.service import DebugService, _bounded
from meshd.debug.traces import RELAYED
from meshd.settings import DebugSettings
from meshd.transport.links import ChannelStream

REC = {"time": 5.0, "level": "info", "node": "b", "service": "s", "instance": "i",
       "trace_id": "", "message": "m", "fields": {"logger": "x"}}
SPAN = {"trace_id": "a" * 32, "span_id": "b" * 16, "parent_id": "", "name": "n",
        "kind": "client", "node": "b", "service": "s", "start": 1.0, "duration": 0.1,
        "status": 0, "error": "", "attrs": {}}


def test_a_members_records_are_its_own_and_bad_ones_dropped_alone():
    got = answers.records([{**REC, "node": "someone-else"}, {**REC, "time": "x"},
                           {**REC, "level": ["info"]}, "junk", REC], "b", 100)
    assert [r["node"] for r in got] == ["b", "b"]
    with pytest.raises(answers.Malformed):
        answers.records({"not": "a list"}, "b", 100)
    assert len(answers.records([REC] * 50, "b", 10)) == 10


def test_a_members_spans_and_summaries_are_its_own():
    (span,) = answers.spans([{**SPAN, "node": "a"}, {**SPAN, "kind": "evil"}], "b", 10)
    assert span["node"] == "b"
    row = {"trace_id": "a" * 32, "name": "n", "service": "s", "start": 1.0,
           "duration": 0.5, "status": 0, "spans": 3, "nodes": ["a", "c"], "services": ["s"]}
    (got,) = answers.summaries([row, {**row, "trace_id": "zz"}, {**row, "status": "500"}],
                               "b", 10)
    assert got["nodes"] == ["b"]
    with pytest.raises(answers.Malformed):
        answers.summaries("rows", "b", 10)


def test_a_members_stats_keep_only_printable_numbers():
    got = answers.stats({"sample": {"uptime": "long", "rss_bytes": 5, "members": {"alive": 2,
                                                                               "x": "y"}},
                         "instances": [{"instance": "i", "service": "s", "requests": 1,
                                        "errors": 0, "in_flight": 0,
                                        "endpoints": {"E": {"count": 1, "errors": 0,
                                                            "sum": 0.1, "mean_ms": 1,
                                                            "p50_ms": 1, "p99_ms": 1},
                                                      "Bad": {"count": "1"}}},
                                       {"instance": 5}]}, "b")
    assert got["node"] == "b" and got["sample"] == {"rss_bytes": 5, "members": {"alive": 2}}
    (inst,) = got["instances"]
    assert list(inst["endpoints"]) == ["E"]
    with pytest.raises(answers.Malformed):
        answers.stats({"sample": []}, "b")


def test_replies_are_cut_to_fit():
    data = _bounded({"ok": True, "result": ["x" * 1000] * 10_000}, "result")
    from meshd.debug.service import MAX_REPLY
    assert len(data) <= MAX_REPLY


class _Links:
    def __init__(self) -> None:
        self.handlers: dict = {}


def test_a_chatty_instance_is_held_to_its_quota():
    from meshd.debug import service as svc

    debug = DebugService("a", None, _Links(), DebugSettings(), dict, dict)  # type: ignore[arg-type]
    kept = sum(debug.take_logs("s", "i1", [{"message": f"m{n}", "level": "info"}] * 256,
                               now=100.0)  # one instant: no refill, whatever the host's speed
               for n in range(20))
    assert kept == svc.LOG_BURST and debug.stats["debug_log_records_dropped"] == 20 * 256 - kept
    assert debug.take_logs("s", "i2", [{"message": "other", "level": "info"}], now=100.0) == 1
    # a second later the instance has LOG_RATE more (taken in frames of MAX_BATCH)
    later = [{"message": "later", "level": "info"}] * 256
    assert sum(debug.take_logs("s", "i1", later, now=101.0) for _ in range(3)) \
        == svc.LOG_RATE
    debug.own_logs.add({**REC, "node": "a", "service": "meshd"})
    assert len(debug.own_logs) == 1  # the node's own lines are in a buffer of their own


class _Channel:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


async def test_relay_tags_carry_only_sampled_calls():
    ch = _Channel()
    stream = ChannelStream(ch, tagged=True)  # type: ignore[arg-type]
    sampled, unsampled = f"00-{'a' * 32}-{'b' * 16}-01", f"00-{'a' * 32}-{'b' * 16}-00"
    await stream.send_all(b"x")
    token = RELAYED.set(unsampled)
    await stream.send_all(b"y")
    RELAYED.reset(token)
    token = RELAYED.set(sampled)
    await stream.send_all(b"z")
    RELAYED.reset(token)
    assert ch.sent == [b"\x00x", b"\x00y", b"\x01" + sampled.encode() + b"z"]
    plain = ChannelStream(ch, tagged=False)  # type: ignore[arg-type]
    token = RELAYED.set(sampled)
    await plain.send_all(b"w")
    RELAYED.reset(token)
    assert ch.sent[-1] == b"w"
    await trio.sleep(0)

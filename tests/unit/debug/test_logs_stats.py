"""Log buffer and handler, service records, call stats and node samples, trace summaries."""

from __future__ import annotations

import logging

import pytest
import trio

from meshd.debug import logs, stats
from meshd.debug.service import merge_summaries, summarize
from meshd.debug.stats import BUCKETS, MAX_SERIES, OTHER, CallStats, NodeSampler, Series
from meshd.debug.traces import Span
from meshd_sdk.logship import Shipper


def test_handler_keeps_only_its_nodes_records():
    buf_a, buf_b = logs.LogBuffer(10), logs.LogBuffer(10)
    log = logging.getLogger("meshd.test-debug")
    log.setLevel(logging.DEBUG)
    ha, hb = logs.BufferHandler(buf_a, "a", logging.INFO), logs.BufferHandler(buf_b, "b",
                                                                              logging.INFO)
    log.addHandler(ha)
    log.addHandler(hb)
    try:
        token = logs.NODE.set("a")
        trace = logs.TRACE.set("t1")
        log.info("hello %s", "world")
        log.debug("too low")
        logs.TRACE.reset(trace)
        logs.NODE.reset(token)
        log.warning("nobody's")  # outside any node's tasks
    finally:
        log.removeHandler(ha)
        log.removeHandler(hb)
    (rec,) = buf_a.records()
    assert rec["message"] == "hello world" and rec["node"] == "a" and rec["level"] == "info"
    assert rec["trace_id"] == "t1" and rec["fields"] == {"logger": "meshd.test-debug"}
    assert len(buf_b) == 0


def test_buffer_is_bounded_and_wakes_followers():
    buf = logs.LogBuffer(3)
    woken = []
    buf.on_next(lambda: woken.append(1))
    for i in range(5):
        buf.add({"time": float(i), "level": "info", "node": "a", "service": "s",
                 "instance": "", "trace_id": "", "message": str(i),
                 "fields": {"logger": "x"} if i % 2 else {"k": "v", "j": "w"}})
    got = buf.records()
    assert [r["message"] for r in got] == ["2", "3", "4"] and woken == [1]
    assert got[1] == {"time": 3.0, "level": "info", "node": "a", "service": "s",
                      "instance": "", "trace_id": "", "message": "3",
                      "fields": {"logger": "x"}}
    assert got[2]["fields"] == {"k": "v", "j": "w"}
    assert [r["message"] for _, r in buf.since(3)] == ["3", "4"]


def test_service_records_are_checked_and_stamped_by_the_daemon():
    rec = logs.service_record({"message": "m" * 10_000, "level": "error", "time": 5,
                               "fields": {"k": 1}, "node": "forged", "service": "forged"},
                              "a", "svc", "svc-1")
    assert rec["node"] == "a" and rec["service"] == "svc" and rec["instance"] == "svc-1"
    assert len(rec["message"]) == logs.MAX_MESSAGE and rec["fields"] == {"k": "1"}
    for bad in ("x", {"level": "info"}, {"message": "m", "level": "loud"},
                {"message": "m", "time": "now"}, {"message": "m", "fields": [1]},
                {"message": "m", "fields": {str(i): i for i in range(40)}},
                {"message": "m", "trace_id": "t" * 100}):
        with pytest.raises(ValueError):
            logs.service_record(bad, "a", "svc", "svc-1")


def test_matches_filters():
    rec = {"service": "s", "level": "warning", "time": 10.0, "node": "a"}
    assert logs.matches(rec, "s", "info", 5, "a")
    assert not logs.matches(rec, "t")
    assert not logs.matches(rec, level="error")
    assert not logs.matches(rec, since=11)
    assert not logs.matches(rec, node="b")


def test_series_buckets_and_quantiles():
    s = Series()
    for v in (0.0001, 0.003, 0.003, 0.2, 99.0):
        s.observe(v)
    assert s.count == 5 and s.buckets[0] == 1 and s.buckets[BUCKETS.index(0.005)] == 2
    assert s.buckets[-1] == 1  # above the last bound: +Inf
    assert s.cumulative()[-1] == 5
    assert s.quantile(0.5) == 0.005 and s.quantile(0.0) == 0.0005


def test_call_stats_bound_their_series_and_track_instances():
    cs = CallStats()
    for i in range(MAX_SERIES + 10):
        cs.observe("client", "svc", f"ep{i}", 404, 0.001)
    assert len(cs.series) == MAX_SERIES + 1
    assert cs.series[("client", OTHER, OTHER, 404)].count == 10
    st = cs.begin("i1", "svc")
    assert st.in_flight == 1
    CallStats.end(st, "Echo", 0, 0.002)
    st.in_flight += 1
    CallStats.end(st, "Echo", 500, 0.002)
    (row,) = cs.instance_rows("svc")
    assert row["requests"] == 2 and row["errors"] == 1 and row["in_flight"] == 0
    assert row["endpoints"]["Echo"]["count"] == 2 and row["endpoints"]["Echo"]["errors"] == 1
    assert cs.instance_rows("other") == []
    cs.forget("i1")
    assert cs.instance_rows() == []


async def test_node_sampler_keeps_samples_but_not_a_querys():
    sampler = NodeSampler(2, lambda: {"links": 3})
    one = sampler.sample()
    assert one["links"] == 3 and one["rss_bytes"] > 0 and one["tasks"] >= 1
    sampler.sample(keep=False)
    assert len(sampler.samples) == 1
    for _ in range(3):
        sampler.sample()
    assert len(sampler.samples) == 2
    assert stats.count_tasks() >= 1


def _span(sid: str, parent: str, node: str, start: float, dur: float, status: int = 0):
    return Span("a" * 32, sid, parent, f"s{sid[-1]}", "client", node, "svc", start, dur,
                status)


def test_trace_summaries_merge_across_nodes():
    on_c = [_span("1" * 16, "", "c", 10.0, 1.0)]
    on_a = [_span("2" * 16, "1" * 16, "a", 10.2, 0.5),
            _span("3" * 16, "2" * 16, "a", 10.3, 0.2, status=500)]
    part_c, part_a = summarize(on_c), summarize(on_a)
    assert part_a["name"] == "s2"  # its root here: the parent lives on another node
    whole = merge_summaries([part_a, part_c])
    assert whole["name"] == "s1" and whole["start"] == 10.0 and whole["duration"] == 1.0
    assert whole["status"] == 500 and whole["spans"] == 3 and whole["nodes"] == ["a", "c"]


async def test_shipper_ships_only_its_services_records_in_batches():
    sent: list = []

    async def send(frame):
        sent.append(frame)

    mine = Shipper(lambda: "t9")
    other = Shipper(lambda: "")
    root = logging.getLogger()
    level = root.level

    async def service_task(shipper, text):
        remove = shipper.install()
        try:
            logging.getLogger("app").warning("%s", text)
        finally:
            remove()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service_task, mine, "from mine")
        nursery.start_soon(service_task, other, "from other")
    logging.getLogger("app").warning("outside")
    root.setLevel(level)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine.run, send)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert [r["message"] for f in sent for r in f["log"]] == ["from mine"]
    assert sent[0]["log"][0]["trace_id"] == "t9"
    assert [r["message"] for r in other.queue] == ["from other"]


def test_long_lines_are_bounded_by_bytes_not_only_by_count():
    buf = logs.LogBuffer(1000, max_bytes=20_000)
    for i in range(100):
        buf.add({"time": float(i), "level": "info", "node": "a", "service": "s",
                 "instance": "", "trace_id": "", "message": "x" * 1000, "fields": {}})
    assert len(buf) < 20 and buf.bytes <= 20_000
    assert buf.records()[-1]["time"] == 99.0  # the newest kept, the oldest gone


def test_local_calls_count_once_and_read_as_both_sides():
    cs = CallStats()
    cs.observe(stats.LOCAL, "svc", "Ep", 0, 0.001)
    cs.observe("client", "svc", "Ep", 0, 0.002)
    cs.observe("server", "svc", "Ep", 500, 0.003)
    client, server = cs.by_side("client"), cs.by_side("server")
    assert client[("svc", "Ep", 0)].count == 2 and client[("svc", "Ep", 0)].total == 0.003
    assert server[("svc", "Ep", 0)].count == 1 and server[("svc", "Ep", 500)].errors == 1
    assert ("svc", "Ep", 500) not in client
    assert cs.series[(stats.LOCAL, "svc", "Ep", 0)].count == 1  # the merge copied, not added

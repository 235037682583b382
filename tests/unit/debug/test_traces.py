"""Trace context, sampling, the span buffer and the tracer's keep-or-drop rule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.debug import traces
from meshd.debug.traces import Context, Sampler, Span, SpanBuffer, Tracer, parse

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


def test_parse_takes_w3c_version_00_and_nothing_else():
    ctx = parse(f"00-{TID}-{SID}-01")
    assert ctx == Context(TID, SID, True)
    assert ctx.header() == f"00-{TID}-{SID}-01"
    assert parse(f"00-{TID}-{SID}-00").sampled is False
    for bad in (None, 5, "", f"01-{TID}-{SID}-01", f"00-{TID.upper()}-{SID}-01",
                f"00-{'0' * 32}-{SID}-01", f"00-{TID}-{'0' * 16}-01", f"00-{TID}-{SID}-1",
                f"00-{TID}-{SID}-0x", f"00_{TID}-{SID}-01", f"00-{TID}-{SID}-01 "):
        assert parse(bad) is None, bad


@given(st.text(max_size=80))
def test_parse_never_raises(text):
    parse(text)


def test_sampler_rate_and_children_keep_the_decision():
    assert all(Sampler(1.0).start().sampled for _ in range(50))
    assert not any(Sampler(0.0).start().sampled for _ in range(50))
    assert Sampler(0.0).start(force=True).sampled
    quarter = Sampler(0.25, random.Random(7))
    kept = sum(quarter.start().sampled for _ in range(4000))
    assert 800 < kept < 1200
    parent = Context(TID, SID, False)
    child = Sampler(1.0).child(parent)  # the root decided: not sampled stays not sampled
    assert child.trace_id == TID and child.span_id != SID and not child.sampled
    assert Sampler(0.0).child(parent, force=True).sampled


def span(tid: str = TID, sid: str = SID, **kw) -> Span:
    base = dict(parent_id="", name="call x/y", kind="client", node="a", service="x",
                start=1.0, duration=0.5)
    return Span(tid, sid, **{**base, **kw})


def test_span_buffer_bounds_indexes_and_hands_out_what_is_new():
    buf = SpanBuffer(3)
    ids = [f"{i:032x}" for i in range(1, 6)]
    for i, tid in enumerate(ids):
        buf.add(span(tid, f"{i + 1:016x}"))
    assert len(buf) == 3 and buf.dropped == 2 and buf.seq == 5
    assert buf.trace(ids[0]) == [] and len(buf.trace(ids[4])) == 1
    assert [s.trace_id for _, s in buf.since(3)] == ids[3:]
    assert [s.trace_id for _, s in buf.since(0)] == ids[2:]  # what fell out is gone
    assert list(buf.since(5)) == []
    buf.add(span(ids[4], "00000000000000aa"))  # two spans of one trace, one evicted later
    assert len(buf.trace(ids[4])) == 2


def test_tracer_keeps_sampled_spans_and_every_failed_one():
    buf = SpanBuffer(10)
    tracer = Tracer("a", Sampler(0.0), buf)
    meta: dict = {}
    ctx, parent = tracer.begin(meta)
    assert parent == "" and parse(meta["traceparent"]) == ctx and not ctx.sampled
    tracer.end(ctx, parent, "call", "client", "x", 1.0, 0.1)
    assert len(buf) == 0
    tracer.end(ctx, parent, "call", "client", "x", 1.0, 0.1, status=503, error="gone")
    (kept,) = buf.spans()
    assert kept.status == 503 and kept.error == "gone" and kept.span_id == ctx.span_id
    # a child of the caller's span: same trace, parent named
    meta = {"traceparent": f"00-{TID}-{SID}-01"}
    ctx, parent = tracer.begin(meta)
    assert ctx.trace_id == TID and parent == SID and ctx.sampled
    tracer.child_span(ctx, "handler", "handler", "x", 1.0, 0.01, span_id="1234567890abcdef")
    assert buf.spans()[-1].span_id == "1234567890abcdef"
    assert buf.spans()[-1].parent_id == ctx.span_id
    tracer.child_span(ctx, "handler", "handler", "x", 1.0, 0.01, span_id="not hex!")
    assert traces._hex(buf.spans()[-1].span_id, 16)


def test_span_from_dict_is_strict():
    good = span().to_dict()
    assert Span.from_dict(good) == span()
    for bad in ({**good, "trace_id": "x"}, {**good, "kind": "evil"},
                {**good, "duration": -1}, {**good, "status": "500"},
                {**good, "attrs": {"k": 5}}, {**good, "name": "n" * 300},
                {**good, "parent_id": "zz"}, "span"):
        with pytest.raises(ValueError):
            Span.from_dict(bad)


def test_tracing_off_passes_no_context_and_keeps_nothing():
    buf = SpanBuffer(10)
    tracer = Tracer("a", Sampler(1.0), buf, enabled=False)
    meta = {"traceparent": f"00-{TID}-{SID}-01"}
    ctx, parent = tracer.begin(meta)
    assert ctx is traces.OFF and parent == "" and meta == {"traceparent": f"00-{TID}-{SID}-01"}
    tracer.end(ctx, parent, "call", "client", "x", 1.0, 0.1, status=500)
    tracer.child_span(ctx, "handler", "handler", "x", 1.0, 0.1, status=500)
    assert len(buf) == 0


def test_a_local_call_is_one_record_read_as_client_and_handler_spans():
    buf = SpanBuffer(10)
    tracer = Tracer("a", Sampler(1.0), buf)
    ctx, parent = tracer.begin({"traceparent": f"00-{TID}-{SID}-01"})
    tracer.local_call(ctx, parent, "svc", "Svc.Do", "svc-1", 100.0, 0.010, 0.004,
                      "1234567890abcdef")
    tracer.local_call(ctx, parent, "svc", "Svc.Do", "svc-1", 101.0, 0.010, 0.004, "bogus!")
    assert len(buf) == 2 and buf.seq == 2
    client, handler, _, handler2 = buf.spans()
    assert (client.kind, client.name, client.parent_id) == ("client", "call svc/Svc.Do", SID)
    assert (handler.kind, handler.name, handler.span_id, handler.parent_id) == \
        ("handler", "handler Svc.Do", "1234567890abcdef", client.span_id)
    assert handler.start == pytest.approx(100.006) and handler.attrs == {"instance": "svc-1"}
    assert traces._hex(handler2.span_id, 16)  # a bad id from the service: a stable stand-in
    assert handler2.span_id == buf.spans()[3].span_id
    assert len(buf.trace(TID)) == 4
    assert [seq for seq, _ in buf.since(1)] == [2, 2]

"""Trace context (W3C `traceparent`) and the node's bounded buffer of spans.

Theory of operation
-------------------
A trace starts where a call, stream or message starts: the SDK's `traceparent` when it sends
one, else the caller's daemon makes one and decides there, once, whether the trace is
sampled (`Sampler`, the settings' `debug.trace_sample`). The decision travels in the
traceparent's flags, so every node of one call keeps all of it or none of it, except that
a span ending in an error is always kept (its trace shows at least where it failed).

Each hop that does work for a call records one span: the caller's daemon ("client"), each
relay that carries it ("relay"), the callee's daemon ("server") and the handler
("handler", timed by the SDK and reported with the reply). A span's parent is the span of
the hop that sent the call to it, so the spans of all nodes make one tree.

Rules:
- Ids are random: trace 16 bytes, span 8 bytes, lower-case hex; all-zero ids are invalid
  (W3C). `parse` accepts only version 00's exact shape and returns None for anything else:
  an invalid traceparent starts a new trace, it is never an error.
- A remote span (`Span.from_dict`) is decoded strictly: wrong types or sizes are refused.
- `SpanBuffer` holds at most `size` spans (the oldest go first); `since(seq)` hands
  exporters what is new without copying the buffer.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

TRACEPARENT = "traceparent"
KINDS = ("client", "server", "relay", "handler", "producer", "consumer", "internal")
MAX_NAME = 200
MAX_ATTRS = 32
MAX_ATTR = 512
_HEX = frozenset("0123456789abcdef")
_NO_ATTRS: dict[str, str] = {}  # shared by spans without attributes: never written to


class Context:
    """Where a span sits: its trace, its own id, and whether the trace is sampled (made on
    every call's path: a plain class is the cheapest to build)."""

    __slots__ = ("sampled", "span_id", "trace_id")

    def __init__(self, trace_id: str, span_id: str, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and (self.trace_id, self.span_id, self.sampled) \
            == (other.trace_id, other.span_id, other.sampled)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Context({self.header()})"

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def _hex(s: str, n: int) -> bool:
    return len(s) == n and _HEX.issuperset(s) and s != "0" * n


def parse(value: Any) -> Context | None:
    """The context in a traceparent header, or None if it is not a valid one."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:]
    if version != "00" or value[2] != "-" or value[35] != "-" or value[52] != "-" or \
            not _hex(trace_id, 32) or not _hex(span_id, 16) or not _HEX.issuperset(flags):
        return None
    return Context(trace_id, span_id, bool(int(flags, 16) & 1))


class Sampler:
    """Decides, where a trace starts, whether it is kept; makes the ids (from a generator
    seeded by the OS: ids need to be unique, not secret, and a syscall per id is most of
    what a span costs)."""

    def __init__(self, rate: float, rng: random.Random | None = None) -> None:
        self.rate = rate
        self.rng = rng or random.Random(os.urandom(16))

    def span_id(self) -> str:
        return self.rng.randbytes(8).hex()

    def start(self, force: bool = False) -> Context:
        """A new trace's root context. (An all-zero id, which W3C forbids, comes once in
        2^64 traces: it is then not parsed by the next hop, which starts a new trace.)"""
        rng = self.rng
        sampled = force or self.rate >= 1.0 or (self.rate > 0 and rng.random() < self.rate)
        ids = rng.randbytes(24).hex()
        return Context(ids[:32], ids[32:], sampled)

    def child(self, parent: Context | None, force: bool = False) -> Context:
        """A new span's context under `parent` (a new trace without one)."""
        if parent is None:
            return self.start(force)
        return Context(parent.trace_id, self.span_id(), parent.sampled or force)


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a trace's root
    name: str  # "rpc greeter/Greeter.Hello", "relay", "publish orders.created"...
    kind: str  # one of KINDS
    node: str
    service: str
    start: float  # unix seconds
    duration: float  # seconds
    status: int = 0  # 0 ok, else the error's HTTP-like status
    error: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "span_id": self.span_id,
                "parent_id": self.parent_id, "name": self.name, "kind": self.kind,
                "node": self.node, "service": self.service, "start": self.start,
                "duration": self.duration, "status": self.status, "error": self.error,
                "attrs": dict(self.attrs)}

    @classmethod
    def from_dict(cls, d: Any) -> Span:
        """A span another node sent: ValueError unless every field is what it should be."""
        if not isinstance(d, dict):
            raise ValueError("a span is a map")
        tid, sid, pid = d.get("trace_id"), d.get("span_id"), d.get("parent_id", "")
        if not (isinstance(tid, str) and _hex(tid, 32) and isinstance(sid, str)
                and _hex(sid, 16) and isinstance(pid, str) and (pid == "" or _hex(pid, 16))):
            raise ValueError("bad span ids")
        texts = [d.get(k) for k in ("name", "kind", "node", "service", "error")]
        if not all(isinstance(t, str) and len(t) <= MAX_NAME for t in texts[:4]) or \
                not isinstance(texts[4], str) or len(texts[4]) > MAX_ATTR:
            raise ValueError("bad span text")
        if texts[1] not in KINDS:
            raise ValueError("bad span kind")
        start, duration, status = d.get("start"), d.get("duration"), d.get("status", 0)
        if not (isinstance(start, int | float) and isinstance(duration, int | float)
                and duration >= 0 and type(status) is int):
            raise ValueError("bad span times")
        attrs = d.get("attrs", {})
        if not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_NAME
                and len(v) <= MAX_ATTR for k, v in attrs.items()):
            raise ValueError("bad span attributes")
        return cls(tid, sid, pid, texts[0], texts[1], texts[2], texts[3], float(start),
                   float(duration), status, texts[4], dict(attrs))


class SpanBuffer:
    """The spans this node kept, oldest first, at most `size`. They are held as tuples in
    Span's field order (a tuple is built several times faster than a Span, on every call's
    path) and become Spans when read; nothing is indexed (a trace is found by a scan when
    someone asks, which is rare). The i-th held span has sequence number
    seq - len + 1 + i (numbered as added, none skipped)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._spans: deque[tuple[Any, ...]] = deque()
        self.seq = 0  # spans ever added (exporters remember where they were)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, span: Span) -> None:
        self.add_raw((span.trace_id, span.span_id, span.parent_id, span.name, span.kind,
                      span.node, span.service, span.start, span.duration, span.status,
                      span.error, span.attrs))

    def add_raw(self, fields: tuple[Any, ...]) -> None:
        """A span as the tuple of Span's fields, in order (or a LOCAL_CALL record: the
        client and handler spans of a call this node made and served, made when read)."""
        if len(self._spans) >= self.size:
            self._spans.popleft()
            self.dropped += 1
        self.seq += 1
        self._spans.append(fields)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for t in self._spans if t[1 if t[0] is LOCAL_CALL else 0] == trace_id
                for s in _expand(t)]

    def since(self, seq: int) -> Iterator[tuple[int, Span]]:
        """Spans added after sequence number `seq` (those still held), in order (the two
        spans of a local call share its number)."""
        first = self.seq - len(self._spans) + 1
        skip = max(0, seq + 1 - first)
        if skip >= len(self._spans):
            return iter(())
        return ((first + i, s) for i, t in enumerate(self._spans) if i >= skip
                for s in _expand(t))

    def spans(self) -> list[Span]:
        return [s for t in self._spans for s in _expand(t)]


LOCAL_CALL = object()  # marks a record of both spans of a local call in a SpanBuffer


def _expand(t: tuple[Any, ...]) -> list[Span]:
    if t[0] is not LOCAL_CALL:
        return [Span(*t)]
    (_, trace_id, span_id, parent_id, node, service, endpoint, instance, start, took,
     handler, handler_id, status, error) = t
    if not _hex(handler_id, 16):  # the service's word, checked when read: a stable stand-in
        handler_id = f"{hash((span_id, 'handler')) & 0xFFFFFFFFFFFFFFFF or 1:016x}"
    return [Span(trace_id, span_id, parent_id, f"call {service}/{endpoint}"[:MAX_NAME],
                 "client", node, service, start, took, status, error),
            Span(trace_id, handler_id, span_id, f"handler {endpoint}"[:MAX_NAME], "handler",
                 node, service, start + took - handler, handler, status, error,
                 {"instance": instance})]


def now() -> float:
    """Wall-clock time for span starts (shells only: cores are given their time)."""
    return time.time()


# The context of every call when tracing is off (debug.tracing false): nothing is kept.
OFF = Context("", "", False)

# The traceparent of the call whose frames the current task sends: a relayed link tags the
# frames it carries with it (transport/links.py), so each relay can record its span.
RELAYED: contextvars.ContextVar[str] = contextvars.ContextVar("meshd_relayed_trace",
                                                              default="")


class Tracer:
    """Starts and ends this node's spans: `begin` gives a span's context (a child of the
    traceparent in `meta`, or a new trace) and puts it in `meta` for the next hop; `end`
    keeps the span if its trace is sampled or it failed."""

    def __init__(self, node: str, sampler: Sampler, spans: SpanBuffer,
                 enabled: bool = True) -> None:
        self.node = node
        self.sampler = sampler
        self.spans = spans
        self.enabled = enabled  # false (debug.tracing): begin gives OFF, nothing is kept

    def begin(self, meta: dict[str, Any], force: bool = False
              ) -> tuple[Context, str]:
        """(this span's context, its parent span id); `meta["traceparent"]` becomes this
        span's, so the next hop's span is its child."""
        if not self.enabled:
            return OFF, ""
        given = meta.get(TRACEPARENT)
        parent = parse(given) if given is not None else None
        ctx = self.sampler.child(parent, force)
        meta[TRACEPARENT] = ctx.header()
        return ctx, parent.span_id if parent is not None else ""

    def end(self, ctx: Context, parent_id: str, name: str, kind: str, service: str,
            start: float, duration: float, status: int = 0, error: str = "",
            attrs: dict[str, str] | None = None) -> None:
        if (ctx.sampled or status) and ctx is not OFF:
            self.spans.add_raw((ctx.trace_id, ctx.span_id, parent_id, name[:MAX_NAME], kind,
                                self.node, service[:MAX_NAME], start, max(0.0, duration),
                                status, error[:MAX_ATTR], attrs or _NO_ATTRS))

    def child_span(self, ctx: Context, name: str, kind: str, service: str, start: float,
                   duration: float, status: int = 0, error: str = "",
                   attrs: dict[str, str] | None = None, span_id: str = "") -> None:
        """A span under `ctx` timed elsewhere (a handler's, reported with its reply, with
        the id its process gave it when `span_id` is a valid one)."""
        if (ctx.sampled or status) and ctx is not OFF:
            if not _hex(span_id, 16):
                span_id = self.sampler.span_id()
            self.spans.add_raw((ctx.trace_id, span_id, ctx.span_id, name[:MAX_NAME], kind,
                                self.node, service[:MAX_NAME], start, max(0.0, duration),
                                status, error[:MAX_ATTR], attrs or _NO_ATTRS))

    @contextlib.contextmanager
    def span(self, meta: dict[str, Any], name: str, kind: str, service: str,
             attrs: dict[str, str] | None = None) -> Generator[Context, None, None]:
        """A span around a block (a stream, while it is open): begun as `begin` does, ended
        when the block ends, failed with the status of a MeshError (any other exception:
        500) leaving it. Frames the block's task sends over relays carry it."""
        ctx, parent = self.begin(meta)
        relayed = RELAYED.set(meta.get(TRACEPARENT, ""))
        wall, t0 = time.time(), time.perf_counter()
        status, error = 0, ""
        try:
            yield ctx
        except Exception as exc:
            status = getattr(exc, "status", 500) if type(getattr(exc, "status", None)) is int \
                else 500
            error = str(getattr(exc, "detail", exc))
            raise
        finally:
            RELAYED.reset(relayed)
            self.end(ctx, parent, name, kind, service, wall, time.perf_counter() - t0, status,
                     error, attrs)

    def local_call(self, ctx: Context, parent_id: str, service: str, endpoint: str,
                   instance: str, start: float, took: float, handler: float,
                   handler_id: str, status: int = 0, error: str = "") -> None:
        """The client and handler spans of a call this node made and served (the fast
        path), kept as one record: half the work on the call's path."""
        if (ctx.sampled or status) and ctx is not OFF:
            self.spans.add_raw((LOCAL_CALL, ctx.trace_id, ctx.span_id, parent_id, self.node,
                                service[:MAX_NAME], endpoint[:MAX_NAME], instance, start,
                                took, handler, handler_id, status, error[:MAX_ATTR]))

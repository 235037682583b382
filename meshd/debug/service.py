"""Debug shell: this node's logs, stats and spans, and the cluster-wide queries over them.

Theory of operation
-------------------
Nothing is shipped to a central server. Every node keeps its own bounded buffers (logs.py,
stats.py, traces.py); a query (`meshd logs`, `stats`, `trace`, `traces`) reaches the local
daemon, which answers for itself and asks every live member over link channel "debug", at
once, each with `debug.query_timeout`; the answers are merged (logs in time order, a
trace's spans from every node) and the nodes that did not answer are named, never waited
for past the timeout.

Rules:
- Link channel "debug": one request per channel, a bounded CBOR map {"op", "args"}. The
  asking node checked its caller (resource mesh:debug, in "default": debug data is the
  cluster's) and asks as itself: a caller's token never goes to other members. The
  answering node checks the asking member as a node (scope node).
- One member has at most MAX_QUERIES queries and MAX_FOLLOWS follows served at once (429
  beyond; all members together eight times that); an answer is at most MAX_REPLY bytes
  (the oldest items left out) and must be taken within SEND_TIMEOUT, else it is dropped.
  A follow sends batches as records arrive until either side closes or one is not taken
  in time.
- Answers are checked before they are merged (answers.py): everything a member says is
  stamped as that member's; a malformed answer is that node's error, never the query's.
- The daemon's own log lines and its services' are kept apart (half the buffer each), and
  a local instance ships at most LOG_RATE records a second (bursts of LOG_BURST): a chatty
  service cannot push out what the node logged.
- A failure answering one request ends that channel only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd import wire
from meshd.buckets import TokenBuckets
from meshd.errors import MeshError, bad_request
from meshd.membership.core import ALIVE, STATE_NAMES, Membership
from meshd.settings import DebugSettings
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from . import answers as checked
from . import logs as logmod
from .gcpauses import GcPauses
from .logs import LEVEL_NO, BufferHandler, LogBuffer
from .stats import CallStats, NodeSampler
from .traces import Sampler, Span, SpanBuffer, Tracer

log = logging.getLogger("meshd.debug")
CHANNEL = "debug"
MAX_RECORDS = 5000
MAX_SPANS = 2000
MAX_TRACES = 1000
OPS = ("logs", "stats", "trace", "traces", "follow")
RESOURCE = ("mesh", "debug", "")
FOLLOW_BATCH = 0.1  # seconds a follower gathers records before sending them
MAX_QUERIES = 2  # queries of one member answered at once (8 times that for all members)
MAX_FOLLOWS = 2  # log follows one member holds here (8 times that for all members)
MAX_REPLY = 4 << 20  # an answer's encoded bytes (the oldest items go first)
SEND_TIMEOUT = 10.0  # an answer (or a follow's batch) the asker does not take in time is dropped
LOG_RATE, LOG_BURST = 500.0, 2000.0  # a local instance's log records a second, and burst


def log_args(args: dict[str, Any]) -> dict[str, Any]:
    """The filters of a logs query, checked (400 naming the bad one)."""
    service, level, node = args.get("service"), args.get("level"), args.get("node")
    since, limit = args.get("since"), args.get("limit", 1000)
    if service is not None and not isinstance(service, str):
        raise bad_request("service must be a name", id="meshd.debug")
    if node is not None and not isinstance(node, str):
        raise bad_request("node must be a member's name", id="meshd.debug")
    if level is not None and (not isinstance(level, str) or level not in LEVEL_NO):
        raise bad_request(f"level must be one of {', '.join(LEVEL_NO)}", id="meshd.debug")
    if since is not None and not (isinstance(since, int | float) and math.isfinite(since)):
        raise bad_request("since must be a time (unix seconds)", id="meshd.debug")
    if type(limit) is not int or not 1 <= limit <= MAX_RECORDS:
        raise bad_request(f"limit must be between 1 and {MAX_RECORDS}", id="meshd.debug")
    return {"service": service, "level": level, "node": node, "since": since,
            "limit": limit}


def service_arg(args: dict[str, Any]) -> str | None:
    service = args.get("service")
    if service is not None and not isinstance(service, str):
        raise bad_request("service must be a name", id="meshd.debug")
    return service


def ordered(rows: list[dict[str, Any]], slowest: Any) -> list[dict[str, Any]]:
    """Trace summaries, the slowest first (`slowest`), else the newest first."""
    key = "duration" if slowest else "start"
    return sorted(rows, key=lambda r: r[key], reverse=True)


def trace_args(args: dict[str, Any]) -> dict[str, Any]:
    service, slowest = args.get("service"), args.get("slowest")
    errors, limit = args.get("errors", False), args.get("limit", 20)
    if service is not None and not isinstance(service, str):
        raise bad_request("service must be a name", id="meshd.debug")
    if slowest is not None and (type(slowest) is not int or not 1 <= slowest <= MAX_TRACES):
        raise bad_request(f"slowest must be between 1 and {MAX_TRACES}", id="meshd.debug")
    if type(errors) is not bool:
        raise bad_request("errors must be true or false", id="meshd.debug")
    if type(limit) is not int or not 1 <= limit <= MAX_TRACES:
        raise bad_request(f"limit must be between 1 and {MAX_TRACES}", id="meshd.debug")
    return {"service": service, "slowest": slowest, "errors": errors,
            "limit": slowest or limit}


def trace_id_arg(args: dict[str, Any]) -> str:
    tid = args.get("trace_id")
    if not isinstance(tid, str) or not tid or len(tid) > 64:
        raise bad_request("trace_id must be a trace id (32 hex digits)", id="meshd.debug")
    return tid.lower()


def summarize(spans: list[Span]) -> dict[str, Any]:
    """One trace's summary from the spans one node (or all nodes) hold."""
    start = min(s.start for s in spans)
    end = max(s.start + s.duration for s in spans)
    held = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id or s.parent_id not in held]
    root = min(roots or spans, key=lambda s: (s.parent_id != "", s.start))
    failed = [s for s in spans if s.status]
    return {"trace_id": spans[0].trace_id, "name": root.name, "service": root.service,
            "start": start, "duration": end - start,
            "status": max((s.status for s in failed), default=0),
            "spans": len(spans), "nodes": sorted({s.node for s in spans}),
            "services": sorted({s.service for s in spans if s.service})}


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    start = min(p["start"] for p in parts)
    end = max(p["start"] + p["duration"] for p in parts)
    first = min(parts, key=lambda p: p["start"])
    return {**first, "start": start, "duration": end - start,
            "status": max(p["status"] for p in parts),
            "spans": sum(p["spans"] for p in parts),
            "nodes": sorted({n for p in parts for n in p["nodes"]}),
            "services": sorted({s for p in parts for s in p["services"]})}


class DebugService:
    def __init__(self, node: str, core: Membership, links: LinkManager,
                 settings: DebugSettings, probe: Callable[[], dict[str, Any]],
                 node_stats: Callable[[], dict[str, int]]) -> None:
        self.node = node
        self.core = core
        self.links = links
        self.settings = settings
        # the daemon's own lines and its services' in two halves: a chatty service cannot
        # push out what the node logged
        half, half_bytes = max(1, settings.log_buffer // 2), max(1, settings.log_buffer_bytes // 2)
        self.logs = LogBuffer(half, half_bytes)  # the services'
        self.own_logs = LogBuffer(half, half_bytes)
        self._log_quota = TokenBuckets(LOG_BURST, LOG_RATE, cap=4096)  # per instance
        self.spans = SpanBuffer(settings.span_buffer)
        self.calls = CallStats()
        self.gc = GcPauses()  # the process's collector pauses, counted while run() runs
        self.tracer = Tracer(node, Sampler(settings.trace_sample), self.spans,
                             enabled=settings.tracing)
        self.sampler = NodeSampler(settings.stats_buffer, probe)
        self._node_stats = node_stats
        self.auth: Any = None  # AuthService, set by the node
        self.stats = {"debug_queries_served": 0, "debug_queries_refused": 0,
                      "debug_log_records_dropped": 0, "debug_answers_malformed": 0}
        self._serving: dict[str, int] = {}  # member -> its queries being answered now
        self._following: dict[str, int] = {}  # member -> its log follows held here
        self.exporters: list[Callable[..., Awaitable[None]]] = []  # started with run()
        links.handlers[CHANNEL] = self._serve_channel

    # --- what /metrics reads (debug/metrics.py's MetricsSource) --------------------------

    def node_stats(self) -> dict[str, int]:
        return self._node_stats()

    def members_by_state(self) -> dict[str, int]:
        counts = {name: 0 for name in ("alive", "suspect", "dead", "left")}
        for m in self.core.member_list():
            counts[STATE_NAMES[m.state]] = counts.get(STATE_NAMES[m.state], 0) + 1
        return counts

    def health_score(self) -> int:
        return self.core.health_score

    def latest_sample(self) -> dict[str, Any]:
        return dict(self.sampler.samples[-1]) if self.sampler.samples else {}

    def take_logs(self, service: str, instance: str, records: Any,
                  now: float | None = None) -> int:
        """A local service's log records (its session's frames): each checked, a bad one
        dropped alone; at most logs.MAX_BATCH per frame and LOG_RATE a second per instance
        (bursts of LOG_BURST), the rest dropped and counted. Returns how many were kept."""
        if not isinstance(records, list):
            return 0
        now = time.monotonic() if now is None else now
        kept = 0
        for raw in records[:logmod.MAX_BATCH]:
            try:
                record = logmod.service_record(raw, self.node, service, instance)
            except ValueError:
                continue
            if self._log_quota.take(instance, now):
                break
            self.logs.add(record)
            kept += 1
        self.stats["debug_log_records_dropped"] += len(records) - kept
        return kept

    # --- running -------------------------------------------------------------------------

    def bind(self) -> None:
        """Mark the calling task (and every task it starts from now on) as this node's, so
        their log records come to this node's buffer: the node calls it first thing."""
        logmod.NODE.set(self.node)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        logmod.NODE.set(self.node)
        handler = BufferHandler(self.own_logs, self.node,
                                LEVEL_NO[self.settings.log_level.lower()])
        root = logging.getLogger("meshd")
        root.addHandler(handler)
        try:
            with self.gc.watching():
                await self._run(task_status)
        finally:
            root.removeHandler(handler)

    async def _run(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sampler.run, self.settings.stats_interval)
            for exporter in self.exporters:
                await nursery.start(exporter)
            task_status.started()
            await trio.sleep_forever()

    # --- this node's answers -------------------------------------------------------------

    def local(self, op: str, args: dict[str, Any]) -> Any:
        if op == "logs":
            a = log_args(args)
            found = [r for buf in (self.own_logs, self.logs) for r in buf.records()
                     if logmod.matches(r, a["service"], a["level"], a["since"], a["node"])]
            found.sort(key=lambda r: r["time"])
            return found[-a["limit"]:]
        if op == "stats":
            return {"node": self.node, "sample": self.sampler.sample(keep=False),
                    "instances": self.calls.instance_rows(service_arg(args))}
        if op == "trace":
            return [s.to_dict() for s in self.spans.trace(trace_id_arg(args))][:MAX_SPANS]
        if op == "traces":
            a = trace_args(args)
            by_trace: dict[str, list[Span]] = {}
            for s in self.spans.spans():
                by_trace.setdefault(s.trace_id, []).append(s)
            rows = [summarize(spans) for spans in by_trace.values()]
            if a["service"]:
                rows = [r for r in rows if a["service"] in r["services"]]
            if a["errors"]:
                rows = [r for r in rows if r["status"]]
            return ordered(rows, a["slowest"])[:MAX_TRACES]
        raise bad_request(f"unknown debug query {op!r}", id="meshd.debug")

    # --- the cluster's answers -----------------------------------------------------------

    def _peers(self, only: str | None = None) -> list[tuple[str, str]]:
        return [(m.name, m.addr) for m in self.core.member_list()
                if m.state == ALIVE and m.name != self.node and (only is None or
                                                                 m.name == only)]

    async def gather(self, op: str, args: dict[str, Any], only: str | None = None
                     ) -> tuple[dict[str, Any], dict[str, str]]:
        """(answer by node, error by node) from this node and every live member (or just
        `only`), each within `debug.query_timeout`, each member's answer checked
        (answers.py). The caller was checked here: members are asked as this node, never
        with the caller's token (a member must not collect the tokens of those who read
        debug data)."""
        answers: dict[str, Any] = {}
        errors: dict[str, str] = {}
        if only is None or only == self.node:
            answers[self.node] = self.local(op, args)

        async def ask(name: str, addr: str) -> None:
            try:
                with trio.fail_after(self.settings.query_timeout):
                    answers[name] = _checked(op, await self._ask(addr, op, args), name)
            except checked.Malformed:
                self.stats["debug_answers_malformed"] += 1
                errors[name] = "malformed answer"
            except trio.TooSlowError:
                errors[name] = "no answer in time"
            except MeshError as exc:
                errors[name] = f"{exc.status} {exc.detail}"
            except (LinkError, ChannelClosed, wire.WireError, ValueError, KeyError,
                    TypeError) as exc:
                errors[name] = f"unreachable: {exc}"

        async with trio.open_nursery() as nursery:
            for name, addr in self._peers(only):
                nursery.start_soon(ask, name, addr)
        if only is not None and only not in answers and only not in errors:
            errors[only] = "not a live member"
        return answers, errors

    async def _ask(self, addr: str, op: str, args: dict[str, Any]) -> Any:
        request: dict[str, Any] = {"op": op, "args": args}
        async with await self.links.open_channel(addr, CHANNEL) as ch:
            await ch.send(wire.dumps(request))
            reply = wire.loads(await ch.receive(), max_depth=16)
        if not isinstance(reply, dict):
            raise checked.Malformed("not a map")
        if not reply.get("ok"):
            raise MeshError.from_dict(reply.get("error") or {})
        return reply.get("result")

    async def follow(self, args: dict[str, Any],
                     emit: Callable[[Any], Awaitable[None]]) -> None:
        """Every live member's new log records (and this node's), as they come, until the
        caller goes; with `since`, first those each node holds from that time on. A member's
        batches are checked as its answers are; one that sends
        nonsense stops being followed, the others go on."""
        a = log_args({**args, "limit": 1})
        send, receive = trio.open_memory_channel[list[dict[str, Any]]](64)

        async def remote(name: str, addr: str) -> None:
            request: dict[str, Any] = {"op": "follow", "args": args}
            try:
                async with await self.links.open_channel(addr, CHANNEL) as ch:
                    await ch.send(wire.dumps(request))
                    while True:
                        batch = wire.loads(await ch.receive(), max_depth=16)
                        if not isinstance(batch, dict) or not isinstance(
                                batch.get("records"), list):
                            return  # an error ({"ok": false}) or nonsense: done with it
                        got = checked.records(batch["records"], name, MAX_RECORDS)
                        if got:
                            await send.send(got)
            except (LinkError, ChannelClosed, wire.WireError) as exc:
                log.info("following logs at %s ended: %s", addr, exc)

        async def local() -> None:
            await self._follow_local(a, send.send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(local)
            if a["node"] is None or a["node"] != self.node:
                for name, addr in self._peers(a["node"]):
                    nursery.start_soon(remote, name, addr)
            async for batch in receive:
                for record in sorted(batch, key=lambda r: r["time"]):
                    await emit(record)

    async def _follow_local(self, a: dict[str, Any],
                            out: Callable[[list[dict[str, Any]]], Awaitable[None]]) -> None:
        bufs = (self.own_logs, self.logs)
        seqs = [buf.seq for buf in bufs]
        if a["since"] is not None:  # first what came since then (no gap after a query)
            held = [r for buf in bufs for r in buf.from_time(a["since"])
                    if logmod.matches(r, a["service"], a["level"], a["since"], a["node"])]
            if held:
                held.sort(key=lambda r: r["time"])
                await out(held[-MAX_RECORDS:])
        while True:
            event = trio.Event()
            for buf in bufs:
                buf.on_next(event.set)
            try:
                await event.wait()
            finally:
                for buf in bufs:
                    buf.forget(event.set)
            await trio.sleep(FOLLOW_BATCH)  # a burst goes out as one batch
            batch = []
            for i, buf in enumerate(bufs):
                new = buf.since(seqs[i])
                if new:
                    seqs[i] = new[-1][0]
                batch += [r for _, r in new if logmod.matches(r, a["service"], a["level"],
                                                              a["since"], a["node"])]
            if batch:
                batch.sort(key=lambda r: r["time"])
                await out(batch[-MAX_RECORDS:])

    # --- serving other nodes -------------------------------------------------------------

    async def _serve_channel(self, ch: Channel) -> None:
        peer = ch.peer_node
        try:
            req = wire.loads(await ch.receive(), max_depth=8, max_bytes=64 * 1024)
            if not isinstance(req, dict) or req.get("op") not in OPS or \
                    not isinstance(req.get("args", {}), dict):
                raise bad_request("malformed debug request", id="meshd.debug")
            self._check(peer)
            assert peer is not None
            op, args = req["op"], req.get("args", {})
            held = self._following if op == "follow" else self._serving
            cap = MAX_FOLLOWS if op == "follow" else MAX_QUERIES
            if held.get(peer, 0) >= cap or sum(held.values()) >= cap * 8:
                raise MeshError(429, f"too many debug {op}s from {peer} at once",
                                id="meshd.debug")
            held[peer] = held.get(peer, 0) + 1
            try:
                await self._answer(ch, op, args)
            finally:
                held[peer] -= 1
                if not held[peer]:
                    del held[peer]
        except MeshError as exc:
            self.stats["debug_queries_refused"] += 1
            with contextlib.suppress(ChannelClosed, trio.TooSlowError), \
                    trio.fail_after(SEND_TIMEOUT):
                await ch.send(wire.dumps({"ok": False, "error": exc.to_dict()}))
        except (ChannelClosed, wire.WireError, trio.TooSlowError):
            return  # a member that does not read its answer in time loses it

    async def _answer(self, ch: Channel, op: str, args: dict[str, Any]) -> None:
        if op == "follow":
            a = log_args({**args, "limit": 1})

            async def out(batch: list[dict[str, Any]]) -> None:
                with trio.fail_after(SEND_TIMEOUT):
                    await ch.send(_bounded({"records": batch}, "records"))

            await self._follow_local(a, out)
            return
        result = self.local(op, args)
        self.stats["debug_queries_served"] += 1
        with trio.fail_after(SEND_TIMEOUT):
            await ch.send(_bounded({"ok": True, "result": result}, "result"))

    def _check(self, peer: str | None) -> None:
        """A member asks as a node (the asking node checked its caller): scope node."""
        if peer is None:
            raise MeshError(403, "debug queries come from members only", id="meshd.debug")
        if self.auth is not None:
            self.auth.check(None, peer, RESOURCE)


def _bounded(reply: dict[str, Any], key: str) -> bytes:
    """The encoded reply, its list under `key` cut (oldest first) until it fits in
    MAX_REPLY bytes."""
    data = wire.dumps(reply)
    while len(data) > MAX_REPLY and isinstance(reply[key], list) and reply[key]:
        items = reply[key]
        reply = {**reply, key: items[len(items) // 2 + 1:] if len(items) > 1 else []}
        data = wire.dumps(reply)
    return data


def _checked(op: str, value: Any, node: str) -> Any:
    if op == "logs":
        return checked.records(value, node, MAX_RECORDS)
    if op == "trace":
        return checked.spans(value, node, MAX_SPANS)
    if op == "traces":
        return checked.summaries(value, node, MAX_TRACES)
    return checked.stats(value, node)

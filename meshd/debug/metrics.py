"""Prometheus exporter: `meshd up --metrics-listen HOST:PORT` serves GET /metrics.

Rules:
- Everything is read at scrape time, from what the node keeps anyway (CallStats, the
  components' flat counters, the latest stats sample, membership): nothing is added to any
  hot path.
- No global registry: each MetricsExporter has its own CollectorRegistry holding one
  collector that asks its MetricsSource.
- Names are a contract: `meshd_` prefix, base units (seconds, bytes), counters end in
  `_total`, everything else is a gauge or a histogram. The node's counters are exported
  only through STATS (stats key -> metric) and the stats sample only through SAMPLE; a key
  not in those tables is not exported, and a key the node does not report gives no sample
  (absent, never a made-up 0). Microseconds are scaled to seconds by the table.
- Label cardinality is bounded: labels hold only values from fixed sets (state, reason,
  direction, listener, kind, op, result, status) or service and endpoint names, which
  CallStats bounds at MAX_SERIES series (beyond that calls count under service "_other").
  No ids, keys, addresses, topics or instances; Prometheus adds `instance` itself.
- RPC histograms: `meshd_rpc_server_duration_seconds` and `..._client_...` labelled service,
  endpoint and status ("ok" for 0, else the number, e.g. "404"), buckets stats.BUCKETS.
- `meshd_gc_pause_seconds` labelled generation ("0", "1", "2"): the process's garbage
  collector pauses (debug/gcpauses.py), buckets stats.BUCKETS.
- The listener accepts through meshd/transport/listeners.py like every listener of the
  node (a Gate: caps on open and pending connections and per source address, counted as
  `metrics_*`). One request per connection, parsed by h11: the TLS handshake (with an
  SSLContext from meshd.tlsconf: https only) and the request head (at most MAX_HEAD bytes)
  within READ_TIMEOUT, the answer sent within SEND_TIMEOUT, then the connection closes.
  GET /metrics answers the text format (CONTENT_TYPE_LATEST); other paths 404, other
  methods 405, a malformed request 400. Request bodies are never read.
- A scrape reads the families in the node's thread and formats them in a worker thread;
  scrapes within RENDER_REUSE seconds share one rendering. A scrape that fails answers 500
  and is logged; a failure in one connection ends that connection, never the listener or
  the node.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from meshd.transport import listeners as serving

from .gcpauses import GcPauses
from .stats import BUCKETS, CallStats, Series

log = logging.getLogger("meshd.debug.metrics")
PATH = "/metrics"
READ_TIMEOUT = 5.0  # the TLS handshake and the request head must arrive within this
SEND_TIMEOUT = 10.0  # a scraper that does not read its answer in this long is dropped
MAX_HEAD = 16 * 1024  # request line and headers
RENDER_REUSE = 1.0  # seconds a rendered scrape answers other scrapes
TEXT = "text/plain; charset=utf-8"
STATES = ("alive", "suspect", "dead", "left")  # meshd_members{state}: always all four
RPC_LABELS = ("service", "endpoint", "status")


class MetricsSource(Protocol):
    """What the exporter reads of a node (the node's DebugService)."""

    node: str
    calls: CallStats
    gc: GcPauses

    def node_stats(self) -> dict[str, int]: ...
    def members_by_state(self) -> dict[str, int]: ...
    def health_score(self) -> int: ...
    def latest_sample(self) -> dict[str, Any]: ...


class Stat(NamedTuple):
    """How one stats key is exported: a `_total` name makes a counter, any other a gauge."""

    metric: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0


def _why(reason: str) -> tuple[tuple[str, str], ...]:
    return (("reason", reason),)


_IN, _OUT = (("direction", "in"),), (("direction", "out"),)
_LISTENERS = ("link_tcp", "link_ws", "control", "proxy")  # serving gates: stats `<name>_*`

# The node's flat counters (Node._stats, as DebugService.node_stats returns them).
STATS: dict[str, Stat] = {
    # membership
    "suspicions": Stat("meshd_membership_suspicions_total", "Members this node suspected."),
    "refutations": Stat("meshd_membership_refutations_total",
                        "Suspicions of this node that it refuted."),
    "decode_errors": Stat("meshd_membership_messages_refused_total",
                          "Membership messages refused.", _why("decode")),
    "refused_senders": Stat("meshd_membership_messages_refused_total",
                            "Membership messages refused.", _why("sender")),
    "stream_errors": Stat("meshd_membership_stream_errors_total",
                          "Membership streams that failed."),
    "core_faults": Stat("meshd_membership_core_faults_total",
                        "Membership messages that raised in the core (bugs)."),
    "member_watchers": Stat("meshd_membership_watchers", "Member watches open now."),
    **{f"push_pulls_{k}": Stat("meshd_membership_push_pulls_total",
                               "Anti-entropy rounds this node started, by what travelled.",
                               (("kind", k),))
       for k in ("full", "digest", "same")},
    "push_pulls_serving": Stat("meshd_membership_push_pulls_serving",
                               "Push-pull requests being answered now."),
    "push_pulls_refused": Stat("meshd_membership_push_pulls_refused_total",
                               "Push-pull requests refused: too many at once."),
    "alive_bad_signature": Stat("meshd_membership_alive_refused_total",
                                "Alive messages refused.", _why("bad_signature")),
    "alive_revoked": Stat("meshd_membership_alive_refused_total", "Alive messages refused.",
                          _why("revoked")),
    # gossip datagrams
    "udp_in": Stat("meshd_udp_datagrams_total", "Gossip datagrams.", _IN),
    "udp_out": Stat("meshd_udp_datagrams_total", "Gossip datagrams.", _OUT),
    **{f"udp_dropped_{r}": Stat("meshd_udp_datagrams_dropped_total",
                                "Gossip datagrams dropped on receipt.", _why(r))
       for r in ("unsealed", "oversize", "stale", "replay", "replay_full")},
    "udp_send_errors": Stat("meshd_udp_send_errors_total", "Gossip datagrams not sent."),
    "udp_bad_address": Stat("meshd_udp_bad_addresses_total",
                            "Gossip datagrams not sent: the address was no IP literal."),
    # links
    "link_bytes_in": Stat("meshd_link_bytes_total", "Bytes on links.", _IN),
    "link_bytes_out": Stat("meshd_link_bytes_total", "Bytes on links.", _OUT),
    "link_frames_in": Stat("meshd_link_frames_total", "Frames on links.", _IN),
    "link_frames_out": Stat("meshd_link_frames_total", "Frames on links.", _OUT),
    "links_accepted": Stat("meshd_links_opened_total", "Links opened.", _IN),
    "links_dialed": Stat("meshd_links_opened_total", "Links opened.", _OUT),
    "links_relayed": Stat("meshd_links_relayed_total", "Links this node opened through relays."),
    "relay_sessions": Stat("meshd_relay_sessions_total",
                           "Links of other nodes this node carried as a relay."),
    "handshakes_failed": Stat("meshd_link_handshakes_failed_total", "Link handshakes failed."),
    "links_refused_identity": Stat("meshd_links_refused_total", "Links refused.",
                                   _why("identity")),
    "links_refused_revoked": Stat("meshd_links_refused_total", "Links refused.",
                                  _why("revoked")),
    "links_dropped_bad_frames": Stat("meshd_links_closed_total", "Links closed by this node.",
                                     _why("bad_frames")),
    "links_closed_not_member": Stat("meshd_links_closed_total", "Links closed by this node.",
                                    _why("not_member")),
    "channels_refused_cap": Stat("meshd_link_channels_refused_total",
                                 "Link channels refused: too many open."),
    "channel_handler_errors": Stat("meshd_link_channel_handler_errors_total",
                                   "Link channel handlers that failed."),
    # listeners (connection gates)
    **{f"{name}_{key}": Stat(f"meshd_listener_{metric}_total", text,
                             (("listener", name), *extra))
       for name in _LISTENERS
       for key, metric, text, extra in (
           ("accepted", "connections", "Connections accepted.", ()),
           ("refused_cap", "refused", "Connections refused.", _why("cap")),
           ("refused_source", "refused", "Connections refused.", _why("source")),
           ("evicted", "evicted", "Unauthenticated connections evicted.", ()),
           ("failed", "failed", "Connections whose handler failed.", ()),
           ("accept_errors", "accept_errors", "Errors accepting connections.", ()))},
    # proxy endpoint
    "proxy_sessions": Stat("meshd_proxy_sessions_total", "Proxy sessions.",
                           (("kind", "rpc"),)),
    "proxy_control_sessions": Stat("meshd_proxy_sessions_total", "Proxy sessions.",
                                   (("kind", "control"),)),
    "proxy_refused": Stat("meshd_proxy_refused_total", "Proxy sessions refused."),
    "proxy_streams": Stat("meshd_proxy_streams_total", "Proxy streams."),
    "proxy_streams_refused": Stat("meshd_proxy_streams_refused_total",
                                  "Proxy streams refused: too many open."),
    # rpc
    "rpc_calls": Stat("meshd_rpc_calls_total", "RPC calls made through this node."),
    "rpc_errors": Stat("meshd_rpc_errors_total", "RPC calls through this node that failed."),
    "rpc_remote_served": Stat("meshd_rpc_remote_served_total",
                              "RPC calls from other nodes served here."),
    "registry_future_refused": Stat("meshd_registry_records_refused_total",
                                    "Registry records refused.", _why("future_timestamp")),
    "registry_old_tombstones_dropped": Stat(
        "meshd_registry_records_refused_total", "Registry records refused.",
        _why("collected_tombstone")),
    "registry_stale_removed": Stat("meshd_registry_stale_removed_total",
                                   "Instances of this node's earlier boots removed."),
    # store
    "store_reads": Stat("meshd_store_operations_total", "Store operations.",
                        (("op", "read"),)),
    "store_writes": Stat("meshd_store_operations_total", "Store operations.",
                         (("op", "write"),)),
    "store_commits": Stat("meshd_store_commits_total",
                          "Batches of writes committed to the node's database file."),
    "store_msgs_out": Stat("meshd_store_messages_sent_total", "Store replication messages."),
    "store_bad_messages": Stat("meshd_store_messages_refused_total",
                               "Store replication messages refused.", _why("bad")),
    "store_refused": Stat("meshd_store_messages_refused_total",
                          "Store replication messages refused.", _why("refused")),
    "store_future_refused": Stat("meshd_store_messages_refused_total",
                                 "Store replication messages refused.",
                                 _why("future_timestamp")),
    "store_repairs": Stat("meshd_store_antientropy_repairs_total",
                          "Anti-entropy rounds that repaired a difference."),
    "store_bytes_repair": Stat("meshd_store_antientropy_bytes_total",
                               "Bytes of records sent by anti-entropy repairs."),
    # broker
    "broker_published": Stat("meshd_broker_published_total", "Messages published here."),
    "broker_durable_published": Stat("meshd_broker_durable_published_total",
                                     "Durable messages published here."),
    "broker_delivered": Stat("meshd_broker_delivered_total",
                             "Messages delivered to subscribers here."),
    "broker_copies_in": Stat("meshd_broker_copies_total", "Message copies between nodes.",
                             _IN),
    "broker_copies_out": Stat("meshd_broker_copies_total", "Message copies between nodes.",
                              _OUT),
    "broker_batches_out": Stat("meshd_broker_batches_sent_total",
                               "Batches of message copies sent."),
    "broker_copies_dropped": Stat("meshd_broker_dropped_total", "Messages dropped.",
                                  _why("undeliverable")),
    "broker_unserved": Stat("meshd_broker_dropped_total", "Messages dropped.",
                            _why("no_member")),
    "broker_dead": Stat("meshd_broker_dropped_total", "Messages dropped.",
                        _why("dead_letter")),
    "broker_lost": Stat("meshd_broker_dropped_total", "Messages dropped.", _why("retention")),
    "broker_deliveries_unsent": Stat(
        "meshd_broker_deliveries_unsent_total",
        "Durable deliveries that could not be sent, offered again without counting an attempt."),
    "broker_redelivered": Stat("meshd_broker_redelivered_total", "Messages redelivered."),
    "broker_pending": Stat("meshd_broker_pending",
                           "Durable messages delivered and not yet acknowledged."),
    "broker_commits": Stat("meshd_broker_commits_total", "Durable log commits."),
    "broker_commit_us": Stat("meshd_broker_commit_seconds_total",
                             "Time spent in durable log commits.", scale=1e-6),
    "broker_interest_in": Stat("meshd_broker_interest_messages_total",
                               "Subscription interest messages.", _IN),
    "broker_interest_out": Stat("meshd_broker_interest_messages_total",
                                "Subscription interest messages.", _OUT),
    "broker_bad_messages": Stat("meshd_broker_messages_refused_total",
                                "Broker messages refused.", _why("bad")),
    "interest_refused": Stat("meshd_broker_messages_refused_total",
                             "Broker messages refused.", _why("interest")),
    "interest_future_refused": Stat("meshd_broker_messages_refused_total",
                                    "Broker messages refused.", _why("future_timestamp")),
    "broker_settles_refused": Stat("meshd_broker_settles_refused_total",
                                   "Acks and nacks refused (not the consumer's)."),
    # auth
    "auth_denied": Stat("meshd_auth_denied_total", "Requests denied by the rules."),
    "auth_bad_tokens": Stat("meshd_auth_bad_tokens_total", "Tokens refused."),
    "auth_records_refused": Stat("meshd_auth_records_refused_total",
                                 "Auth records refused."),
    # debug
    "debug_queries_served": Stat("meshd_debug_queries_total", "Debug queries answered."),
    "debug_queries_refused": Stat("meshd_debug_queries_refused_total",
                                  "Debug queries refused."),
    "otlp_spans_exported": Stat("meshd_otlp_spans_exported_total", "Spans sent over OTLP."),
    "otlp_spans_dropped": Stat("meshd_otlp_spans_dropped_total",
                               "Spans dropped before OTLP export."),
    "otlp_export_failures": Stat("meshd_otlp_export_failures_total",
                                 "OTLP span exports that failed."),
    "otlp_metric_exports": Stat("meshd_otlp_metric_exports_total",
                                "OTLP metric exports.", (("result", "ok"),)),
    "otlp_metric_failures": Stat("meshd_otlp_metric_exports_total",
                                 "OTLP metric exports.", (("result", "failed"),)),
}

# The newest stats sample (DebugService.latest_sample; stats.NodeSampler).
SAMPLE: dict[str, Stat] = {
    "uptime": Stat("meshd_uptime_seconds", "Seconds since the node started."),
    "cpu_seconds": Stat("meshd_process_cpu_seconds_total", "CPU time of the node process."),
    "rss_bytes": Stat("meshd_process_resident_memory_bytes", "Resident memory of the node."),
    "tasks": Stat("meshd_tasks", "Trio tasks running in the node."),
    "links": Stat("meshd_links", "Links open now."),
    "services": Stat("meshd_local_instances", "Service instances attached to this node."),
    "store_records": Stat("meshd_store_records", "Records in the node's store."),
    "store_bytes": Stat("meshd_store_size_bytes", "Size of the node's store file."),
}


def _families(table: dict[str, Stat]) -> tuple[tuple[str, str, tuple[str, ...],
                                                      tuple[tuple[str, Stat], ...]], ...]:
    """The table grouped by metric: (metric, help, label names, (key, stat)...)."""
    grouped: dict[str, list[tuple[str, Stat]]] = {}
    for key, stat in table.items():
        grouped.setdefault(stat.metric, []).append((key, stat))
    out = []
    for metric, rows in grouped.items():
        names = tuple(k for k, _ in rows[0][1].labels)
        if not metric.startswith("meshd_") or any(
                tuple(k for k, _ in s.labels) != names or s.help != rows[0][1].help
                for _, s in rows):
            raise ValueError(f"metric {metric}: rows disagree on labels or help")
        out.append((metric, rows[0][1].help, names, tuple(rows)))
    return tuple(out)


_STAT_FAMILIES = _families(STATS)
_SAMPLE_FAMILIES = _families(SAMPLE)


def _table(families: Any, values: dict[str, Any]) -> Iterator[Metric]:
    for metric, text, names, rows in families:
        present = [(s, values[k]) for k, s in rows if isinstance(values.get(k), int | float)]
        if not present:
            continue
        fam: CounterMetricFamily | GaugeMetricFamily
        if metric.endswith("_total"):
            fam = CounterMetricFamily(metric, text, labels=names)
        else:
            fam = GaugeMetricFamily(metric, text, labels=names)
        for s, value in present:
            fam.add_metric([v for _, v in s.labels], value * s.scale)
        yield fam


def status_label(status: int) -> str:
    return "ok" if status == 0 else str(status)


_BOUNDS = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]


def _buckets(series: Series) -> list[tuple[str, int]]:
    return list(zip(_BOUNDS, series.cumulative(), strict=True))


def _gc(pauses: GcPauses) -> Metric:
    fam = HistogramMetricFamily("meshd_gc_pause_seconds",
                                "Pauses of this process's garbage collector, by generation.",
                                labels=("generation",))
    for generation, series in sorted(pauses.snapshot().items()):
        fam.add_metric([str(generation)], _buckets(series), series.total)
    return fam


def _rpc(calls: CallStats) -> Iterator[Metric]:
    for side in ("server", "client"):
        fam = HistogramMetricFamily(
            f"meshd_rpc_{side}_duration_seconds",
            f"Duration of RPC calls {'served' if side == 'server' else 'made'} by this node.",
            labels=RPC_LABELS)
        for (service, endpoint, status), series in calls.by_side(side).items():
            fam.add_metric([service, endpoint, status_label(status)], _buckets(series),
                           series.total)
        yield fam


class _Collector:
    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        src = self.source
        yield from _rpc(src.calls)
        yield _gc(src.gc)
        members = GaugeMetricFamily("meshd_members", "Members this node knows, by state.",
                                    labels=("state",))
        counts = src.members_by_state()
        for state in (*STATES, *sorted(set(counts) - set(STATES))):
            members.add_metric([state], counts.get(state, 0))
        yield members
        yield GaugeMetricFamily("meshd_health_score",
                                "Lifeguard awareness score (0 = healthy; higher = slower "
                                "probes).", value=src.health_score())
        yield from _table(_SAMPLE_FAMILIES, src.latest_sample())
        yield from _table(_STAT_FAMILIES, src.node_stats())


class MetricsExporter:
    def __init__(self, source: MetricsSource, stats: dict[str, int] | None = None) -> None:
        self.source = source
        self._collector = _Collector(source)
        self.registry = CollectorRegistry()
        self.registry.register(self._collector)
        self.port = 0  # the bound port, once serve() has started
        self.stats: dict[str, int] = stats if stats is not None else {}
        self.gate = serving.Gate("metrics", self.stats, pending_timeout=READ_TIMEOUT)
        self._render_lock = trio.Lock()
        self._rendered: tuple[float, bytes] | None = None

    def render(self) -> bytes:
        """The Prometheus text format of everything, read now."""
        return generate_latest(self.registry)

    async def _render(self) -> bytes:
        """The text of a scrape: the families read in the node's thread (no node counter
        moves while they are read; the collector's pauses, which any allocation may add
        to, are copied whole by GcPauses.snapshot), formatted in a worker thread (the slow
        part stays off the event loop). Scrapes within RENDER_REUSE seconds of one share
        its text, so many scrapers cost one render."""
        async with self._render_lock:
            now = trio.current_time()
            if self._rendered is not None and now - self._rendered[0] < RENDER_REUSE:
                return self._rendered[1]
            snapshot = _Snapshot(list(self._collector.collect()))
            body = await trio.to_thread.run_sync(generate_latest, snapshot)
            self._rendered = (trio.current_time(), body)
            return body

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (https:// only with `tls`); started once listening, with
        the bound port (also `self.port`). A bind failure raises OSError before that."""
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serving.serve_tcp, host, port, self._handle,
                                            self.gate, tls)
            task_status.started(self.port)

    async def _handle(self, stream: Any, ticket: serving.Ticket) -> None:
        """One connection, one request: its head within the ticket's deadline (h11 parses
        it, at most MAX_HEAD bytes), then the answer within SEND_TIMEOUT, then close."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        request = None
        try:
            with trio.move_on_at(ticket.deadline):
                while request is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(4096)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    else:
                        return
        except h11.RemoteProtocolError:
            await self._answer(stream, conn, 400, b"bad request\n", TEXT)
            return
        if request is None:
            raise trio.TooSlowError("the request head did not arrive in time")
        ticket.authenticated()
        path = request.target.split(b"?", 1)[0]
        if path != PATH.encode():
            await self._answer(stream, conn, 404, b"not found: try GET /metrics\n", TEXT)
        elif request.method != b"GET":
            await self._answer(stream, conn, 405, b"method not allowed: use GET\n", TEXT,
                               (b"allow", b"GET"))
        else:
            try:
                body = await self._render()
            except Exception:
                log.exception("metrics scrape failed")
                await self._answer(stream, conn, 500, b"scrape failed; see the node's log\n",
                                   TEXT)
                return
            await self._answer(stream, conn, 200, body, CONTENT_TYPE_LATEST)

    @staticmethod
    async def _answer(stream: Any, conn: h11.Connection, status: int, body: bytes,
                      content_type: str, *extra: tuple[bytes, bytes]) -> None:
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                   *extra]
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                                  + conn.send(h11.Data(data=body))
                                  + conn.send(h11.EndOfMessage()))
        await stream.aclose()


class _Snapshot:
    """Families already read, for generate_latest in a worker thread."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)

"""Settings: every knob of the node, with its documented default and the reason for it.

Rules:
- One dataclass per component; every field has a default and a comment saying why.
- Profiles (`lan`, `wan`, `local`) are named sets of overrides on top of the defaults,
  in the manner of memberlist's DefaultLANConfig / DefaultWANConfig / DefaultLocalConfig.
- Durations are float seconds; sizes are bytes.
- Settings are plain values: components never read the environment or files themselves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

PROFILES = ("lan", "wan", "local")


@dataclass(frozen=True, slots=True)
class MembershipSettings:
    """SWIM + Lifeguard failure detection and gossip. Defaults are the LAN profile."""

    # Time between two probes of this node (one random member per interval, round-robin).
    # 1 s keeps first detection of a crash around one to two seconds while each node sends
    # one ping per second whatever the cluster size (memberlist LAN).
    probe_interval: float = 1.0
    # How long to wait for a direct ack before asking others to probe indirectly. 500 ms is
    # well above a LAN's 99.9th percentile RTT, and half the probe interval leaves the other
    # half for indirect probes.
    probe_timeout: float = 0.5
    # Members asked to probe indirectly when the direct probe fails. Three independent paths
    # make a false suspicion through a single lossy link unlikely (p_loss^3).
    indirect_checks: int = 3
    # Time between gossip rounds that push queued broadcasts to `gossip_nodes` members.
    # 200 ms spreads a change through 1,000 nodes in about two seconds.
    gossip_interval: float = 0.2
    # Fanout: members each gossip round goes to. Three gives log4(N) rounds of spread and
    # keeps per-node traffic flat in N.
    gossip_nodes: int = 3
    # Dead members still receive gossip this long, so a node wrongly declared dead hears it
    # and refutes; also how long dead/left members stay in the table before they are reaped.
    gossip_to_the_dead: float = 30.0
    # Each broadcast is retransmitted retransmit_mult * ceil(log10(N + 1)) times: with 4 the
    # chance a node misses a change is negligible even with 10% packet loss.
    retransmit_mult: int = 4
    # Minimum suspicion timeout = suspicion_mult * max(1, log10(N)) * probe_interval: time for
    # the suspect to hear about it and refute, growing slowly with the cluster.
    suspicion_mult: int = 4
    # Lifeguard: an unconfirmed suspicion starts at this multiple of the minimum and shrinks
    # toward the minimum as independent members confirm it. 6 gives a lone (maybe slow)
    # accuser's victim plenty of time to refute.
    suspicion_max_timeout_mult: int = 6
    # Lifeguard: the local health multiplier may stretch probe interval and timeout up to this
    # factor when this node notices that it is the slow one (missed nacks, refutations).
    awareness_max_multiplier: int = 8
    # Full state exchange with one random member, scaled up with log2(N) beyond 32 nodes so
    # the bandwidth it costs stays flat. 30 s repairs anything gossip missed quickly enough.
    push_pull_interval: float = 30.0
    # Try to reach one dead member's last address this often so a healed partition rejoins
    # without an operator (Serf's reconnect_interval).
    reconnect_interval: float = 30.0
    # Give up reconnecting to a dead member after this long (Serf's reconnect_timeout, 24 h).
    reconnect_timeout: float = 86400.0
    # Members that left gracefully said goodbye; retrying them would pull a deliberately
    # removed node back in, so by default only dead members are retried.
    reconnect_left: bool = False
    # A member we have no route to and no direct answer from is not suspected on a failed
    # probe alone for this long after it appeared (or changed state): routes take a few
    # seconds to form (measure pings, adverts, recompute), and until they do, silence on an
    # unknown path says nothing. Others that reach it directly still suspect it at once.
    route_grace: float = 10.0
    # Largest UDP payload a gossip packet may use: below a 1500-byte Ethernet MTU with room
    # for IP/UDP headers and the seal (nonce + tag).
    packet_budget: int = 1400
    # Node tags (region, cloud, role...) encoded may not exceed this; they ride every alive
    # message, so they must stay small.
    max_meta_bytes: int = 512
    # When a UDP probe fails, also ping over a stream (TCP) in parallel with the indirect
    # probes: a UDP-only firewall problem then does not kill healthy members (memberlist).
    tcp_fallback: bool = True
    # Lifeguard on (local health multiplier, nacks, dynamic suspicion timeout, buddy
    # system). Only turned off to measure what it buys.
    lifeguard: bool = True
    # Nack: an indirect prober that hears nothing from the target tells the requester after
    # this fraction of the probe timeout, so the requester can tell "target down" from
    # "I am slow" (Lifeguard).
    nack_fraction: float = 0.8
    # Push-pull interval scaling starts above this many nodes (memberlist pushPullScale).
    push_pull_scale_threshold: int = 32

    def suspicion_min(self, n: int) -> float:
        """Minimum suspicion timeout for a cluster of n members."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval

    def suspicion_max(self, n: int) -> float:
        """Starting (maximum) suspicion timeout; equals the minimum without Lifeguard."""
        if not self.lifeguard:
            return self.suspicion_min(n)
        return self.suspicion_max_timeout_mult * self.suspicion_min(n)

    def silent_after(self) -> float:
        """How long a member that answered us directly may go quiet before it counts as not
        answering: two probe intervals plus a timeout (two lost pings are not enough)."""
        return 2 * self.probe_interval + self.probe_timeout

    def retransmit_limit(self, n: int) -> int:
        """How many times each broadcast is sent: retransmit_mult * ceil(log10(n + 1))."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_period(self, n: int) -> float:
        """Push-pull interval scaled for n members: x(ceil(log2 n - log2 32) + 1) above 32."""
        threshold = self.push_pull_scale_threshold
        if n <= threshold:
            return self.push_pull_interval
        mult = math.ceil(math.log2(n) - math.log2(threshold)) + 1.0
        return self.push_pull_interval * mult


# Profile overrides, applied on top of the defaults above (which are the LAN profile).
_MEMBERSHIP_PROFILES: dict[str, dict[str, Any]] = {
    "lan": {},
    # Across regions and clouds: RTTs of 50-300 ms and more loss, so slower probes, longer
    # timeouts and a larger suspicion multiplier (memberlist DefaultWANConfig).
    "wan": {
        "probe_interval": 5.0,
        "probe_timeout": 3.0,
        "suspicion_mult": 6,
        "push_pull_interval": 60.0,
        "gossip_nodes": 4,
        "gossip_interval": 0.5,
        "gossip_to_the_dead": 60.0,
        "route_grace": 30.0,
    },
    # One host or loopback tests: near-zero RTT, so fast probes and short timeouts make
    # tests and demos react within a second or two (memberlist DefaultLocalConfig, but with
    # the LAN retransmit multiplier: with 2, a join among 5 nodes missed a node for up to
    # 10 s in about one run in five; bandwidth does not matter on one host).
    "local": {
        "probe_interval": 0.5,
        "probe_timeout": 0.2,
        "indirect_checks": 1,
        "retransmit_mult": 4,
        "suspicion_mult": 3,
        "push_pull_interval": 15.0,
        "gossip_interval": 0.1,
        "gossip_to_the_dead": 15.0,
        "reconnect_interval": 5.0,
        "route_grace": 3.0,
    },
}


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Who this node is and where it listens."""

    # Unique in the cluster; empty means the host name.
    name: str = ""
    # UDP and TCP gossip/link port. All interfaces, like Serf's LAN port: peers on other hosts
    # must reach it. The control socket, not this port, is what the local operator uses.
    bind: str = "0.0.0.0:7946"
    # Address others use to reach us; empty means the bind address, or, when bound to all
    # interfaces, the address of the interface carrying the default route (else the only
    # private one), as Consul does; the node logs which and why.
    advertise: str = ""
    # Where identity, keyring and state live; empty means the platform's user data dir.
    data_dir: str = ""
    # Peers to join at start (also the last known peers are retried after a restart).
    join: tuple[str, ...] = ()
    # key=value node tags (region, cloud, role...), at most 512 bytes encoded.
    tags: tuple[str, ...] = ()
    # File holding the cluster secret when joining an existing cluster (or MESHD_SECRET).
    secret_file: str = ""
    # Also accept links over WebSocket on HOST:PORT (empty: off). Advertise a ws:// address
    # to make this node reachable only that way (through HTTP proxies and firewalls).
    ws_listen: str = ""
    # Serve the proxy endpoint for clients outside the cluster (WebSocket, token required)
    # on HOST:PORT; empty: off. Nothing but the gossip port is reachable by default.
    proxy_listen: str = ""
    # debug, info, warning or error.
    log_level: str = "info"
    # PEM certificate (chain) and its unencrypted private key for the listeners outside
    # clients reach: with both, the proxy endpoint serves wss:// only. Empty: plain ws://,
    # which carries tokens in clear, so use it only on loopback or a trusted network.
    tls_cert: str = ""
    tls_key: str = ""
    # The auth root to trust (its fingerprint, as `meshd invite` prints it). Empty: the one
    # the seeds we join through vouch for; the first node of a cluster makes its own.
    auth_root: str = ""


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Bounds on what peers may send us."""

    # Largest frame on a secure link; bigger messages are split, bigger frames close the link.
    max_frame_bytes: int = 1 << 20
    # Largest UDP datagram accepted (we send at most packet_budget bytes).
    max_udp_packet: int = 65000
    # A link handshake must finish within this; also bounds a join to a silent or foreign peer.
    handshake_timeout: float = 5.0
    # How long `join` waits for a seed's push-pull reply.
    join_timeout: float = 5.0
    # A sealed UDP packet carries its sender's wall-clock time: one more than this away from
    # ours (either way) is dropped (udp_dropped_stale), and one already opened within it is
    # dropped as a replay (udp_dropped_replay), so captured gossip cannot be played back.
    # 60 s, like store.max_clock_drift: far above what NTP-synced clocks drift apart, short
    # enough that the nonces remembered per window stay a few MB. Clocks must agree within it.
    udp_replay_window: float = 60.0
    # Streams and sessions (watches, RPC streams) one token may hold open at once through
    # the proxy endpoint; one more is a 429. Plenty for a person's terminals and an SDK's
    # watches, and a small share of the proxy's connections (a third of the open-file
    # limit), so one token cannot hold every slot.
    max_remote_streams: int = 16


@dataclass(frozen=True, slots=True)
class RpcSettings:
    """Registry and RPC."""

    # How a caller's daemon picks an instance: random, roundrobin or nearest (lowest RTT).
    selector: str = "random"
    # Other instances tried when a call could not be delivered (never after delivery).
    retries: int = 2
    # A service process that sends nothing (the SDK heartbeats every ttl/3) for this long is
    # dropped from the registry: short enough to stop sending it calls soon after it hangs.
    instance_ttl: float = 15.0
    # Anti-entropy of the registry with one random member this often (pushes do the rest).
    registry_sync_interval: float = 5.0
    # Largest request body; larger calls are refused with 400.
    max_body_bytes: int = 1 << 20
    # Deadline of a call that names none.
    default_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The replicated store (and config, which lives in it)."""

    # Writes are pushed in batches this often: one message per peer carries every write of
    # the interval, so message count stays flat as write rate grows.
    batch_interval: float = 0.05
    # Anti-entropy with one random peer this often (repairs what pushes missed, heals
    # partitions); only differing buckets and keys travel.
    sync_interval: float = 10.0
    # Up to this many members every batch goes straight to every member (one hop); beyond
    # it, to `fanout` random members that forward what is new to them.
    all_threshold: int = 64
    fanout: int = 4
    # A delete is remembered this long: a replica cut off for longer than this may bring a
    # deleted key back when it returns (the classic tombstone trade-off).
    tombstone_grace: float = 86400.0
    max_value_bytes: int = 1 << 20
    max_key_bytes: int = 1024
    # Records live in store.db; memory keeps the most recently used ones, decoded, up to
    # about this many bytes (0: none, every read asks SQLite). 32 MiB holds ~28,000 records
    # of 100-byte values.
    cache_bytes: int = 32 << 20
    # How long a write with replicas > 1 waits for the other replicas' acknowledgements.
    replica_timeout: float = 5.0
    # Databases on engines (PostgreSQL, Redis): connections per engine and node, and the
    # bound on every engine call (connect, wait for a connection, statement).
    engine_pool: int = 16
    engine_timeout: float = 5.0
    # `meshd store migrate` keeps copying writes that still reach the embedded store this
    # long after the switch (from nodes the switch had not reached yet): well above how long
    # a replicated record takes to arrive (batch_interval, one anti-entropy round).
    migrate_grace: float = 30.0
    # A replicated record stamped more than this ahead of our clock is refused and counted
    # (store_future_refused) instead of merged: one node with a clock in the future would
    # otherwise drag every node's hybrid clock forward and win every conflict until real
    # time caught up. 60 s is far above how far NTP-synced clocks drift apart (milliseconds);
    # a clock a minute or more off is a fault to refuse, not to follow. Clocks must agree
    # within it; the registry uses the same 60 s (hlc.MAX_DRIFT_MS).
    max_clock_drift: float = 60.0


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Pub/sub (docs/broker.md)."""

    # A message's body and headers together; NATS's default max_payload is 1 MiB too.
    max_message_bytes: int = 1 << 20
    # A core subscriber's buffer (messages) before its policy (drop oldest / drop newest /
    # block the publisher) applies: Micro's 64-message inbox lost messages; this is a
    # default, each subscription may choose its own.
    subscriber_buffer: int = 1024
    # Durable subscribers: an unacked message comes again after ack_wait seconds, at most
    # max_deliver times (then TOPIC.dead), with at most max_in_flight unacked at once
    # (JetStream's defaults are 30 s and unlimited deliveries; unlimited hides poison
    # messages, so 5).
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_in_flight: int = 1000
    # Republishing the same message id within this many seconds is a duplicate (JetStream's
    # duplicate window is 2 minutes).
    dedup_window: float = 120.0
    # A durable publish is acknowledged once its commit is fsynced (true), or once it is
    # in the OS (false: SQLite WAL synchronous=NORMAL; survives meshd being killed, not
    # the machine losing power - what NATS JetStream 2.9 does; several times the rate of
    # acked publishes on disks with slow fsync).
    fsync: bool = True
    # A publish to a topic with --replicas N waits this long for N-1 other nodes to hold the
    # message before it answers 408 (as the store's replica_timeout).
    replica_timeout: float = 5.0
    # Durable topics on NATS JetStream (--backend nats): the bound on every call to the
    # server (a publish's PubAck, making a stream or consumer); past it the caller gets a
    # 503 saying so, never a hang (nats-py's own default request timeout is 5 s too).
    engine_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class DebugSettings:
    """Logs, stats and traces kept on every node; Prometheus and OTLP exports
    (docs/observability.md)."""

    # Log records kept (the node's own and its services'): ~350 bytes each, and at most
    # log_buffer_bytes of memory however long the lines (debug buffers: <= 10 MB in all).
    log_buffer: int = 10_000
    log_buffer_bytes: int = 4 << 20
    # The lowest level kept in the buffer (the node's stderr keeps its own --log-level).
    log_level: str = "info"
    # Trace spans kept: ~600 bytes each (spans are built by the daemon, their fields
    # bounded), so ~5 MB.
    span_buffer: int = 8_000
    # Stats samples kept per node (one every stats_interval seconds: an hour at the defaults).
    stats_interval: float = 10.0
    stats_buffer: int = 360
    # Trace calls, streams and messages (W3C traceparent, spans); false: no trace context is
    # made or passed on and no span kept (calls are still counted for `meshd stats` and
    # /metrics). bench/observability.py measures the cost of true against false.
    tracing: bool = True
    # The share of traces kept (0..1), decided where a trace starts and carried in
    # `traceparent`; a span that ends in an error is always kept. 0.1 keeps enough of a busy
    # service to find slow calls without paying for every one.
    trace_sample: float = 0.1
    # /metrics for Prometheus ("" = off; loopback unless told, like every outside listener).
    metrics_listen: str = ""
    # OTLP/HTTP endpoint for spans ("" = off; needs `pip install meshd[otel]`).
    otlp_endpoint: str = ""
    # How long a cluster-wide query waits for each node's answer.
    query_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The API gateway: one HTTP entry point to every service (docs/gateway.md)."""

    # Where it listens ("" = off; loopback unless told, like every outside listener). It
    # serves https:// with node.tls_cert and node.tls_key.
    listen: str = ""
    # The namespace a request reaches unless it says otherwise (X-Meshd-Namespace header).
    namespace: str = "default"
    # Origins a browser may call from (CORS), e.g. "https://app.example.com"; "*" for any
    # (then without credentials). Empty: no CORS headers, preflights refused.
    cors_origins: tuple[str, ...] = ()
    # A request body larger than this is refused (413) before it is read in full.
    max_body_bytes: int = 4 << 20
    # How long a call may take unless the request asks for less (X-Meshd-Timeout or /rpc's
    # "timeout"); never more than max_timeout.
    timeout: float = 30.0
    max_timeout: float = 300.0
    # A request whose headers or body stop arriving for this long is answered 408 (or, before
    # its headers are in, its connection is closed): slow clients hold nothing for long.
    read_timeout: float = 10.0
    # An idle keep-alive connection is closed after this.
    keep_alive: float = 5.0
    # The request line and headers together are at most this (431/400 beyond, hypercorn's).
    max_header_bytes: int = 16 * 1024
    # Requests served at once; more get 503 at once instead of queueing.
    max_in_flight: int = 1024
    # Requests a second per token and per client address (bursts of twice that), 429 with
    # Retry-After beyond; 0 = no limit (the default, as nginx and Kong: set them for a
    # public gateway).
    rate_per_token: float = 0.0
    rate_per_address: float = 0.0
    # One log record per request (method, path, status, time, caller, request id), kept with
    # the node's logs (`meshd logs`).
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The web dashboard (docs/web.md)."""

    # Where it listens ("" = off; loopback unless told). It serves https:// with
    # node.tls_cert and node.tls_key.
    listen: str = ""
    # The namespace the page opens in (it has a switcher).
    namespace: str = "default"
    # A request body (an op's arguments: a store value, a call's request) is at most this.
    max_body_bytes: int = 1 << 20
    # How long one operation may take before the page gets 504.
    timeout: float = 30.0
    # A request whose head or body stops arriving for this long is dropped (408).
    read_timeout: float = 10.0
    # An idle keep-alive connection is closed after this.
    keep_alive: float = 30.0
    # The request line and headers together are at most this.
    max_header_bytes: int = 16 * 1024
    # Live streams (members, logs, watches) one token holds open at once; 429 beyond.
    max_streams: int = 16
    # Names the dashboard answers to besides the address it was reached at, localhost,
    # 127.0.0.1 and ::1: a DNS name or a reverse proxy's ("dash.example.com" or with
    # ":PORT"). A request naming any other Host is refused (403: DNS rebinding).
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """The runtime: managed services run from source (docs/runtime.md)."""

    # A replica on a node that membership says is dead is placed elsewhere after this.
    grace: float = 30.0
    # Stopping a replica: SIGTERM to its process group, SIGKILL after this.
    stop_timeout: float = 10.0
    # A replica that registered and then lost its registration (its heartbeat stopped) for
    # this long is restarted.
    health_grace: float = 10.0
    # A rolling update fails when a new replica is not healthy this long after it started.
    healthy_deadline: float = 300.0
    # Leave the replicas running when the daemon stops; the next daemon adopts them.
    keep_on_exit: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole settings tree of a node."""

    profile: str = "lan"
    node: NodeSettings = field(default_factory=NodeSettings)
    membership: MembershipSettings = field(default_factory=MembershipSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    rpc: RpcSettings = field(default_factory=RpcSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    web: WebSettings = field(default_factory=WebSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)


# The tables of a settings file (and MESHD_<SECTION>_<KEY> in the environment) besides [node].
SECTIONS = ("membership", "limits", "rpc", "store", "broker", "debug", "api", "web",
            "runtime")

_NODE_ENV = {"name", "bind", "advertise", "data_dir", "join", "tags", "secret_file",
             "log_level", "ws_listen", "proxy_listen", "tls_cert", "tls_key", "auth_root"}


def load_settings(toml: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                  flags: dict[str, Any] | None = None) -> Settings:
    """Defaults < TOML < MESHD_* environment < flags.

    TOML has a top-level `profile` and tables [node] and one per SECTIONS entry. Environment:
    MESHD_PROFILE, MESHD_<NODE KEY> (MESHD_NAME, MESHD_BIND, MESHD_JOIN="a:1,b:2", ...) and
    MESHD_<SECTION>_<KEY> for the SECTIONS. Flags use the same names as TOML keys,
    as "section.key" or a bare node key.
    """
    toml = dict(toml or {})
    env = env or {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    layers: list[dict[str, dict[str, Any]]] = []
    profile = "lan"
    # TOML layer
    if "profile" in toml:
        profile = str(toml.pop("profile"))
    layer: dict[str, dict[str, Any]] = {}
    for section, values in toml.items():
        if section not in ("node", *SECTIONS) or not isinstance(values, dict):
            raise SettingsError(f"unknown settings table [{section}]; known: node, "
                                f"{', '.join(SECTIONS)}, and the key profile")
        layer[section] = dict(values)
    layers.append(layer)
    # environment layer
    layer = {}
    for key, value in env.items():
        if not key.startswith("MESHD_"):
            continue
        rest = key[6:].lower()
        if rest == "profile":
            profile = value
        elif rest in _NODE_ENV:
            layer.setdefault("node", {})[rest] = value
        else:
            for section in SECTIONS:
                if rest.startswith(section + "_"):
                    layer.setdefault(section, {})[rest[len(section) + 1:]] = value
    layers.append(layer)
    # flags layer
    layer = {}
    for key, value in flags.items():
        if key == "profile":
            profile = value
            continue
        section, _, name = key.rpartition(".")
        layer.setdefault(section or "node", {})[name] = value
    layers.append(layer)

    if profile not in PROFILES:
        raise SettingsError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    node, membership, limits = NodeSettings(), membership_profile(profile), LimitsSettings()
    rpc, store, broker = RpcSettings(), StoreSettings(), BrokerSettings()
    debug, api, web = DebugSettings(), ApiSettings(), WebSettings()
    runtime = RuntimeSettings()
    for lay in layers:
        node = _replace_checked(node, lay.get("node", {}), "node")
        membership = _replace_checked(membership, lay.get("membership", {}), "membership")
        limits = _replace_checked(limits, lay.get("limits", {}), "limits")
        rpc = _replace_checked(rpc, lay.get("rpc", {}), "rpc")
        store = _replace_checked(store, lay.get("store", {}), "store")
        broker = _replace_checked(broker, lay.get("broker", {}), "broker")
        debug = _replace_checked(debug, lay.get("debug", {}), "debug")
        api = _replace_checked(api, lay.get("api", {}), "api")
        web = _replace_checked(web, lay.get("web", {}), "web")
        runtime = _replace_checked(runtime, lay.get("runtime", {}), "runtime")
    if limits.max_remote_streams < 1:
        raise SettingsError("limits.max_remote_streams must be at least 1")
    if rpc.selector not in ("random", "roundrobin", "nearest"):
        raise SettingsError("rpc.selector must be random, roundrobin or nearest")
    if broker.max_deliver < 1 or broker.max_in_flight < 1 or broker.ack_wait <= 0 \
            or broker.subscriber_buffer < 1 or broker.max_message_bytes < 1:
        raise SettingsError("broker: max_deliver, max_in_flight, subscriber_buffer and "
                            "max_message_bytes must be at least 1, ack_wait above 0")
    if broker.engine_timeout <= 0:
        raise SettingsError("broker.engine_timeout must be above 0 (seconds)")
    if store.cache_bytes < 0:
        raise SettingsError("store.cache_bytes must be 0 or more (bytes)")
    if min(debug.log_buffer, debug.span_buffer, debug.stats_buffer,
           debug.log_buffer_bytes) < 1 \
            or debug.stats_interval <= 0 or debug.query_timeout <= 0:
        raise SettingsError("debug: log_buffer, log_buffer_bytes, span_buffer and stats_buffer "
                            "must be at least 1, stats_interval and query_timeout above 0")
    if not 0.0 <= debug.trace_sample <= 1.0:
        raise SettingsError("debug.trace_sample must be between 0 and 1")
    if debug.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError("debug.log_level must be debug, info, warning, error or critical")
    if min(api.max_body_bytes, api.max_header_bytes, api.max_in_flight) < 1 \
            or min(api.timeout, api.max_timeout, api.read_timeout, api.keep_alive) <= 0 \
            or api.timeout > api.max_timeout or min(api.rate_per_token,
                                                    api.rate_per_address) < 0:
        raise SettingsError("api: max_body_bytes, max_header_bytes and max_in_flight must be "
                            "at least 1, the timeouts above 0 (timeout <= max_timeout), the "
                            "rates 0 (no limit) or more")
    if min(web.max_body_bytes, web.max_header_bytes, web.max_streams) < 1 \
            or min(web.timeout, web.read_timeout, web.keep_alive) <= 0:
        raise SettingsError("web: max_body_bytes, max_header_bytes and max_streams must be at "
                            "least 1, the timeouts above 0")
    if runtime.grace < 0 or min(runtime.stop_timeout, runtime.health_grace,
                                runtime.healthy_deadline) <= 0:
        raise SettingsError("runtime: grace must be 0 or more, stop_timeout, health_grace and "
                            "healthy_deadline above 0")
    return Settings(profile, node, membership, limits, rpc, store, broker, debug, api, web,
                    runtime)


class SettingsError(ValueError):
    """A setting has an unknown name or a value of the wrong type or range."""


def membership_profile(profile: str = "lan", **overrides: Any) -> MembershipSettings:
    """Membership settings for a profile, with explicit overrides applied last."""
    if profile not in _MEMBERSHIP_PROFILES:
        raise SettingsError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = dict(_MEMBERSHIP_PROFILES[profile])
    values.update(overrides)
    return _replace_checked(MembershipSettings(), values, "membership")


def _replace_checked(obj: Any, values: dict[str, Any], section: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        f = known.get(key)
        if f is None:
            raise SettingsError(f"unknown setting {section}.{key}")
        default = getattr(obj, key)
        clean[key] = _coerce(value, default, f"{section}.{key}")
    return replace(obj, **clean)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Coerce a value (possibly a string from env/flags) to the type of its default."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            result = int(value)
            if isinstance(value, float) and result != value:
                raise ValueError(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
            if not math.isfinite(result):
                raise ValueError(value)
        elif kind is tuple:
            if isinstance(value, str):
                return tuple(x.strip() for x in value.split(",") if x.strip())
            if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
                return tuple(value)
            raise ValueError(value)
        elif kind is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        else:
            return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{name} must be {kind.__name__}, got {value!r}"
        ) from None
    if result < 0:
        raise SettingsError(f"{name} must not be negative, got {value!r}")
    return result


def as_dict(settings: Any) -> dict[str, Any]:
    """Settings as a plain dict (for --print-settings and reports)."""
    return dataclasses.asdict(settings)

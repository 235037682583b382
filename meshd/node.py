"""The node: composes identity, keyring, transports, membership and the control API.

Rules:
- Every component runs in this node's nursery; nothing outlives `Node.run`.
- Start-up refuses clearly (NodeError, one line) rather than half-starting: a data dir in use,
  a bad key file, a join that needs a secret we do not have, a name already taken.
- SIGINT/SIGTERM: leave the cluster gracefully (others see `left`), then return; the whole
  shutdown takes well under 2 s.
- State that must survive a restart (incarnation, last known peers, keyring) is written
  atomically to the data dir as it changes.
- Control operations belong to their components (`ops()` of each, see meshd/ops.py); the
  node only puts them on one table, which the control socket serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import datadir, namespaces, tlsconf, versions
from .auth.eviction import Evictor
from .auth.ops import AuthOps
from .auth.service import PIN_FILE, ROOT_TAG, AuthService
from .bot.ops import BotOps
from .broker.durable import DurableTopics
from .broker.log import BrokerFileError
from .broker.ops import BrokerOps
from .broker.service import BrokerService
from .control import ControlServer, socket_path
from .debug.ops import DebugOps
from .debug.service import DebugService
from .doctor.probe import DoctorProbe
from .errors import MeshError
from .gateway.upstream import Upstream
from .identity import Identity
from .membership.core import Membership, MembershipError
from .membership.identity import AliveVerifier
from .membership.ops import RESERVED_TAGS, MembershipOps
from .membership.service import MembershipService
from .node_ops import NodeOps, package_version
from .ops import OpTable
from .proxy.edge import EdgeProxy
from .proxy.tunnels import TunnelService
from .registry.ops import RegistryOps
from .registry.service import RegistryService
from .routing.ops import RoutingOps
from .routing.service import RoutingService
from .rpc.ops import RpcOps
from .rpc.service import RpcService
from .rpc.streams import StreamService
from .runtime.ops import RuntimeOps
from .runtime.service import RuntimeService
from .secure.keyops import KeyringOps
from .secure.keyring import Keyring, KeyringError, new_secret
from .settings import Settings
from .store.ops import StoreOps
from .store.persist import StoreFileError
from .store.service import StoreService
from .transport import addr as addrs
from .transport import advertise
from .transport.links import LinkManager
from .transport.udp import UdpTransport

log = logging.getLogger("meshd.node")

PEERS_SAVE_INTERVAL = 10.0  # s: the most often the member list goes to the state file


class NodeError(RuntimeError):
    """The node cannot start (or must stop); str() is one line for the operator."""


def parse_tags(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NodeError(f"tag {item!r} must look like key=value")
        if key in RESERVED_TAGS:
            raise NodeError(f"tag key {key!r} is reserved")
        tags[key] = value
    return tags


def _guess_advertise_host(bind_host: str) -> str:
    """The host to advertise when bound to all interfaces (see transport/advertise.py), with
    one log line saying which and why."""
    chosen = advertise.guess(ipv6=bind_host == "::")
    level = logging.WARNING if chosen.host.startswith("127.") else logging.INFO
    log.log(level, "%s", chosen.describe())
    return chosen.host


class Node:
    def __init__(self, settings: Settings, secret: bytes | None = None,
                 on_ready: Callable[[Node], None] | None = None) -> None:
        self.settings = settings
        self.secret = secret
        self.on_ready = on_ready
        node = settings.node
        self.data_dir = Path(node.data_dir).expanduser() if node.data_dir \
            else datadir.default_data_dir()
        self.name = node.name or socket.gethostname()
        self.started = time.time()
        self.identity: Identity
        self.keyring: Keyring
        self.core: Membership
        self.membership: MembershipService
        self.links: LinkManager
        self.udp: UdpTransport
        self.advertise = ""
        self.created_cluster = False
        self._lock = datadir.DataDirLock(self.data_dir)
        self._cancel: trio.CancelScope | None = None
        self._save_wanted = trio.Event()  # the state file is to be written at once
        self._state_lock = threading.Lock()
        self._conflict: str | None = None
        self._first_node = False
        self._seeds: set[str] = set()  # names of the seeds we joined through
        self._synced_boots: dict[str, str] = {}  # member -> the boot we synced with at its join
        self._peers_dirty = False  # the member list changed since the state file was written

    # --- start-up -----------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            datadir.ensure_dir(self.data_dir)
        except datadir.DataDirError as exc:
            raise NodeError(str(exc)) from None
        try:
            self._lock.acquire()
        except datadir.DataDirLocked as exc:
            raise NodeError(str(exc)) from None
        try:
            self.identity = Identity.load_or_create(self.data_dir)
            keyring = Keyring.load(self.data_dir)
            self.state = datadir.read_json(self.data_dir / datadir.STATE_FILE, {})
            self._saved_peers = [p for p in self.state.get("peers", []) if isinstance(p, str)]
        except (ValueError, KeyringError) as exc:
            raise NodeError(str(exc)) from None
        if keyring is None:
            if self.secret is not None:
                keyring = Keyring([self.secret])
            elif self.settings.node.join:
                raise NodeError("joining a cluster needs its secret: pass --secret-file PATH "
                                "or set MESHD_SECRET (`meshd invite` on a member prints it)")
            else:
                keyring = Keyring([new_secret()])
                self.created_cluster = True
        elif self.secret is not None and keyring.install(self.secret):
            keyring.use(self.secret)
        keyring.save(self.data_dir)
        self.keyring = keyring

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._prepare()
        try:
            await self._run(task_status)
        except BaseExceptionGroup as group:
            # a start-up refusal raised inside the node's nursery arrives wrapped
            err = _first(group, NodeError)
            if err is not None:
                raise err from None
            raise
        finally:
            self._save_state()
            self._lock.release()

    async def _run(self, task_status: Any) -> None:
        s = self.settings
        try:
            bind_host, bind_port = addrs.parse(s.node.bind, 7946)
        except addrs.AddressError as exc:
            raise NodeError(f"--bind: {exc}") from None
        port, listeners = await self._bind(bind_host, bind_port)
        if s.node.advertise.startswith(("ws://", "wss://")):
            if not s.node.ws_listen:
                raise NodeError("advertising a ws:// address needs --ws-listen HOST:PORT")
            adv_host, adv_port = "", 0
        elif s.node.advertise:
            try:
                adv_host, adv_port = addrs.parse(s.node.advertise, port)
            except addrs.AddressError as exc:
                raise NodeError(f"--advertise: {exc}") from None
        else:
            adv_host = bind_host if bind_host not in ("0.0.0.0", "::") \
                else _guess_advertise_host(bind_host)
            adv_port = port
        self.advertise = s.node.advertise.rstrip("/") if adv_host == "" else \
            addrs.format(adv_host, adv_port)
        tags = parse_tags(s.node.tags)
        tags["id"] = self.identity.node_id
        self.boot = os.urandom(6).hex()  # changes at every start: stale instances vanish
        tags["boot"] = self.boot
        tags["ver"] = package_version()  # `meshd members` and `meshd doctor` show skew
        tags[versions.TAG] = versions.tag()  # the protocol versions it speaks
        pin = self._auth_pin()
        if pin:
            tags[ROOT_TAG] = pin  # the auth root we trust (nodes joining through us pin it)
        incarnation = int(self.state.get("incarnation", -1)) + 1
        self.alive_verifier = AliveVerifier(self._key_revoked)
        try:
            self.core = Membership(self.name, self.advertise, s.membership,
                                   random.Random(), trio.current_time(), tags=tags,
                                   incarnation=incarnation, key=self.identity.public_bytes,
                                   sign=self.identity.sign, verify=self.alive_verifier)
        except MembershipError as exc:
            raise NodeError(str(exc)) from None
        self._save_state()
        self.links = LinkManager(self.identity, self.keyring, self.advertise,
                                 s.limits.max_frame_bytes, s.limits.handshake_timeout)
        self.links.expected_key = self.core.key_at
        self.links.node_of_key = self.core.name_of_key
        self.links.is_revoked = self._key_revoked
        self.membership = MembershipService(self.core, self.udp, self.links,
                                            s.limits.join_timeout)
        self.membership.on_change = self._members_changed
        self.registry = RegistryService(self.core, self.links, self.boot,
                                        ttl=s.rpc.instance_ttl,
                                        sync_interval=s.rpc.registry_sync_interval)
        self.debug = DebugService(self.name, self.core, self.links, s.debug, self._probe,
                                  self._stats)
        self.rpc = RpcService(self.registry, self.links, self.core, retries=s.rpc.retries,
                              selector=s.rpc.selector, max_body=s.rpc.max_body_bytes)
        self.debug.bind()  # this node's tasks log into its own buffer
        self.rpc.debug = self.debug
        if s.debug.tracing:
            self.links.tracer = self.debug.tracer
        self.registry.on_drop.append(self.debug.calls.forget)
        self.registry.on_log = lambda local, records: self.debug.take_logs(
            local.service, local.id, records)
        self.streams = StreamService(self.rpc)
        try:
            self.store = StoreService(self.core, self.links, self.data_dir, s.store)
        except StoreFileError as exc:
            raise NodeError(str(exc)) from None
        self.auth = AuthService(self.name, self.store, self.links, self.data_dir)
        self.broker = BrokerService(self.core, self.links, s.broker, self._route_cost,
                                    sync_interval=s.rpc.registry_sync_interval)
        try:
            self.durable = DurableTopics(self.broker, self.store, self.data_dir, s.broker)
        except BrokerFileError as exc:
            raise NodeError(str(exc)) from None
        if s.debug.tracing:
            self.broker.tracer = self.debug.tracer
        self.auth.vouched_roots = self._vouched_roots
        self.auth.seed_roots = self._seed_roots
        self.auth.on_pin = self._advertise_root
        self.auth.service_on_node = self._service_on_node
        self.auth_ops = AuthOps(self.auth, self.name, lambda: self.member_rows())
        self.evictor = Evictor(self.auth, self.core, self.membership, self.links)
        self.membership.accept_sender = self.evictor.accept_sender
        self.routing = RoutingService(self.core, self.store, measure=self.membership.measure)
        self.runtime = RuntimeService(
            self.name, self.store, self.core, self.data_dir, socket_path(self.data_dir),
            self.debug.take_logs, self.auth.service_token, s.runtime.grace,
            s.runtime.stop_timeout, self.registry.registered_groups, s.runtime.health_grace,
            s.runtime.healthy_deadline, s.runtime.keep_on_exit)
        self.membership.listeners.append(self.runtime.wake)
        self.links.my_name = self.name
        self.links.route = self._relay_route
        self.links.next_hop_for = self._next_hop_addr
        self.tunnels = TunnelService(self)
        self.edge = EdgeProxy(self)
        self.bootstrap_token: str | None = None
        self.rpc.auth = self.auth
        self.debug.auth = self.auth
        self.metrics_address = ""
        self.metrics_stats: dict[str, int] = {}
        self.api_address = ""
        self.api_stats: dict[str, int] = {}
        self.web_address = ""
        self.web_stats: dict[str, int] = {}
        self.upstream = Upstream(self, s.api)  # every node serves its HTTP services' streams
        self._add_exporters()
        self.registry.service_token = self.auth.service_token
        self.op_table = self._op_table()
        control = ControlServer(socket_path(self.data_dir), self.op_table)
        self.control_stats = control.stats
        self.membership.listeners.append(self._watch_conflicts)
        self.membership.listeners.append(self._sync_newcomer)
        self.membership.listeners.append(self._note_seed)
        self.membership.listeners.append(self.broker.on_member)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                await nursery.start(self.links.run, listeners)
                if s.node.proxy_listen:
                    try:
                        p_host, p_port = addrs.parse(s.node.proxy_listen)
                        tls = tlsconf.server_context(s.node.tls_cert, s.node.tls_key)
                        await nursery.start(self.edge.serve, p_host, p_port, tls)
                    except (OSError, addrs.AddressError, tlsconf.TlsError) as exc:
                        raise NodeError(f"--proxy-listen {s.node.proxy_listen}: {exc}"
                                        ) from None
                if s.node.ws_listen:
                    try:
                        ws_host, ws_port = addrs.parse(s.node.ws_listen)
                        await nursery.start(self.links.serve_ws, ws_host, ws_port)
                    except (OSError, addrs.AddressError) as exc:
                        raise NodeError(f"--ws-listen {s.node.ws_listen}: {exc}") from None
                await nursery.start(self.debug.run)
                if s.debug.metrics_listen:
                    await self._serve_metrics(nursery)
                if s.api.listen:
                    await self._serve_api(nursery)
                if s.web.listen:
                    await self._serve_web(nursery)
                await nursery.start(self.membership.run)
                await nursery.start(self.registry.run)
                await nursery.start(self.rpc.run)
                await nursery.start(self.store.run)
                await nursery.start(self.routing.run)
                await nursery.start(self.broker.run)
                await nursery.start(self.durable.run)
                await nursery.start(control.run)
                await nursery.start(self.evictor.run)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._save_peers)
                await self._initial_join()
                await nursery.start(self.runtime.run)
                if self._first_node and not self.auth.bootstrapped() \
                        and not self.auth.root_fingerprint:  # a given root: it joins later
                    # the first node of a cluster sets auth up (once: it is replicated)
                    self.bootstrap_token = (await self.auth.bootstrap())["token"]
                _release_startup_memory()
                if self.on_ready is not None:
                    self.on_ready(self)
                task_status.started(self)
        finally:
            self.udp.close()

    def _op_table(self) -> OpTable:
        """Every component's control operations on one table (served on the control socket
        and through the proxy to remote environments)."""
        s = self.settings
        self.membership_ops = MembershipOps(self.core, self.membership, self.routing.next_hop)
        self.node_ops = NodeOps(self, self._stats)
        store_ops = StoreOps(self.store, self.auth, self.name, self.auth_ops.require_admin)
        table = OpTable()
        table.node, table.auth = self.name, self.auth
        for component in (
                self.node_ops, self.membership_ops,
                KeyringOps(self.keyring, self.data_dir, self.core, self.links,
                           self._key_revoked),
                RoutingOps(self.core, self.links, self.routing),
                RegistryOps(self.registry, self.rpc, accounts=self.auth.account_counts,
                            may_read=self.auth.may_read_services, store_keys=store_ops.counts),
                RpcOps(self.rpc, self.streams, s.rpc.default_timeout),
                store_ops,
                BrokerOps(self.broker, self.durable, self.auth, self.name,
                          self.auth_ops.require_admin),
                RuntimeOps(self.runtime, self.auth, self.name, self.auth_ops.require_admin),
                BotOps(self.store, self.auth_ops.require_admin),
                DebugOps(self.debug),
                DoctorProbe(self.core, self.links, package_version(), self.keyring),
                self.tunnels, self.auth_ops):
            table.add(component.ops())
        return table

    def _stats(self) -> dict[str, int]:
        return {**self.udp.stats, **self.links.stats, **self.membership.stats,
                **self.store.stats, **self.store.rep.stats, **self.edge.stats,
                **self.alive_verifier.stats, **self.control_stats,
                **self.registry.replicator.stats, **self.auth.stats,
                **self.broker.stats, **self.broker.interest.stats, **self.durable.stats,
                **self.durable.origin.stats, **self.rpc.stats, **self.debug.stats,
                **getattr(self, "otlp_stats", {}), **self.metrics_stats, **self.api_stats,
                **self.web_stats, **self.runtime.stats,
                **self.upstream.stats,
                "suspicions": self.core.suspicions, "refutations": self.core.refutations,
                **{f"push_pulls_{k}": n for k, n in self.core.push_pulls.items()},
                "broker_pending": sum(len(c.pending) for c in
                                      self.durable.origin.consumers.values())}

    def _probe(self) -> dict[str, Any]:
        """What a stats sample reports of the node's components."""
        st = self.store.rep.state
        try:
            store_bytes = os.path.getsize(self.store.db.path)
        except OSError:
            store_bytes = 0
        return {"links": len({id(v) for v in self.links.links.values()}),
                "members": self.debug.members_by_state(),
                "store_records": sum(len(t.records) for t in st.tables.values()),
                "store_bytes": store_bytes,
                "services": len(self.registry.local),
                "version": package_version(), "load1": round(os.getloadavg()[0], 2)}

    def _add_exporters(self) -> None:
        endpoint = self.settings.debug.otlp_endpoint
        if endpoint:
            from .debug import otlp
            try:
                otlp.check_available()
            except RuntimeError as exc:
                raise NodeError(str(exc)) from None
            exporter = otlp.OtlpExporter(endpoint, self.debug.spans, self.name,
                                         calls=self.debug.calls, sampler=self.debug.sampler)
            self.otlp_stats = exporter.stats
            self.debug.exporters.append(exporter.run)

    async def _serve_metrics(self, nursery: trio.Nursery) -> None:
        from .debug.metrics import MetricsExporter
        s = self.settings
        try:
            host, port = addrs.parse(s.debug.metrics_listen)
            tls = tlsconf.server_context(s.node.tls_cert, s.node.tls_key)
            exporter = MetricsExporter(self.debug, self.metrics_stats)
            await nursery.start(exporter.serve, host, port, tls)
        except (OSError, addrs.AddressError, tlsconf.TlsError) as exc:
            raise NodeError(f"--metrics-listen {s.debug.metrics_listen}: {exc}") from None
        self.metrics_address = addrs.format(host, exporter.port)

    async def _serve_api(self, nursery: trio.Nursery) -> None:
        from .gateway.app import Gateway
        s = self.settings

        def app() -> Gateway:
            gateway = Gateway(self, s.api, self.upstream)
            self.api_stats.update(gateway.stats)
            gateway.stats = self.api_stats
            return gateway
        self.api_address = await self._serve_http(nursery, "api", s.api, app, self.api_stats)

    async def _serve_web(self, nursery: trio.Nursery) -> None:
        from .web.app import Dashboard
        s = self.settings
        self.web_address = await self._serve_http(
            nursery, "web", s.web, lambda: Dashboard(self.op_table, s.web, self.web_stats),
            self.web_stats)

    async def _serve_http(self, nursery: trio.Nursery, name: str, settings: Any,
                          make_app: Any, stats: dict[str, int]) -> str:
        """An HTTP listener (the gateway, the dashboard) at settings.listen; its address."""
        from .gateway.server import GatewayServer
        try:
            namespaces.check(settings.namespace)
            host, port = addrs.parse(settings.listen)
            tls = tlsconf.server_context(self.settings.node.tls_cert,
                                         self.settings.node.tls_key)
            server = GatewayServer(make_app(), settings, stats, name=name)
            await nursery.start(server.serve, host, port, tls)
            if tls is None and not addrs.is_loopback(host):
                log.warning("--%s-listen %s serves plain HTTP beyond loopback: tokens cross "
                            "the network in clear; give --tls-cert and --tls-key", name,
                            settings.listen)
        except (OSError, addrs.AddressError, tlsconf.TlsError, MeshError) as exc:
            detail = exc.detail if isinstance(exc, MeshError) else exc
            raise NodeError(f"--{name}-listen {settings.listen}: {detail}") from None
        return addrs.format(host, server.port)

    async def _bind(self, host: str, port: int) -> tuple[int, list[trio.SocketListener]]:
        """UDP and TCP on the same port. With port 0 the kernel picks the UDP port, which
        may be taken for TCP: then try again with another."""
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            self.udp = UdpTransport(self.keyring, self.settings.limits.max_udp_packet,
                                    self.settings.limits.udp_replay_window)
            try:
                chosen = await self.udp.bind(host, port)
            except OSError as exc:
                raise NodeError(f"cannot bind UDP {self.settings.node.bind}: "
                                f"{exc.strerror}") from None
            try:
                return chosen, await trio.open_tcp_listeners(chosen, host=host)
            except OSError as exc:
                self.udp.close()
                if attempt == attempts - 1:
                    raise NodeError(f"cannot listen on TCP {addrs.format(host, chosen)}: "
                                    f"{exc.strerror}") from None
        raise AssertionError("unreachable")

    async def _initial_join(self) -> None:
        explicit = list(self.settings.node.join)
        seeds = explicit or [p for p in self._saved_peers if p != self.advertise]
        self._first_node = not seeds and not self.state.get("peers")
        if not seeds:
            return
        ok, errors = await self.membership.join(seeds)
        if self._conflict:
            raise NodeError(self._conflict)
        if ok == 0 and explicit:
            raise NodeError("could not join: " + "; ".join(errors))
        for line in errors:
            log.warning("join %s", line)

    def _auth_pin(self) -> str:
        """The auth root this data dir trusts; `--auth-root` pins it on first use and must
        agree with it afterwards."""
        pin = _read_text(self.data_dir / PIN_FILE)
        given = self.settings.node.auth_root.strip().lower()
        if given:
            if len(given) != 16 or any(c not in "0123456789abcdef" for c in given):
                raise NodeError("--auth-root is the 16 hex digits `meshd invite` prints")
            if pin and pin != given:
                raise NodeError(f"this data dir trusts auth root {pin}, not {given}; a node "
                                "cannot move to another cluster's auth (use a new data dir)")
            if not pin:
                datadir.write_secret_file(self.data_dir / PIN_FILE, given.encode())
                pin = given
        return pin

    def _vouched_roots(self) -> list[str]:
        """The auth root fingerprints the live members other than us trust (their tags,
        which each signs with its identity key): whether the cluster has auth at all."""
        return [m.tags[ROOT_TAG] for m in self.core.member_list()
                if m.name != self.name and m.state == 0 and m.tags.get(ROOT_TAG)]

    def _seed_roots(self) -> list[str]:
        """The auth roots of the seeds we joined through (the nodes at the addresses the
        operator gave): the only members whose word pins our root."""
        seeds = set(self.state.get("seeds", [])) | self._seeds
        return [m.tags[ROOT_TAG] for m in self.core.member_list()
                if m.name in seeds and m.state in (0, 1) and m.tags.get(ROOT_TAG)]

    def _note_seed(self, ev: Any) -> None:
        """A join through a seed succeeded: remember whom we joined through."""
        if ev.kind == "join-ok" and ev.node and ev.node not in self._seeds:
            self._seeds.add(ev.node)
            self._schedule_save()

    def _advertise_root(self, pin: str) -> None:
        if self.core.me.tags.get(ROOT_TAG) != pin:
            self.membership.set_tags({**self.core.me.tags, ROOT_TAG: pin})
            self._schedule_save()  # the incarnation moved: a restart must start above it

    def _service_on_node(self, service: str, node: str, namespace: str) -> bool:
        """Whether `service` of `namespace` is registered on `node` (a service token is for
        one namespace)."""
        return any(i.get("node") == node for i in self.registry.instances(service, namespace))

    def _key_revoked(self, key: bytes) -> bool:
        """Whether an identity key was revoked by an admin (`meshd nodes revoke`)."""
        auth = getattr(self, "auth", None)
        return auth is not None and auth.node_revoked(key)

    def _relay_route(self, addr: str) -> tuple[str, str] | None:
        """(next hop address, destination) when `addr` is reached through relays."""
        dest = self.core.name_at(addr)
        if dest is None:
            return None
        route = self.routing.table.route(dest)
        if route is None or route.next_hop == dest:
            return None
        hop = self.core.members.get(route.next_hop)
        return (hop.addr, dest) if hop is not None else None

    def _route_cost(self, dest: str) -> float | None:
        """Seconds to reach `dest` along the routes (0 for a member not measured yet)."""
        route = self.routing.table.route(dest)
        return route.cost if route is not None else 0.0

    def _next_hop_addr(self, dest: str) -> str | None:
        route = self.routing.table.route(dest)
        if route is None:
            member = self.core.members.get(dest)
            return member.addr if member is not None and member.state in (0, 1) else None
        hop = self.core.members.get(route.next_hop)
        return hop.addr if hop is not None else None

    def _sync_newcomer(self, ev: Any) -> None:
        """A member (re)joined: exchange store and registry state with it right away, so it
        does not wait for the next random anti-entropy round (auth state lives there). Not
        when it comes back from a death it refuted in the same run (its `boot` tag is the
        one we synced with): it lost nothing, and every member syncing with it at once
        would load a node that was just too slow to answer."""
        if ev.kind != "join" or ev.node == self.name:
            return
        boot = ev.tags.get("boot")
        if boot is not None:
            if self._synced_boots.get(ev.node) == boot:
                return
            if len(self._synced_boots) > 2 * len(self.core.members) + 64:
                self._synced_boots = {n: b for n, b in self._synced_boots.items()
                                      if n in self.core.members}
            self._synced_boots[ev.node] = boot
        if getattr(self.store, "_nursery", None) is not None:
            self.store._send(self.store.rep.sync_with(ev.addr))
        if getattr(self.registry, "_nursery", None) is not None:
            self.registry._send_all(self.registry.replicator.sync_with(ev.addr))

    def _watch_conflicts(self, ev: Any) -> None:
        if ev.kind == "conflict" and ev.node == self.name and self._conflict is None:
            self._conflict = (f"the name {self.name!r} is already used by {ev.addr} in "
                              "this cluster; pick another with --name")
            log.error("%s", self._conflict)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %s: leaving the cluster", signal.Signals(signum).name)
                await self.shutdown()
                return

    async def shutdown(self) -> None:
        with trio.move_on_after(1.5):
            # returns once every live member confirmed the leave, or after 1 s
            await self.membership.leave(timeout=1.0)
        self._save_state()
        if self._cancel is not None:
            self._cancel.cancel()

    # --- persistence ---------------------------------------------------------------------

    def _schedule_save(self) -> None:
        """Write the state file soon, from the saver task's worker thread."""
        self._save_wanted.set()

    def _members_changed(self) -> None:
        """Membership changed: our own incarnation is saved at once (a restart must start
        above it); the peers list at most every PEERS_SAVE_INTERVAL (_save_peers). Writing
        the state file (two fsyncs) at every suspicion and refutation, on the event loop,
        blocked it in a suspicion storm, which made more of them."""
        core = getattr(self, "core", None)
        if core is not None and core.me.incarnation != self.state.get("incarnation"):
            self._schedule_save()
        else:
            self._peers_dirty = True

    async def _save_peers(self) -> None:
        """The saver: at once when asked, else every PEERS_SAVE_INTERVAL if the members
        changed; the file is written in a worker thread (fsyncs take long on a busy disk)."""
        while True:
            with trio.move_on_after(PEERS_SAVE_INTERVAL):
                await self._save_wanted.wait()
            if not self._save_wanted.is_set() and not self._peers_dirty:
                continue
            self._save_wanted = trio.Event()
            self._peers_dirty = False
            state = self._state_now()
            if state is not None and state != self.state:
                await trio.to_thread.run_sync(self._write_state, state)
                self.state = state

    def _state_now(self) -> dict[str, Any] | None:
        core = getattr(self, "core", None)
        if core is None:
            return None
        peers = [m.addr for m in core.member_list()
                 if m.name != core.me.name and m.state == 0]
        if not peers:  # alone for now: keep the last known peers for the next restart
            peers = list(self.state.get("peers", []))
        seeds = sorted(set(self.state.get("seeds", [])) | self._seeds)[:16]
        return {"incarnation": core.me.incarnation, "peers": peers[:64],
                "node_id": self.identity.node_id, "name": self.name, "seeds": seeds}

    def _write_state(self, state: dict[str, Any]) -> None:
        with self._state_lock:  # the saver's thread and a start-up or shutdown save
            datadir.write_json(self.data_dir / datadir.STATE_FILE, state)

    def _save_state(self) -> None:
        """Write the state file now, on this thread (start-up and shutdown)."""
        state = self._state_now()
        if state is not None and state != self.state:
            self._write_state(state)
            self.state = state

    # --- views (the CLI's `meshd up` prints them) ------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.node_ops.status_now()

    def member_rows(self) -> list[dict[str, Any]]:
        return self.membership_ops.member_rows()


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _first(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if found is not None:
                return found
    return None


def _release_startup_memory() -> None:
    """Start-up (imports, first sync) leaves freed heap behind; hand it back to the OS so an
    idle node stays small (glibc's malloc_trim; a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

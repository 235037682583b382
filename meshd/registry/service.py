"""Registry shell: local service sessions, gossip of registry deltas, anti-entropy.

Rules:
- A service process registers over the control socket and keeps that connection as its
  session. The instance leaves the registry when the connection closes or sends nothing for
  `ttl` seconds (the SDK heartbeats every ttl/3).
- Replication is decided by the sans-IO Replicator (replication.py): pushes of changes and
  digest anti-entropy. This shell carries its messages, one per channel "registry".
- Malformed registry messages from a peer close that channel; they never reach the state.
- An instance registers into one namespace ("default" unless it names another); reads
  (`instances`, `services`, `watch`) select one namespace, so `greeter` in `team-a` and in
  `team-b` are different services. Tunnels are registered in "default".
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio

from meshd import namespaces, wire
from meshd.errors import MeshError, bad_request, unavailable
from meshd.hlc import HLC
from meshd.membership.core import Membership
from meshd.membership.messages import ALIVE, SUSPECT
from meshd.ops import REQUEST_PGID, Conn
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from .core import Entry, WireError, select, view
from .replication import Replicator

log = logging.getLogger("meshd.registry")
CHANNEL = "registry"
MAX_NAME = 128
MAX_TAGS = 64  # tags listed per service (its instances' metadata as key=value)


@dataclass
class LocalInstance:
    id: str
    service: str
    conn: Conn
    last_seen: float
    namespace: str = namespaces.DEFAULT  # the namespace it registered in
    pending: dict[int, trio.MemorySendChannel[Any]] = field(default_factory=dict)
    streams: dict[int, Any] = field(default_factory=dict)  # sid -> rpc.streams.LocalStream
    next_call: int = 0
    closed: bool = False
    # set once the process got its registration reply: nothing else may reach it before
    ready: trio.Event = field(default_factory=trio.Event)
    stats: Any = None  # its call stats (debug.stats.InstanceStats), made at its first call
    pgid: int = 0  # its process's group (peer credentials; 0: unknown): the runtime's health


def instance_view(e: Entry) -> dict[str, Any]:
    return view(e)


class RegistryService:
    def __init__(self, core: Membership, links: LinkManager, boot: str,
                 ttl: float = 15.0, sync_interval: float = 5.0, fanout: int = 3) -> None:
        self.core = core
        self.links = links
        self.boot = boot
        self.ttl = ttl
        self.sync_interval = sync_interval
        self.fanout = fanout
        self.node = core.me.name
        self.hlc = HLC(self.node, lambda: int(time.time() * 1000))
        self.rng = random.Random()
        self.replicator = Replicator(self.node, self.hlc, self._peer_addrs, self.rng,
                                     trio.current_time(), fanout, sync_interval)
        self.replicator.on_change = self._notify
        self.replicator.boot = boot
        self.state = self.replicator.state
        self.local: dict[str, LocalInstance] = {}
        self.on_drop: list[Callable[[str], None]] = []  # called with a dropped instance id
        # a local instance's log records (frames {"log": [...]}): (instance, records)
        self.on_log: Callable[[LocalInstance, Any], None] | None = None
        self._version = 0
        self._cache: dict[tuple[str | None, str | None],
                          tuple[Any, list[dict[str, Any]]]] = {}
        self.stats = {"registry_bad_messages": 0, "registry_messages_in": 0,
                      "registry_messages_out": 0}
        self._watchers: list[tuple[trio.MemorySendChannel[dict[str, Any]], str | None]] = []
        self._nursery: trio.Nursery | None = None
        self.on_local_change: Callable[[], None] | None = None
        # issues the token a registering service runs with (set by the node when auth is on)
        self.service_token: Callable[[str, str], Any] | None = None  # (service, namespace)
        links.handlers[CHANNEL] = self._serve_channel

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._expire_loop)
            task_status.started()

    # --- views ---------------------------------------------------------------------------

    def boots(self) -> dict[str, str]:
        """Live nodes and their boot ids, from the membership view."""
        out = {}
        for m in self.core.member_list():
            if m.state in (ALIVE, SUSPECT):
                boot = m.tags.get("boot")
                if boot:
                    out[m.name] = boot
        return out

    def registered_groups(self) -> set[int]:
        """Process groups with a live registration on this node (the runtime's health
        check: a managed replica is healthy while its group holds one)."""
        return {local.pgid for local in self.local.values() if local.pgid and not local.closed}

    def instances(self, service: str | None = None,
                  namespace: str | None = namespaces.DEFAULT) -> list[dict[str, Any]]:
        """Served instances (of one service) in `namespace` (None: in every namespace).
        Cached until the registry or the membership changes: this is on every call's
        path."""
        key = (service, self._version, self.core.member_version)
        cached = self._cache.get((service, namespace))
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = self._instances(service, namespace)
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[(service, namespace)] = (key, rows)
        return rows

    def _instances(self, service: str | None, namespace: str | None) -> list[dict[str, Any]]:
        live = self.state.live(self.boots())
        rows = select([instance_view(e) for e in live], service, namespace)
        return sorted(rows, key=lambda r: (r.get("namespace", ""), r.get("service", ""),
                                           r.get("node", ""), r.get("id", "")))

    def services(self, namespace: str = namespaces.DEFAULT) -> list[dict[str, Any]]:
        """The services of `namespace`: instances, nodes and versions of each, and its tags
        (its instances' metadata as "key=value", at most MAX_TAGS)."""
        by_name: dict[str, dict[str, Any]] = {}
        for inst in self.instances(None, namespace):
            s = by_name.setdefault(inst["service"], {"name": inst["service"], "instances": 0,
                                                     "nodes": set(), "versions": set(),
                                                     "tags": set()})
            s["instances"] += 1
            s["nodes"].add(inst["node"])
            s["versions"].add(inst.get("version", ""))
            meta = inst.get("metadata")
            if isinstance(meta, dict):
                s["tags"].update(f"{k}={v}" for k, v in meta.items())
        return [{"name": s["name"], "instances": s["instances"], "nodes": sorted(s["nodes"]),
                 "versions": sorted(s["versions"]), "namespace": namespace,
                 "tags": sorted(s["tags"])[:MAX_TAGS]}
                for s in by_name.values()]

    def namespace_counts(self) -> list[dict[str, Any]]:
        """Each namespace with served instances (and "default" always), with its counts of
        services and instances."""
        counts: dict[str, tuple[set[str], int]] = {namespaces.DEFAULT: (set(), 0)}
        for inst in self.instances(None, None):
            names, n = counts.get(inst["namespace"], (set(), 0))
            names.add(inst["service"])
            counts[inst["namespace"]] = (names, n + 1)
        return [{"name": ns, "services": len(names), "instances": n}
                for ns, (names, n) in sorted(counts.items())]

    # --- local registration --------------------------------------------------------------

    async def serve_session(self, args: dict[str, Any], conn: Conn) -> None:
        """Control session "service.register": the connection is the instance's lifeline."""
        record = _validate_registration(args)
        inst_id = f"{record['service']}-{os.urandom(4).hex()}"
        record.update({"id": inst_id, "node": self.node, "address": self.core.me.addr})
        local = LocalInstance(inst_id, record["service"], conn, trio.current_time(),
                              record["namespace"], pgid=REQUEST_PGID.get())
        self.local[inst_id] = local
        self._write(inst_id, record)
        log.info("registered %s (%s in %s) from a local process", inst_id, record["service"],
                 record["namespace"])
        try:
            token = await self.service_token(record["service"], record["namespace"]) \
                if self.service_token is not None else None
            await conn.reply({"id": inst_id, "node": self.node, "ttl": self.ttl,
                              "token": token, "namespace": record["namespace"]})
            local.ready.set()
            while True:
                msg = await conn.receive()
                local.last_seen = trio.current_time()
                if not isinstance(msg, dict):
                    continue
                if "reply" in msg:
                    waiter = local.pending.pop(msg.get("reply"), None)  # type: ignore[arg-type]
                    if waiter is not None:
                        waiter.send_nowait(msg)
                elif "sid" in msg:
                    stream = local.streams.get(msg.get("sid"))  # type: ignore[arg-type]
                    if stream is not None:
                        stream.on_frame(msg)  # never blocks: streams use credits
                elif "ping" in msg:
                    await conn.send({"pong": msg["ping"]})
                elif "log" in msg and self.on_log is not None:
                    self.on_log(local, msg["log"])  # its logging output (debug buffers)
        except (EOFError, MeshError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._drop_local(local, "its process disconnected")

    def _drop_local(self, local: LocalInstance, why: str) -> None:
        if local.closed:
            return
        local.closed = True
        local.ready.set()  # whoever waits for it sees it closed
        self.local.pop(local.id, None)
        for gone in self.on_drop:
            gone(local.id)
        for waiter in local.pending.values():
            waiter.send_nowait({"ok": False, "error": unavailable(
                f"instance {local.id} went away ({why})", id="meshd.rpc").to_dict()})
        local.pending.clear()
        for stream in list(local.streams.values()):
            stream.gone()
        local.streams.clear()
        self._write(local.id, None)
        log.info("deregistered %s: %s", local.id, why)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.ttl / 3))
            now = trio.current_time()
            for local in list(self.local.values()):
                if now - local.last_seen > self.ttl:
                    self._drop_local(local, f"no heartbeat for {self.ttl:.0f} s")
                    with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                        await local.conn.aclose()
            self.state.collect(trio.current_time(), self.replicator.wall())

    def _write(self, inst_id: str, record: dict[str, Any] | None) -> None:
        self._send_all(self.replicator.write(inst_id, self.boot, record,
                                             trio.current_time()))

    # --- replication (the sans-IO Replicator decides; this sends) -------------------------

    def _notify(self, kind: str, e: Entry, old: Entry | None) -> None:
        self._version += 1
        if e.value:
            inst = instance_view(e)
        else:  # a delete: what it deleted, where we knew it (its service and namespace)
            inst = {"id": e.key.split("/", 1)[1], "node": e.owner}
            if old is not None and old.value:
                gone = instance_view(old)
                inst.update(service=gone.get("service"), namespace=gone["namespace"])
        event = {"kind": kind, "key": e.key, "instance": inst}
        for w, ns in list(self._watchers):
            if ns is not None and inst.get("namespace") != ns:
                continue
            try:
                w.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.remove((w, ns))

    @contextlib.contextmanager
    def watch(self, namespace: str | None = None
              ) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Registry changes as they happen (in `namespace` only; None: every one), until the
        block ends (then the watcher is gone at once). A delete of an instance this node
        never knew has no namespace: only unfiltered watchers see it."""
        send, recv = trio.open_memory_channel[dict[str, Any]](1000)
        entry = (send, namespace)
        self._watchers.append(entry)
        try:
            yield recv
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove(entry)
            send.close()

    def _peer_addrs(self) -> list[str]:
        return self.core.alive_peers()

    def _send_all(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        if self._nursery is None:
            return
        for addr, msg in sends:
            self._nursery.start_soon(self._send_one, addr, cbor2.dumps(msg))

    async def _send_one(self, addr: str, payload: bytes) -> None:
        try:
            with trio.fail_after(5):
                async with await self.links.open_channel(addr, CHANNEL) as ch:
                    await ch.send(payload)
            self.stats["registry_messages_out"] += 1
        except (LinkError, ChannelClosed, trio.TooSlowError) as exc:
            log.debug("registry message to %s failed: %s", addr, exc)

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep_until(self.replicator.next_deadline())
            self._send_all(self.replicator.tick(trio.current_time()))

    async def _serve_channel(self, ch: Channel) -> None:
        try:
            msg = _decode(await ch.receive())
            self._send_all(self.replicator.receive(ch.peer_addr, msg, trio.current_time()))
            self.stats["registry_messages_in"] += 1
        except (WireError, ValueError, TypeError) as exc:
            self.stats["registry_bad_messages"] += 1
            log.debug("bad registry message from %s: %s", ch.peer_addr, exc)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        msg = wire.loads(data, max_depth=32)
    except wire.WireError as exc:
        raise WireError(str(exc)) from None
    if not isinstance(msg, dict):
        raise WireError("not a map")
    return msg


def _validate_registration(args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("service")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "/" in name:
        raise bad_request("service name must be 1..128 characters without '/'")
    version = args.get("version", "")
    if not isinstance(version, str):
        raise bad_request("version must be text")
    endpoints = args.get("endpoints", [])
    if not isinstance(endpoints, list):
        raise bad_request("endpoints must be a list")
    clean = []
    for ep in endpoints:
        if not isinstance(ep, dict) or not isinstance(ep.get("name"), str):
            raise bad_request("each endpoint needs a name")
        if not 0 < len(ep["name"]) <= MAX_NAME:
            raise bad_request(f"endpoint names are 1..{MAX_NAME} characters")
        clean.append({"name": ep["name"], "request": ep.get("request"),
                      "response": ep.get("response"), "metadata": ep.get("metadata") or {},
                      "stream": bool(ep.get("stream", False))})
    metadata = args.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise bad_request("metadata must be a map")
    return {"service": name, "version": version, "endpoints": clean, "metadata": metadata,
            "namespace": namespaces.check(args.get("namespace"))}

"""RPC: route a call to an instance of a service, here or across the mesh.

Rules:
- The caller's daemon picks the instance (random, round-robin or nearest by RTT), skipping
  instances that failed to connect in the last `skip_for` seconds. A local instance is called
  through its control session without touching the network; a remote one through link
  channel "rpc" to its node's daemon, which hands it to its local session. All calls to one
  peer share one long-lived channel, each request and reply tagged with an id.
- Every call has a deadline; each hop is given the time that remains. A call still running at
  its deadline fails with 408.
- A call is retried on another instance (up to `retries` times) only when it was certainly
  not delivered: the link could not be opened or the far daemon no longer has the instance.
  Once delivered, a failure is the caller's answer (503 if the instance died mid-call).
- Errors are MeshError maps: 400 bad request, 404 unknown service/endpoint, 408 timeout,
  500 handler error, 503 unavailable.
- A peer daemon has at most MAX_CALLS_PER_CHANNEL calls in flight here; beyond that its
  channel is not read (flow control holds it back) until calls finish.
- A call names its namespace ("default" unless told): only that namespace's instances are
  candidates. The far daemon is handed an instance id, so the namespace never travels:
  the daemon serving the instance authorizes the caller in the namespace that instance
  registered in (its local registration), never in one a caller names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from typing import Any

import trio

from meshd import namespaces, wire
from meshd.debug import traces
from meshd.debug.stats import LOCAL, OTHER
from meshd.errors import MeshError, bad_request, not_found, unavailable
from meshd.membership.core import Membership
from meshd.ops import REQUEST_REMOTE, Finish, acting_node
from meshd.registry.service import LocalInstance, RegistryService
from meshd.registry.versions import version_matches
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from . import remote
from .deadlines import Deadlines

log = logging.getLogger("meshd.rpc")
# How deep a body handed to a service may nest: its frame ({"call", "body", ...}) adds a
# level, and a service decodes frames no deeper than meshd.wire's 32 (a deeper one would end
# its session). Bodies from the control socket cannot be deeper (its decoder is at 32 with
# the request around them); those from other nodes are checked.
BODY_DEPTH = 30
MAX_NAME = 128  # service and endpoint names (as the registry takes them)
CHANNEL = "rpc"
MAX_CALLS_PER_CHANNEL = 1024  # calls one peer daemon has in flight here at once
SELECTORS = ("random", "roundrobin", "nearest")


class NotDelivered(Exception):
    """The request never reached a service process: safe to try another instance."""


def _endpoint_names(inst: dict[str, Any]) -> list[str]:
    return [ep.get("name") for ep in inst.get("endpoints", [])]


class RpcService:
    def __init__(self, registry: RegistryService, links: LinkManager, core: Membership,
                 retries: int = 2, selector: str = "random", max_body: int = 1 << 20,
                 skip_for: float = 10.0) -> None:
        self.registry = registry
        self.links = links
        self.core = core
        self.retries = retries
        self.selector = selector
        self.max_body = max_body
        self.skip_for = skip_for
        self.rng = random.Random()
        self._rr = 0
        self._failing: dict[str, float] = {}
        self._muxes: dict[str, _Mux] = {}
        self._mux_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.auth: Any = None  # AuthService, set by the node
        self.debug: Any = None  # DebugService (spans, call stats), set by the node
        self.stats = {"rpc_calls": 0, "rpc_errors": 0, "rpc_remote_served": 0,
                      "rpc_fast_calls": 0}
        # deadlines of fast calls; the expiry task is woken when an earlier one arrives
        self._deadlines = Deadlines()
        self._earlier = trio.Event()
        links.handlers[CHANNEL] = self._serve_channel

    # --- caller side ---------------------------------------------------------------------

    def check_body(self, body: Any) -> None:
        try:
            size = len(wire.dumps(body))
        except wire.WireError as exc:
            raise bad_request(f"request body cannot be sent: {exc}", id="meshd.rpc") from None
        if size > self.max_body:
            raise bad_request(f"request of {size} bytes exceeds the limit of {self.max_body} "
                              "bytes", id="meshd.rpc")

    def _pick(self, candidates: list[dict[str, Any]], tried: set[str],
              selector: str) -> dict[str, Any] | None:
        now = trio.current_time()
        fresh = [c for c in candidates if c["id"] not in tried]
        healthy = [c for c in fresh if self._failing.get(c["id"], -math.inf) < now]
        pool = healthy or fresh
        if not pool:
            return None
        if selector == "roundrobin":
            self._rr += 1
            return pool[self._rr % len(pool)]
        if selector == "nearest":
            def rtt(inst: dict[str, Any]) -> float:
                if inst["node"] == self.core.me.name:
                    return 0.0
                m = self.core.members.get(inst["node"])
                return m.rtt if m is not None and m.rtt is not None else math.inf
            best = min(rtt(c) for c in pool)
            pool = [c for c in pool if rtt(c) == best]
        return pool[self.rng.randrange(len(pool))]

    def node_addr(self, inst: dict[str, Any]) -> str:
        """Where the node of a registry instance is reached now (its registered address if
        the member is no longer known)."""
        member = self.core.members.get(inst["node"])
        return member.addr if member is not None else inst.get("address", "")

    def candidates(self, service: str, endpoint: str, namespace: str = namespaces.DEFAULT,
                   version: str = "") -> list[dict[str, Any]]:
        """Instances of `service` in `namespace` (of `version`, a prefix: see
        registry/versions.py) that serve `endpoint`; 404 naming what is missing."""
        instances = self.registry.instances(service, namespace)
        if version:
            instances = [i for i in instances if version_matches(version, i["version"])]
        if not instances:
            where = "" if namespace == namespaces.DEFAULT else f" in namespace {namespace!r}"
            what = f" of version {version}" if version else ""
            raise not_found(f"service {service!r} has no instances{what}{where}",
                            id="meshd.rpc")
        found = [i for i in instances if endpoint in _endpoint_names(i)]
        if not found:
            known = sorted({n for i in instances for n in _endpoint_names(i)})
            raise not_found(f"service {service!r} has no endpoint {endpoint!r}; known: "
                            f"{', '.join(known) or '(none)'}", id="meshd.rpc")
        return found

    async def call(self, service: str, endpoint: str, body: Any, timeout: float,
                   meta: dict[str, str] | None = None, selector: str | None = None,
                   token: str | None = None, namespace: str = namespaces.DEFAULT,
                   version: str = "") -> Any:
        self.stats["rpc_calls"] += 1
        meta = dict(meta or {})
        traced = self.debug is not None
        if traced:
            ctx, parent = self.debug.tracer.begin(meta)
            wall, t0 = time.time(), time.perf_counter()
        try:
            result = await self._call(service, endpoint, body, timeout, meta,
                                      selector or self.selector, token, namespace, version)
        except MeshError as exc:
            self.stats["rpc_errors"] += 1
            if traced:
                self._client_done(ctx, parent, service, endpoint, wall, t0, exc.status,
                                  exc.detail, resolved=not (exc.id == "meshd.rpc"
                                                            and exc.status in (400, 404)))
            raise
        if traced:
            self._client_done(ctx, parent, service, endpoint, wall, t0)
        return result

    def _client_done(self, ctx: traces.Context, parent: str, service: str, endpoint: str,
                     wall: float, t0: float, status: int = 0, error: str = "",
                     resolved: bool = True) -> None:
        """A call made through this daemon ended: its client span and stats. A call that
        named no service or endpoint there is (`resolved` false) is counted under
        "_other": names a caller makes up never become series of their own."""
        took = time.perf_counter() - t0
        if not resolved:
            service = endpoint = OTHER
        self.debug.calls.observe("client", service, endpoint, status, took)
        if ctx.sampled or status:
            self.debug.tracer.end(ctx, parent, f"call {service}/{endpoint}", "client",
                                  service, wall, took, status, error)

    def _local_done(self, local: LocalInstance, trace: tuple[Any, ...], reply: Any,
                    exc: MeshError | None) -> None:
        """A fast local call ended: counted once (side "local": this node made and served
        it), its instance's stats, and its client and handler spans if they are kept."""
        ctx, parent, t0, service, endpoint = trace
        debug = self.debug
        took = time.perf_counter() - t0
        status = exc.status if exc is not None else 0
        st = local.stats
        if st is not None:
            debug.calls.end(st, endpoint, status, took)
        debug.calls.observe(LOCAL, service, endpoint, status, took)
        if ctx.sampled or status:  # both spans in one record, made into spans when read
            handler, span = _handler_of(reply, took)
            debug.tracer.local_call(ctx, parent, service, endpoint, local.id,
                                    time.time() - took, took, handler, span, status,
                                    exc.detail if exc is not None else "")

    def _instance_begins(self, local: LocalInstance) -> None:
        """A call is handed to `local`: in flight in its stats (kept on the instance, so a
        call needs no lookup)."""
        if local.stats is None:
            local.stats = self.debug.calls.begin(local.id, local.service)
        else:
            local.stats.in_flight += 1

    def _served(self, local: LocalInstance, endpoint: str, ctx: traces.Context | None,
                t0: float, reply: Any) -> None:
        """A call a local instance answered (or failed): its instance and server stats,
        and the handler's span (timed by the SDK: "took" in its reply)."""
        debug = self.debug
        took = time.perf_counter() - t0
        status, error = _outcome(reply)
        st = local.stats
        if st is not None:
            debug.calls.end(st, endpoint, status, took)
        debug.calls.observe("server", local.service, endpoint, status, took)
        if ctx is not None and (ctx.sampled or status):
            handler, span = _handler_of(reply, took)
            debug.tracer.child_span(ctx, f"handler {endpoint}", "handler", local.service,
                                    time.time() - handler, handler, status, error,
                                    {"instance": local.id}, span)

    async def _call(self, service: str, endpoint: str, body: Any, timeout: float,
                    meta: dict[str, str], selector: str, token: str | None,
                    namespace: str, version: str = "", deadline: float | None = None,
                    tried: tuple[str, ...] = ()) -> Any:
        """`deadline` and `tried`: a call whose first try already went (remote.RemoteCall's
        retry): it keeps its deadline, and each instance it tried counts as one of its tries
        and is not picked again."""
        if len(service) > MAX_NAME or len(endpoint) > MAX_NAME:
            raise bad_request(f"service and endpoint names are at most {MAX_NAME} characters",
                              id="meshd.rpc")
        if not (isinstance(timeout, int | float) and 0 < timeout <= 3600):
            raise bad_request("timeout must be between 0 and 3600 seconds", id="meshd.rpc")
        if selector not in SELECTORS:
            raise bad_request(f"selector must be one of {', '.join(SELECTORS)}", id="meshd.rpc")
        self.check_body(body)
        if deadline is None:
            deadline = trio.current_time() + timeout
        self._stamp(meta)
        candidates = self.candidates(service, endpoint, namespaces.check(namespace), version)
        picked: set[str] = set(tried)
        last = "no instance answered"
        for _ in range(self.retries + 1 - len(tried)):
            inst = self._pick(candidates, picked, selector)
            if inst is None:
                break
            picked.add(inst["id"])
            try:
                with trio.fail_at(deadline):
                    return await self._call_instance(inst, endpoint, body, meta, deadline,
                                                     token)
            except NotDelivered as exc:
                self._failing[inst["id"]] = trio.current_time() + self.skip_for
                last = str(exc)
                log.info("call to %s.%s not delivered to %s: %s; trying another", service,
                         endpoint, inst["id"], exc)
            except trio.TooSlowError:
                raise _too_slow(f"{service}.{endpoint}", timeout) from None
        raise unavailable(f"no instance of {service!r} could be reached: {last}",
                          id="meshd.rpc")

    async def _call_instance(self, inst: dict[str, Any], endpoint: str, body: Any,
                             meta: dict[str, str], deadline: float,
                             token: str | None = None) -> Any:
        if inst["node"] == self.core.me.name:
            local = self.registry.local.get(inst["id"])
            if local is None:
                raise NotDelivered("the instance is gone")
            who = self._authorize(token, acting_node(self.core.me.name), inst["service"],
                                  endpoint, local.namespace)
            if who:
                meta = {**meta, "caller": who}
            ctx = traces.parse(meta.get(traces.TRACEPARENT)) if self.debug else None
            return _unwrap(await self._call_local(local, endpoint, body, meta, deadline, ctx))
        mux = await self._mux_to(self.node_addr(inst))
        request = {"instance": inst["id"], "endpoint": endpoint, "body": body, "meta": meta,
                   "timeout": deadline - trio.current_time()}
        if token:
            request["token"] = token
        elif REQUEST_REMOTE.get():  # an outside caller without a token acts as nobody
            request["anonymous"] = True
        # relays on the way record their span of the call (tagged frames: traces.RELAYED)
        relayed = traces.RELAYED.set(meta.get(traces.TRACEPARENT, ""))
        try:
            reply = await mux.call(request, inst["node"])
        finally:
            traces.RELAYED.reset(relayed)
        if isinstance(reply, dict) and reply.get("undelivered"):
            raise NotDelivered(str(reply.get("error", {}).get("detail", "instance gone")))
        return _unwrap(reply)

    async def _mux_to(self, addr: str) -> _Mux:
        mux = self._muxes.get(addr)
        if mux is not None and not mux.broken:
            return mux
        lock = self._mux_locks.setdefault(addr, trio.Lock())
        async with lock:
            mux = self._muxes.get(addr)
            if mux is not None and not mux.broken:
                return mux
            try:
                ch = await self.links.open_channel(addr, CHANNEL)
            except (LinkError, ChannelClosed) as exc:
                raise NotDelivered(str(exc)) from None
            mux = _Mux(ch)
            self._muxes[addr] = mux
            assert self._nursery is not None
            self._nursery.start_soon(mux.read_replies)
            return mux

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_fast_calls)
            task_status.started()
            await trio.sleep_forever()

    def _stamp(self, meta: dict[str, Any]) -> dict[str, Any]:
        """What every call's metadata carries from the calling daemon: a trace id (unless
        the caller gave one) and this node as the caller's node, never what a client
        claims."""
        tp = meta.get(traces.TRACEPARENT)
        meta.setdefault("trace-id", tp[3:35] if isinstance(tp, str) and len(tp) == 55
                        else os.urandom(16).hex())
        meta["caller-node"] = self.core.me.name
        return meta

    async def _call_local(self, local: LocalInstance, endpoint: str, body: Any,
                          meta: dict[str, Any], deadline: float,
                          ctx: traces.Context | None = None) -> dict[str, Any]:
        """call_local, counted and traced (with debug on): `ctx` is the span the handler's
        is a child of (this daemon's client or server span of the call)."""
        if self.debug is None:
            return await call_local(local, endpoint, body, meta, deadline)
        self._instance_begins(local)
        t0 = time.perf_counter()
        reply: Any = None
        try:
            reply = await call_local(local, endpoint, body, meta, deadline)
            return reply
        except trio.Cancelled:
            if trio.current_time() >= deadline:  # the deadline passed (not a hang-up)
                reply = {"ok": False, "error": {"status": 408,
                                                "detail": "no answer before the deadline"}}
            raise
        finally:
            if reply is None:  # not delivered, or the caller went: not the service's doing
                local.stats.in_flight -= 1
            else:
                self._served(local, endpoint, ctx, t0, reply)

    # --- fast path: local calls answered from callbacks ----------------------------------

    def call_fast(self, service: str, endpoint: str, body: Any, timeout: Any,
                  meta: dict[str, Any], selector: Any, token: str | None, namespace: str,
                  finish: Finish, size: int) -> bool:
        """Hand a call to an instance without a task: the service's reply (or a 408
        at the deadline, or a 503 if the instance goes) is passed to `finish`. A local
        instance only when it is ready and the caller may call it; one on another node
        when its call channel takes the request at once (remote.call_remote). Otherwise
        False, and the ordinary path (`call`) runs, with its retries and its errors.
        `size` bounds the body's encoded size (the request's): only a larger one is
        measured. A call it declines leaves the round-robin turn to the ordinary path."""
        turn = self._rr
        taken = self._call_fast(service, endpoint, body, timeout, meta, selector, token,
                                namespace, finish, size)
        if not taken:
            self._rr = turn
        return taken

    def _call_fast(self, service: str, endpoint: str, body: Any, timeout: Any,
                   meta: dict[str, Any], selector: Any, token: str | None, namespace: str,
                   finish: Finish, size: int) -> bool:
        selector = selector or self.selector
        if len(service) > MAX_NAME or len(endpoint) > MAX_NAME:
            return False
        if self._nursery is None or not (isinstance(timeout, int | float) and
                                         0 < timeout <= 3600) or selector not in SELECTORS:
            return False
        me = self.core.me.name
        try:
            candidates = self.candidates(service, endpoint, namespace)
            inst = self._pick(candidates, set(), selector)
            if inst is not None and inst["node"] != me:
                mux = self._muxes.get(self.node_addr(inst))
                if mux is None:
                    return False  # the ordinary path opens the channel
                if size > self.max_body:
                    self.check_body(body)
                return remote.call_remote(self, mux, inst, endpoint, body, timeout, meta,
                                          token, finish, {"service": service,
                                                          "selector": selector,
                                                          "namespace": namespace})
            local = self.registry.local.get(inst["id"]) if inst is not None else None
            if local is None or local.closed or not local.ready.is_set() or \
                    not getattr(local.conn.framed, "flushing", False):
                return False
            who = self._authorize(token, acting_node(me), local.service, endpoint,
                                  local.namespace)
            if size > self.max_body:
                self.check_body(body)
        except MeshError:
            return False
        meta = dict(meta)
        trace = None
        if self.debug is not None:
            ctx, parent = self.debug.tracer.begin(meta)
            trace = (ctx, parent, time.perf_counter(), service, endpoint)
            self._instance_begins(local)
        meta = self._stamp(meta)
        if who:
            meta["caller"] = who
        local.next_call += 1
        call = _FastCall(self, local, local.next_call, finish, f"{service}.{endpoint}",
                         timeout, trace)
        deadline = trio.current_time() + timeout
        try:
            local.conn.framed.write_nowait({"call": call.cid, "endpoint": endpoint,
                                            "body": body, "meta": meta, "timeout": timeout})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if local.stats is not None and trace is not None:
                local.stats.in_flight -= 1
            return False
        local.pending[call.cid] = call  # type: ignore[assignment]
        self.stats["rpc_calls"] += 1
        self.stats["rpc_fast_calls"] += 1
        self._add_deadline(deadline, call)
        return True

    def _add_deadline(self, deadline: float, call: Any) -> None:
        """Expire `call` (its `expire()`, unless `finished`) at `deadline`."""
        if self._deadlines.add(deadline, call):
            self._earlier.set()

    async def _expire_fast_calls(self) -> None:
        """Fail fast calls still unanswered at their deadline (408)."""
        while True:
            for call in self._deadlines.due(trio.current_time()):
                try:
                    call.expire()
                except Exception:  # one call's failure ends that call, never this task
                    log.exception("expiring a fast call failed")
            self._earlier = trio.Event()
            with trio.move_on_at(self._deadlines.next_at()):
                await self._earlier.wait()

    async def call_instance(self, inst: dict[str, Any], endpoint: str, body: Any,
                            timeout: float, token: str | None = None) -> Any:
        """Call one given instance (health checks) with the caller's `token` (None: as this
        node): no selection, no retry."""
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                return await self._call_instance(inst, endpoint, body, {}, deadline, token)
        except NotDelivered as exc:
            raise unavailable(str(exc), id="meshd.rpc") from None
        except trio.TooSlowError:
            raise MeshError(408, f"no answer within {timeout:g} s", id="meshd.rpc") from None

    # --- callee side ---------------------------------------------------------------------

    async def _serve_channel(self, ch: Channel) -> None:
        """A caller daemon's call channel: many calls, each tagged with an id, served
        concurrently; replies go back tagged with the same id. One call's failure is that
        call's error reply; it never ends the channel the other calls share."""
        slots = trio.Semaphore(MAX_CALLS_PER_CHANNEL)
        # most requests are handed to their service in the channel's reader (remote.serve);
        # those it declines come here
        ch.hook = lambda data: remote.serve(self, ch, data, slots)

        async def serve(data: bytes) -> None:
            try:
                await self._serve_one(ch, data)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()  # full: stop reading, the window holds the caller back
                try:
                    data = await ch.receive()
                except ChannelClosed:
                    slots.release()
                    return  # in-flight calls finish in the nursery; nothing escapes it
                nursery.start_soon(serve, data)
                # the other calls that came with it start now too, so their writes to the
                # services go out together (call_local queues them for the flusher)
                while True:
                    try:
                        slots.acquire_nowait()
                    except trio.WouldBlock:
                        break
                    more = ch.receive_ready()
                    if more is None:
                        slots.release()
                        break
                    nursery.start_soon(serve, more)

    async def _serve_one(self, ch: Channel, data: bytes) -> None:
        rid = None
        try:
            req = wire.loads(data, max_depth=64)
            rid = req.get("id") if isinstance(req, dict) else None
            if type(rid) is not int or not isinstance(req.get("instance"), str) \
                    or not isinstance(req.get("endpoint"), str):
                raise ValueError("bad request")
            timeout = float(req.get("timeout", 10.0))
            if timeout != timeout:  # NaN
                raise ValueError("bad timeout")
            meta = req.get("meta") if isinstance(req.get("meta"), dict) else {}
        except (ValueError, TypeError, OverflowError):
            reply: dict[str, Any] = {"ok": False, "error": bad_request(
                "malformed rpc request", id="meshd.rpc").to_dict()}
        else:
            meta = {k: v for k, v in meta.items() if isinstance(k, str)}
            meta["caller-node"] = ch.peer_node or "?"  # from the link, never from the caller
            try:
                reply = await self._serve_request(req, timeout, meta, ch.peer_node)
            except Exception:  # a bug serving one call must not end the shared channel
                log.exception("serving a call from %s failed", ch.peer_addr)
                reply = {"ok": False, "error": MeshError(500, "internal error serving the "
                                                              "call", id="meshd.rpc").to_dict()}
        reply["id"] = rid
        try:
            payload = wire.dumps(reply)
        except wire.WireError as exc:
            payload = wire.dumps({"id": rid, "ok": False, "error": MeshError(
                500, f"the reply cannot be sent: {exc}", id="meshd.rpc").to_dict()})
        with contextlib.suppress(ChannelClosed):
            await ch.send(payload)

    def _authorize(self, token: Any, node: str | None, service: str, endpoint: str,
                   namespace: str) -> str | None:
        """Check the caller against the rules of the instance's namespace; returns who it is
        (an account or node:NAME)."""
        if self.auth is None:
            return None
        who = self.auth.check(token if isinstance(token, str) else None, node,
                              ("service", service, endpoint), namespace=namespace)
        return who.id

    async def _serve_request(self, req: dict[str, Any], timeout: float,
                             meta: dict[str, Any], peer_node: str | None) -> dict[str, Any]:
        local = self.registry.local.get(req["instance"])
        if local is not None:
            try:
                who = self._authorize(req.get("token"),
                                      None if req.get("anonymous") is True else peer_node,
                                      local.service, req["endpoint"], local.namespace)
            except MeshError as exc:
                return {"ok": False, "error": exc.to_dict()}
            if who:
                meta = {**meta, "caller": who}
        if local is None:
            return {"ok": False, "undelivered": True, "error": unavailable(
                f"instance {req['instance']} is not on node {self.core.me.name}",
                id="meshd.rpc").to_dict()}
        try:  # a body the service could not decode would end its session: refuse it here
            wire.check_plain(req.get("body"), BODY_DEPTH)
        except wire.WireError as exc:
            return {"ok": False, "error": bad_request(f"request body: {exc}",
                                                      id="meshd.rpc").to_dict()}
        self.stats["rpc_remote_served"] += 1
        deadline = trio.current_time() + max(0.0, min(timeout, 3600.0))
        if self.debug is None:
            return await self._serve_local(local, req, meta, deadline)
        ctx, parent = self.debug.tracer.begin(meta)  # the server span, the handler's parent
        traces.RELAYED.set(meta.get(traces.TRACEPARENT, ""))  # the reply's relays: its children
        wall, t0 = time.time(), time.perf_counter()
        reply = await self._serve_local(local, req, meta, deadline, ctx)
        status, error = _outcome(reply)
        self.debug.tracer.end(
            ctx, parent, f"serve {local.service}/{req['endpoint']}", "server", local.service,
            wall, time.perf_counter() - t0, status, error, {"caller-node": str(peer_node)})
        return reply

    async def _serve_local(self, local: LocalInstance, req: dict[str, Any],
                           meta: dict[str, Any], deadline: float,
                           ctx: traces.Context | None = None) -> dict[str, Any]:
        try:
            with trio.fail_at(deadline):
                return await self._call_local(local, req["endpoint"], req.get("body"), meta,
                                              deadline, ctx)
        except NotDelivered:
            return {"ok": False, "undelivered": True, "error": unavailable(
                f"instance {req['instance']} went away", id="meshd.rpc").to_dict()}
        except trio.TooSlowError:
            return {"ok": False, "error": MeshError(
                408, f"{local.service}.{req['endpoint']} did not answer before the deadline",
                id="meshd.rpc").to_dict()}


class _Mux:
    """All calls from this daemon to one peer daemon share one channel, tagged by id."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.next_id = 0
        self.pending: dict[int, trio.MemorySendChannel[Any]] = {}
        self.broken = False
        ch.hook = self.on_reply  # replies are handed over in the link's reader

    def on_reply(self, data: bytes) -> bool:
        """Hand a reply to its caller (read_replies' rules); always takes it."""
        try:
            reply = wire.loads(data, max_depth=64)
        except wire.WireError:
            return True
        rid = reply.get("id") if isinstance(reply, dict) else None
        if type(rid) is not int:
            return True
        waiter = self.pending.pop(rid, None)
        if waiter is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                waiter.send_nowait(reply)
        return True

    async def call(self, request: dict[str, Any], node: str) -> Any:
        self.next_id += 1
        rid = request["id"] = self.next_id
        send, recv = trio.open_memory_channel[Any](1)
        self.pending[rid] = send
        try:
            try:
                await self.ch.send(wire.dumps(request))
            except ChannelClosed as exc:
                self.broken = True
                raise NotDelivered(str(exc)) from None
            reply = await recv.receive()
        finally:
            self.pending.pop(rid, None)
        if reply is None:
            raise unavailable(f"node {node} went away before replying", id="meshd.rpc")
        return reply

    async def read_replies(self) -> None:
        """Hand each reply to its caller. A reply that does not decode, names no pending
        call (unknown, not an integer, or a duplicate) is dropped: a peer's bad reply fails
        at most the call it names, never this node."""
        try:
            while True:  # the replies the hook could not take (the link sends from tasks)
                self.on_reply(await self.ch.receive())
        except ChannelClosed:
            pass
        finally:
            self.broken = True
            for waiter in self.pending.values():
                with contextlib.suppress(trio.WouldBlock):
                    waiter.send_nowait(None)


class _FastCall:
    """A local call taken by RpcService.call_fast: waits in the instance's `pending` (the
    registry hands it the service's reply, or a 503 when the instance goes, through
    send_nowait) and in the deadline heap."""

    __slots__ = ("cid", "finish", "finished", "local", "name", "rpc", "timeout", "trace")

    def __init__(self, rpc: RpcService, local: LocalInstance, cid: int, finish: Finish,
                 name: str, timeout: float, trace: tuple[Any, ...] | None = None) -> None:
        self.rpc = rpc
        self.local = local
        self.cid = cid
        self.finish = finish
        self.name = name
        self.timeout = timeout
        self.finished = False
        # with debug on: (client span context, its parent id, perf start, service, endpoint)
        self.trace = trace

    def send_nowait(self, reply: Any) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            body = _unwrap(reply)
        except MeshError as exc:
            self.rpc.stats["rpc_errors"] += 1
            self._account(reply, exc)
            self.finish(None, exc)
            return
        self._account(reply)
        self.finish(body, None)

    def _account(self, reply: Any, exc: MeshError | None = None) -> None:
        if self.trace is not None:
            self.rpc._local_done(self.local, self.trace, reply, exc)

    def expire(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.local.pending.get(self.cid) is self:
            del self.local.pending[self.cid]
        self.rpc.stats["rpc_errors"] += 1
        exc = _too_slow(self.name, self.timeout)
        self._account({"ok": False, "error": exc.to_dict()}, exc)
        self.finish(None, exc)


async def call_local(local: LocalInstance, endpoint: str, body: Any, meta: dict[str, Any],
                     deadline: float) -> dict[str, Any]:
    """Hand a call to a local service process over its control session; await the reply."""
    if local.closed:
        raise NotDelivered("the instance is gone")
    if not local.ready.is_set():  # registered, but its registration reply is not out yet
        await local.ready.wait()
        if local.closed:
            raise NotDelivered("the instance is gone")
    local.next_call += 1
    cid = local.next_call
    send, recv = trio.open_memory_channel[dict[str, Any]](1)
    local.pending[cid] = send
    try:
        try:
            item = {"call": cid, "endpoint": endpoint, "body": body, "meta": meta,
                    "timeout": max(0.0, deadline - trio.current_time())}
            # queued for the session's flusher when it has one: calls started together
            # (a link's group of frames: RpcService._serve_channel) leave in one write
            if not local.conn.send_nowait(item):
                await local.conn.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise NotDelivered("the service process is gone") from None
        reply = await recv.receive()
    finally:
        local.pending.pop(cid, None)
    if not isinstance(reply, dict):
        return {"ok": False, "error": MeshError(500, "malformed reply from the service",
                                                id="meshd.rpc").to_dict()}
    return reply


def _too_slow(name: str, timeout: float) -> MeshError:
    return MeshError(408, f"call to {name} did not finish within {timeout:g} s",
                     id="meshd.rpc")


def _outcome(reply: Any) -> tuple[int, str]:
    """(status, error) of a service's reply: (0, "") when it succeeded."""
    if isinstance(reply, dict) and reply.get("ok"):
        return 0, ""
    err = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(err, dict):
        return 500, ""
    status = err.get("status", 500)
    return (status if type(status) is int else 500), str(err.get("detail", ""))


def _handler_of(reply: Any, took: float) -> tuple[float, str]:
    """(seconds, span id) of the handler, as the service reported them with its reply (a
    traced call): its time when plausible (else the whole call's), its span id if any."""
    if type(reply) is not dict:
        return took, ""
    handler, span = reply.get("took"), reply.get("span")
    return (handler if type(handler) is float and 0 <= handler <= took else took,
            span if type(span) is str else "")


def _unwrap(reply: Any) -> Any:
    if not isinstance(reply, dict):
        raise MeshError(500, "malformed reply", id="meshd.rpc")
    if reply.get("ok"):
        return reply.get("body")
    raise MeshError.from_dict(reply.get("error"))

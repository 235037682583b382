"""Calls across the mesh answered from callbacks: the caller's and the callee's fast paths.

A call between two daemons used to take a task on each side (the caller's request task, a
task per call at the callee) and two more wake-ups to hand the reply between tasks (the
channel's reader, the waiting call). On a busy two-core host each wake-up costs as much as
the work, so the latency of one call was mostly scheduling. Here the request and the reply
are handled where they arrive, as the local fast path (RpcService.call_fast) does.

Rules:
- Caller: `call_remote` takes a call whose picked instance is on another node only when
  the call channel to that node is open and takes the request now
  (`Channel.send_nowait`); else it returns False and nothing happened (the ordinary path
  runs). The reply, read in the channel's hook (`_Mux.on_reply`), is passed to `finish`.
  A reply saying the instance is not there any more (undelivered) is retried the ordinary
  way, that instance skipped (as RpcService._call does); the deadline (408) and a lost
  channel (503) end it as they end an ordinary call.
- Callee: `serve` takes a request in the call channel's hook only when it is well formed,
  its instance is here and ready, the caller may call it and the channel has a free call
  slot (MAX_CALLS_PER_CHANNEL); anything else returns False and goes the ordinary way
  (RpcService._serve_one), which gives the same answers, errors included. The service's
  reply goes back tagged with the request's id by `send_nowait`, or from a task when the
  window is short; at the deadline the caller gets the 408 the ordinary path gives.
- Both count and trace the call as the ordinary path does (stats, spans with debug on).
  A sampled call on a link relayed with trace tags goes the ordinary way on both sides
  (its frames carry its trace context to the relays, which only a task's send does).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from meshd import wire
from meshd.debug import traces
from meshd.errors import MeshError, unavailable
from meshd.ops import REQUEST_REMOTE, Finish
from meshd.transport.links import CHUNK, Channel, ChannelClosed

if TYPE_CHECKING:
    from meshd.registry.service import LocalInstance

    from .service import RpcService, _Mux

log = logging.getLogger("meshd.rpc")
BODY_DEPTH = 30  # as service.BODY_DEPTH (a frame around the body adds a level)


def _needs_tags(ch: Channel, meta: dict[str, Any]) -> bool:
    """Whether the call's frames must carry its trace context to relays (a sampled call on
    a tagged relayed link): then only the ordinary path sends them."""
    if not ch.link.tagged:
        return False
    tp = meta.get(traces.TRACEPARENT)
    return isinstance(tp, str) and len(tp) == 55 and tp[-1] == "1"


# --- caller side -------------------------------------------------------------------------------

def call_remote(rpc: RpcService, mux: _Mux, inst: dict[str, Any], endpoint: str, body: Any,
                timeout: float, meta: dict[str, Any], token: str | None,
                finish: Finish, retry: dict[str, Any]) -> bool:
    """Send a call to `inst` (on the node `mux` reaches) without a task; False when the
    channel cannot take it now (nothing was sent). `retry` holds RpcService._call's
    arguments but the ones given here, for a retry the ordinary way."""
    if mux.broken or not mux.ch.link.can_queue:
        return False
    meta = dict(meta)
    trace = None
    if rpc.debug is not None:
        ctx, parent = rpc.debug.tracer.begin(meta)
        trace = (ctx, parent, time.time(), time.perf_counter())
    rpc._stamp(meta)
    if _needs_tags(mux.ch, meta):
        return False
    request = {"instance": inst["id"], "endpoint": endpoint, "body": body, "meta": meta,
               "timeout": float(timeout)}
    remote = REQUEST_REMOTE.get()
    if token:
        request["token"] = token
    elif remote:  # an outside caller without a token acts as nobody
        request["anonymous"] = True
    rid = request["id"] = mux.next_id + 1
    try:
        data = wire.dumps(request)
    except wire.WireError:
        return False
    if not mux.ch.send_nowait(data):
        return False
    mux.next_id = rid
    deadline = trio.current_time() + timeout
    call = RemoteCall(rpc, mux, rid, inst, endpoint, body, timeout, deadline, meta, token,
                      remote, finish, trace, retry)
    mux.pending[rid] = call  # type: ignore[assignment]
    rpc.stats["rpc_calls"] += 1
    rpc.stats["rpc_fast_calls"] += 1
    rpc._add_deadline(deadline, call)
    return True


class RemoteCall:
    """A call taken by `call_remote`: waits in its mux's `pending` (the reply, or None when
    the channel is lost, comes through send_nowait) and in the deadline heap."""

    __slots__ = ("body", "deadline", "endpoint", "finish", "finished", "inst", "meta", "mux",
                 "remote", "retry", "rid", "rpc", "timeout", "token", "trace")

    def __init__(self, rpc: RpcService, mux: _Mux, rid: int, inst: dict[str, Any],
                 endpoint: str, body: Any, timeout: float, deadline: float,
                 meta: dict[str, Any], token: str | None, remote: bool, finish: Finish,
                 trace: tuple[Any, ...] | None, retry: dict[str, Any]) -> None:
        self.rpc, self.mux, self.rid, self.inst = rpc, mux, rid, inst
        self.endpoint, self.body, self.timeout, self.meta = endpoint, body, timeout, meta
        self.deadline = deadline
        self.token, self.remote, self.finish, self.trace = token, remote, finish, trace
        self.retry = retry
        self.finished = False

    def send_nowait(self, reply: Any) -> None:
        if self.finished:
            return
        self.finished = True
        if reply is None:
            self.mux.broken = True
            self._end(None, unavailable(f"node {self.inst['node']} went away before "
                                        "replying", id="meshd.rpc"))
            return
        if isinstance(reply, dict) and reply.get("undelivered"):
            rpc = self.rpc
            rpc._failing[self.inst["id"]] = trio.current_time() + rpc.skip_for
            assert rpc._nursery is not None
            rpc._nursery.start_soon(self._again)
            return
        from .service import _unwrap

        try:
            body = _unwrap(reply)
        except MeshError as exc:
            self._end(None, exc)
            return
        self._end(body, None)

    def expire(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.mux.pending.pop(self.rid, None)
        from .service import _too_slow

        self._end(None, _too_slow(f"{self.inst['service']}.{self.endpoint}", self.timeout))

    async def _again(self) -> None:
        """The instance was gone: the ordinary path picks another (skipping this one), in
        what remains of the call's deadline, the fast try counted as one of its tries. It
        never raises: its errors are the call's answer."""
        REQUEST_REMOTE.set(self.remote)
        r = self.retry
        try:
            result = await self.rpc._call(r["service"], self.endpoint, self.body,
                                          self.timeout, dict(self.meta), r["selector"],
                                          self.token, r["namespace"], deadline=self.deadline,
                                          tried=(self.inst["id"],))
        except MeshError as exc:
            self._end(None, exc)
            return
        except Exception:  # a bug retrying one call fails that call, never the service
            log.exception("retrying a call to %s failed", self.inst.get("service"))
            self._end(None, MeshError(500, "internal error retrying the call",
                                      id="meshd.rpc"))
            return
        self._end(result, None)

    def _end(self, result: Any, exc: MeshError | None) -> None:
        rpc = self.rpc
        if exc is not None:
            rpc.stats["rpc_errors"] += 1
        if self.trace is not None:
            ctx, parent, wall, t0 = self.trace
            rpc._client_done(ctx, parent, self.inst["service"], self.endpoint, wall, t0,
                             exc.status if exc is not None else 0,
                             exc.detail if exc is not None else "")
        try:
            self.finish(result, exc)
        except Exception:  # the caller's end failed: that call's, not the caller of _end's
            log.exception("answering a call to %s failed", self.inst.get("service"))


# --- callee side -------------------------------------------------------------------------------

def serve(rpc: RpcService, ch: Channel, data: bytes, slots: trio.Semaphore) -> bool:
    """Hand a request that came on call channel `ch` to its local instance without a task;
    False (nothing done) when it must go the ordinary way."""
    if rpc._nursery is None:
        return False
    try:
        req = wire.loads(data, max_depth=64)
    except wire.WireError:
        return False
    if not isinstance(req, dict):
        return False
    rid, inst_id, endpoint = req.get("id"), req.get("instance"), req.get("endpoint")
    timeout = req.get("timeout", 10.0)
    if type(rid) is not int or not isinstance(inst_id, str) or \
            not isinstance(endpoint, str) or type(timeout) not in (int, float) or \
            timeout != timeout:
        return False
    try:
        seconds = max(0.0, min(float(timeout), 3600.0))
    except OverflowError:  # an integer too big for a float: the ordinary path's 400
        return False
    local = rpc.registry.local.get(inst_id)
    if local is None or local.closed or not local.ready.is_set() or \
            not getattr(local.conn.framed, "flushing", False):
        return False
    given = req.get("meta")
    meta = {k: v for k, v in given.items() if isinstance(k, str)} \
        if isinstance(given, dict) else {}
    peer = ch.peer_node
    meta["caller-node"] = peer or "?"  # from the link, never from the caller
    if _needs_tags(ch, meta):
        return False
    try:
        who = rpc._authorize(req.get("token"), None if req.get("anonymous") is True else peer,
                             local.service, endpoint, local.namespace)
        wire.check_plain(req.get("body"), BODY_DEPTH)
    except (MeshError, wire.WireError):
        return False  # the ordinary path answers with the reason
    # everything that may decline is checked: from here the slot is the call's, given
    # back when its reply was sent (ServedCall), or now if anything fails on the way
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        return False
    try:
        taken = _hand_over(rpc, ch, local, req, rid, endpoint, meta, peer, who, seconds,
                           slots)
    except BaseException:
        slots.release()
        raise
    if not taken:
        slots.release()
    return taken


def _hand_over(rpc: RpcService, ch: Channel, local: LocalInstance, req: dict[str, Any],
               rid: int, endpoint: str, meta: dict[str, Any], peer: str | None,
               who: str | None, seconds: float, slots: trio.Semaphore) -> bool:
    """serve's part once the call holds its slot: True when the service has the call;
    False (the caller gives the slot back) when its session is gone."""
    if who:
        meta["caller"] = who
    now = trio.current_time()
    deadline = now + seconds
    trace = None
    if rpc.debug is not None:
        ctx, parent = rpc.debug.tracer.begin(meta)
        rpc._instance_begins(local)
        trace = (ctx, parent, time.time(), time.perf_counter())
    local.next_call += 1
    call = ServedCall(rpc, ch, local, local.next_call, rid, endpoint, peer, slots,
                      trace, deadline)
    try:
        local.conn.framed.write_nowait({"call": call.cid, "endpoint": endpoint,
                                        "body": req.get("body"), "meta": meta,
                                        "timeout": seconds})
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        if trace is not None and local.stats is not None:
            local.stats.in_flight -= 1
        return False
    local.pending[call.cid] = call  # type: ignore[assignment]
    rpc.stats["rpc_remote_served"] += 1
    rpc._add_deadline(deadline, call)
    return True


class ServedCall:
    """A request taken by `serve`: waits in the instance's `pending` (the registry hands
    it the service's reply, or a 503 when the instance goes) and in the deadline heap. It
    holds its channel's call slot until its reply was sent (or given up at the deadline):
    a caller that grants no window for replies gets no more than MAX_CALLS_PER_CHANNEL
    of them waiting here, as on the ordinary path."""

    __slots__ = ("ch", "cid", "deadline", "endpoint", "finished", "local", "peer", "rid",
                 "rpc", "slots", "trace")

    def __init__(self, rpc: RpcService, ch: Channel, local: LocalInstance, cid: int, rid: int,
                 endpoint: str, peer: str | None, slots: trio.Semaphore,
                 trace: tuple[Any, ...] | None, deadline: float) -> None:
        self.rpc, self.ch, self.local, self.cid, self.rid = rpc, ch, local, cid, rid
        self.endpoint, self.peer, self.slots, self.trace = endpoint, peer, slots, trace
        self.deadline = deadline
        self.finished = False

    def send_nowait(self, reply: Any) -> None:
        if self.finished:
            return
        self.finished = True
        if not isinstance(reply, dict):
            reply = {"ok": False, "error": MeshError(500, "malformed reply from the service",
                                                     id="meshd.rpc").to_dict()}
        self._reply(reply)

    def expire(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.local.pending.get(self.cid) is self:
            del self.local.pending[self.cid]
        self._reply({"ok": False, "error": MeshError(
            408, f"{self.local.service}.{self.endpoint} did not answer before the deadline",
            id="meshd.rpc").to_dict()})

    def _reply(self, reply: dict[str, Any]) -> None:
        handed = False  # to _send_reply, which gives the slot back once it is done
        try:
            handed = self._send(reply)
        finally:
            if not handed:
                self.slots.release()

    def _send(self, reply: dict[str, Any]) -> bool:
        """Send the reply now if the window has room; else hand it to a task that sends it
        before the call's deadline (True: that task has the slot now)."""
        rpc = self.rpc
        if self.trace is not None:
            from .service import _outcome

            ctx, parent, wall, t0 = self.trace
            rpc._served(self.local, self.endpoint, ctx, t0, reply)
            status, error = _outcome(reply)
            rpc.debug.tracer.end(ctx, parent, f"serve {self.local.service}/{self.endpoint}",
                                 "server", self.local.service, wall, time.perf_counter() - t0,
                                 status, error, {"caller-node": str(self.peer)})
        reply["id"] = self.rid
        try:
            payload = wire.dumps(reply)
        except wire.WireError as exc:
            payload = wire.dumps({"id": self.rid, "ok": False, "error": MeshError(
                500, f"the reply cannot be sent: {exc}", id="meshd.rpc").to_dict()})
        ch = self.ch
        if ch.send_nowait(payload):
            return False
        if ch._closed_local or ch._closed_remote or ch.link.closed or rpc._nursery is None \
                or trio.current_time() >= self.deadline:
            return False  # the caller is gone, or gave up on the call: nobody to answer
        rpc._nursery.start_soon(_send_reply, ch, payload, self.deadline, self.slots)
        return True


async def _send_reply(ch: Channel, payload: bytes, deadline: float,
                      slots: trio.Semaphore) -> None:
    """A reply the window had no room for at once: sent before the call's deadline (the
    caller has given up on it by then), holding the call's slot until it is done."""
    try:
        with trio.move_on_at(deadline) as scope:
            with contextlib.suppress(ChannelClosed):
                await ch.send(payload)
        if scope.cancelled_caught and len(payload) > CHUNK:
            # some of its frames may have gone: the rest of the channel cannot be trusted.
            # It ends for the caller (CLOSE) and for its handler here (as if the caller
            # had closed it: a forgotten channel hears nothing more)
            await ch.aclose()
            ch._on_close()
    finally:
        slots.release()

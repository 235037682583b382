"""Streams: server-streaming and bidirectional calls, relayed hop by hop with backpressure.

Frames between a caller and its daemon, and between daemons on link channel "rpc-stream":
    {"msg": body}      one message          {"end": true}   no more messages from this side
    {"error": {...}}   the call failed (ends the stream)
Between a daemon and the service process (its control session), tagged with the stream id:
    daemon -> service: {"open": sid, "endpoint", "meta", "credit"}, {"sid", "msg"},
                       {"sid", "end"}, {"sid", "credit": n}
    service -> daemon: {"sid", "msg"}, {"sid", "end"}, {"sid", "error"}, {"sid", "credit": n}
Rules:
- Every hop forwards one message at a time through bounded buffers, secure-link channels
  (flow-controlled) and sockets, so a slow reader slows the writer instead of filling memory.
- The stream ends for both sides when either sends end+end, an error, or goes away; a
  vanished peer becomes a 503 error frame for the other side, never a hang.
- A stream names its namespace like a call ("default" unless told): only its instances are
  candidates; the caller is authorized in the namespace the instance registered in.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import trio

from meshd import namespaces, wire
from meshd.errors import MeshError, bad_request, unavailable
from meshd.ops import REQUEST_REMOTE, REQUEST_TOKEN, Conn, acting_node
from meshd.registry.service import LocalInstance
from meshd.transport.links import Channel, ChannelClosed, LinkError

from .service import BODY_DEPTH, RpcService

CHANNEL = "rpc-stream"
CREDIT = 16  # messages either side may send on a stream before the other grants more


def _err(exc: MeshError) -> dict[str, Any]:
    return {"error": exc.to_dict()}


class LocalStream:
    """One stream with a local service process. Both directions use message credits: each
    side may send CREDIT messages before the other grants more, so the shared control
    session of the service never blocks on one slow stream (heartbeats and other calls keep
    flowing)."""

    def __init__(self, local: LocalInstance, endpoint: str, meta: dict[str, Any]) -> None:
        self.local = local
        local.next_call += 1
        self.sid = local.next_call
        self.endpoint = endpoint
        self.meta = meta
        self._send, self.inbound = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._queued = 0
        self._consumed = 0
        self._credit = CREDIT
        self._credit_changed = trio.Event()
        local.streams[self.sid] = self

    # called by the session reader (sync, must not block)
    def on_frame(self, frame: dict[str, Any]) -> None:
        if "credit" in frame:
            grant = frame["credit"]
            if isinstance(grant, int) and 0 < grant <= CREDIT:
                self._credit += grant
                self._credit_changed.set()
                self._credit_changed = trio.Event()
            return
        self._queued += 1
        if self._queued > 2 * CREDIT:  # the service ignored our credit: end the stream
            frame = _err(MeshError(502, "the service overran the stream window",
                                   id="meshd.rpc"))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send.send_nowait(frame)

    def gone(self) -> None:
        self._send.close()
        self._credit_changed.set()

    async def open(self) -> None:
        await self.local.ready.wait()  # not before the process has its registration reply
        if self.local.closed:
            raise trio.BrokenResourceError("the instance is gone")
        await self.local.conn.send({"open": self.sid, "endpoint": self.endpoint,
                                    "meta": self.meta, "credit": CREDIT})

    async def to_service(self, frame: dict[str, Any]) -> None:
        while self._credit <= 0:
            if self.local.closed:
                raise EOFError
            await self._credit_changed.wait()
        self._credit -= 1
        if "msg" in frame:
            try:  # as call bodies (rpc/service.py BODY_DEPTH): the service must decode it
                wire.check_plain(frame["msg"], BODY_DEPTH)
            except wire.WireError as exc:
                raise bad_request(f"stream message: {exc}", id="meshd.rpc") from None
            await self.local.conn.send({"sid": self.sid, "msg": frame["msg"]})
        else:
            await self.local.conn.send({"sid": self.sid, "end": True})

    async def from_service(self) -> dict[str, Any]:
        try:
            frame = await self.inbound.receive()
        except trio.EndOfChannel:
            return _err(unavailable(f"instance {self.local.id} went away", id="meshd.rpc"))
        self._queued -= 1
        self._consumed += 1
        if self._consumed >= CREDIT // 2 and not self.local.closed:
            grant, self._consumed = self._consumed, 0
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.local.conn.send({"sid": self.sid, "credit": grant})
        if "msg" in frame:
            return {"msg": frame["msg"]}
        if "error" in frame:
            return {"error": frame["error"]}
        return {"end": True}

    def close(self) -> None:
        self.local.streams.pop(self.sid, None)


class StreamService:
    def __init__(self, rpc: RpcService) -> None:
        self.rpc = rpc
        rpc.links.handlers[CHANNEL] = self._serve_channel

    # --- caller side: control session "rpc.stream" -----------------------------------------

    async def serve_session(self, args: dict[str, Any], conn: Conn) -> None:
        service, endpoint = args.get("service"), args.get("endpoint")
        if not isinstance(service, str) or not isinstance(endpoint, str):
            raise bad_request("stream needs a service and an endpoint", id="meshd.rpc")
        meta = args.get("meta") if isinstance(args.get("meta"), dict) else {}
        meta = {**meta, "caller-node": self.rpc.core.me.name}  # never what a client claims
        candidates = self.rpc.candidates(service, endpoint,
                                         namespaces.check(args.get("namespace")))
        inst = self.rpc._pick(candidates, set(), self.rpc.selector)
        assert inst is not None
        token = REQUEST_TOKEN.get()
        tracer = self.rpc.debug.tracer if self.rpc.debug is not None else None
        with tracer.span(meta, f"stream {service}/{endpoint}", "client", service) \
                if tracer is not None else contextlib.nullcontext():
            await self._open_session(inst, service, endpoint, meta, token, conn)

    async def _open_session(self, inst: dict[str, Any], service: str, endpoint: str,
                            meta: dict[str, Any], token: str | None, conn: Conn) -> None:
        if inst["node"] == self.rpc.core.me.name:
            local = self.rpc.registry.local.get(inst["id"])
            if local is None:
                raise unavailable("the instance is gone", id="meshd.rpc")
            self.rpc._authorize(token, acting_node(self.rpc.core.me.name), service, endpoint,
                                local.namespace)
            stream = LocalStream(local, endpoint, meta)
            try:
                await stream.open()
                await conn.reply({"instance": inst["id"]})
                await _relay(conn.receive, stream.to_service, stream.from_service, conn.send)
            finally:
                stream.close()
            return
        try:
            ch = await self.rpc.links.open_channel(self.rpc.node_addr(inst), CHANNEL)
        except (LinkError, ChannelClosed) as exc:
            raise unavailable(f"cannot reach node {inst['node']}: {exc}", id="meshd.rpc"
                              ) from None
        async with ch:
            await ch.send(wire.dumps({"instance": inst["id"], "endpoint": endpoint,
                                       "meta": meta, "token": token,
                                       "anonymous": not token and REQUEST_REMOTE.get()}))
            try:
                ack = wire.loads(await ch.receive(), max_depth=16)
            except wire.WireError:
                ack = None
            if not isinstance(ack, dict) or not ack.get("ok"):
                raise MeshError.from_dict(ack.get("error") if isinstance(ack, dict) else None)
            await conn.reply({"instance": inst["id"]})

            async def to_peer(frame: dict[str, Any]) -> None:
                await ch.send(wire.dumps(frame))

            await _relay(conn.receive, to_peer, _channel_reader(ch), conn.send)

    # --- callee side: link channel ---------------------------------------------------------

    async def _serve_channel(self, ch: Channel) -> None:
        try:
            head = wire.loads(await ch.receive(), max_depth=16)
            inst_id, endpoint = head["instance"], head["endpoint"]
            if not isinstance(inst_id, str) or not isinstance(endpoint, str):
                raise TypeError
        except (wire.WireError, TypeError, KeyError, AttributeError):
            await ch.send(wire.dumps({"ok": False, "error": bad_request(
                "malformed stream request", id="meshd.rpc").to_dict()}))
            return
        local = self.rpc.registry.local.get(inst_id)
        if local is None:
            await ch.send(wire.dumps({"ok": False, "error": unavailable(
                f"instance {inst_id} is not here", id="meshd.rpc").to_dict()}))
            return
        meta = head.get("meta") if isinstance(head.get("meta"), dict) else {}
        meta = {k: v for k, v in meta.items() if isinstance(k, str)}
        meta["caller-node"] = ch.peer_node or "?"  # from the link, never from the caller
        try:
            self.rpc._authorize(head.get("token"),
                                None if head.get("anonymous") is True else ch.peer_node,
                                local.service, endpoint, local.namespace)
        except MeshError as exc:
            await ch.send(wire.dumps({"ok": False, "error": exc.to_dict()}))
            return
        tracer = self.rpc.debug.tracer if self.rpc.debug is not None else None
        with tracer.span(meta, f"serve stream {local.service}/{endpoint}", "server",
                         local.service) if tracer is not None else contextlib.nullcontext():
            await self._serve_stream(ch, local, endpoint, meta)

    async def _serve_stream(self, ch: Channel, local: Any, endpoint: str,
                            meta: dict[str, Any]) -> None:
        stream = LocalStream(local, endpoint, meta)
        try:
            await stream.open()
            await ch.send(wire.dumps({"ok": True}))

            async def to_caller(frame: dict[str, Any]) -> None:
                await ch.send(wire.dumps(frame))

            await _relay(_channel_reader(ch), stream.to_service, stream.from_service,
                         to_caller)
        finally:
            stream.close()


def _channel_reader(ch: Channel) -> Any:
    async def read() -> dict[str, Any]:
        try:
            frame = wire.loads(await ch.receive(), max_depth=64)
        except ChannelClosed:
            raise EOFError from None
        except wire.WireError:
            return _err(MeshError(502, "invalid stream frame from a peer", id="meshd.rpc"))
        return frame if isinstance(frame, dict) else _err(
            MeshError(502, "invalid stream frame from a peer", id="meshd.rpc"))
    return read


async def _relay(read_caller: Any, to_service: Any, read_service: Any, to_caller: Any) -> None:
    """Pump caller->service and service->caller until the service side ends the stream."""

    async def upstream(cancel: trio.CancelScope) -> None:
        while True:
            try:
                frame = await read_caller()
            except (EOFError, ChannelClosed, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                cancel.cancel()  # the caller went away: stop the whole stream
                return
            if not isinstance(frame, dict):
                continue
            try:
                await to_service({"msg": frame["msg"]} if "msg" in frame else {"end": True})
            except (EOFError, ChannelClosed, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                # the service side ended first (a server stream that finished before our
                # end reached it): what it sent is still to be relayed, so nothing is
                # cancelled here; the other direction ends the stream
                return
            if "msg" not in frame:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream, nursery.cancel_scope)
        try:
            while True:
                frame = await read_service()
                await to_caller(frame)
                if "msg" not in frame:
                    break
        except (EOFError, ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(1), trio.CancelScope(shield=True), \
                    contextlib.suppress(Exception):
                await to_caller(_err(unavailable("the stream broke", id="meshd.rpc")))
        nursery.cancel_scope.cancel()

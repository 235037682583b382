"""Tunnels: TCP endpoints exposed by one node and reached from any node through the mesh.

Rules:
- `expose NAME --to HOST:PORT` registers "tunnel:NAME" in the registry, owned by this node.
  `close NAME` removes it. Exposures live as long as the daemon (run `expose` again after a
  restart). Listing them reads the mesh (mesh:tunnels: for a remote caller, by the rules of
  "default", where tunnels belong).
- The caller's daemon accepts the connections (control session "tunnel.listen", held open
  by `meshd tunnel connect`; or the proxy endpoint for outside clients) and carries each to
  the exposing node on link channel "tunnel". The exposing node decides: the caller (its
  token, else its node) must be allowed on resource tunnel:NAME by the rules of the
  default namespace (tunnels belong to no other); then it connects to the target and pipes
  bytes both ways.
- Bytes flow as messages of at most 64 KiB; an empty message is end-of-data for that
  direction only (half-close), so request/response protocols work through a tunnel.
- Every leg has backpressure: the link channel's flow-control window, the unix socket to the
  client, the TCP socket to the target. One slow session cannot starve the others on the
  same link.
- Every session is logged at the exposing node: who, from which node, when, bytes each way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import trio

from meshd import wire
from meshd.errors import MeshError, bad_request, not_found, unavailable
from meshd.ops import REQUEST_TOKEN, Conn, Op, mesh_resource
from meshd.transport import addr as addrs
from meshd.transport import listeners as serving
from meshd.transport.links import Channel, ChannelClosed, LinkError
from meshd.transport.rawio import RawSocket

log = logging.getLogger("meshd.tunnel")
CHANNEL = "tunnel"
CHUNK = 64 * 1024
PREFIX = "tunnel:"


class TunnelService:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.exposed: dict[str, str] = {}  # name -> instance id
        node.links.handlers[CHANNEL] = self._serve_channel

    def ops(self) -> list[Op]:
        """Exposing a port of this node, closing it and listening on this node are its
        operator's; the list reads the mesh. (A remote environment reaches a tunnel through
        the proxy's own "tunnel" op, listening on the caller's machine.)"""
        return [Op("tunnel.expose", self.expose, "operator"),
                Op("tunnel.close", self.close, "operator"),
                Op("tunnel.list", self.list, mesh_resource("tunnels")),
                Op("tunnel.listen", self.listen_session, "operator", "session")]

    # --- exposing ----------------------------------------------------------------------------

    async def expose(self, args: dict[str, Any]) -> Any:
        name, target = args.get("name"), args.get("to")
        if not isinstance(name, str) or not name or "/" in name or len(name) > 100:
            raise bad_request("tunnel name must be 1..100 characters without '/'")
        try:
            host, port = addrs.parse(str(target))
        except addrs.AddressError as exc:
            raise bad_request(f"--to: {exc}") from None
        if name in self.exposed:
            raise MeshError(409, f"tunnel {name!r} is already exposed here; close it first")
        registry = self.node.registry
        inst_id = f"tunnel-{name}"
        record = {"service": PREFIX + name, "version": "", "id": inst_id, "node": self.node.name,
                  "address": self.node.advertise, "endpoints": [], "metadata": {
                      "kind": "tunnel", "target": addrs.format(host, port)}}
        registry._write(inst_id, record)
        self.exposed[name] = inst_id
        log.info("exposed tunnel %s -> %s", name, addrs.format(host, port))
        return {"name": name, "to": addrs.format(host, port), "node": self.node.name}

    async def close(self, args: dict[str, Any]) -> Any:
        name = args.get("name")
        inst_id = self.exposed.pop(name, None) if isinstance(name, str) else None
        if inst_id is None:
            raise not_found(f"no tunnel {name!r} is exposed on this node")
        self.node.registry._write(inst_id, None)
        return {"closed": name}

    async def list(self, args: dict[str, Any]) -> Any:
        rows = []
        for inst in self.node.registry.instances():
            if inst.get("service", "").startswith(PREFIX):
                rows.append({"name": inst["service"][len(PREFIX):], "node": inst["node"],
                             "target": inst.get("metadata", {}).get("target", "")})
        return rows

    # --- caller side -------------------------------------------------------------------------

    async def listen_session(self, args: dict[str, Any], conn: Conn) -> None:
        """Control session "tunnel.listen": this daemon accepts on `listen` and carries each
        connection to tunnel `name`, for as long as the client keeps the session open. The
        bytes never pass through the client process."""
        name, listen = args.get("name"), args.get("listen")
        if not isinstance(name, str) or not isinstance(listen, str):
            raise bad_request("tunnel.listen needs a name and a listen address")
        try:
            host, port = addrs.parse(listen)
        except addrs.AddressError as exc:
            raise bad_request(f"--listen: {exc}") from None
        if not self.node.registry.instances(PREFIX + name):
            raise not_found(f"no tunnel named {name!r} is exposed")
        token = REQUEST_TOKEN.get()
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise unavailable(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            gate = serving.Gate(f"tunnel_{name}", {})
            nursery.start_soon(serving.serve, listeners, self._accepted(name, token, conn),
                               gate)
            await conn.reply({"listening": addrs.format(bound[0], bound[1])})
            with contextlib.suppress(EOFError, MeshError):
                while True:
                    await conn.receive()  # the client went away: stop listening
            nursery.cancel_scope.cancel()

    def _accepted(self, name: str, token: str | None, conn: Conn) -> Any:
        async def handle(stream: trio.SocketStream, ticket: serving.Ticket) -> None:
            ticket.authenticated()  # the rules are checked per session at the far end
            async with stream:
                try:
                    await self._carry(name, token, stream)
                except MeshError as exc:
                    with contextlib.suppress(Exception):
                        await conn.send({"refused": exc.to_dict()})
                except (ChannelClosed, LinkError, OSError, trio.BrokenResourceError,
                        trio.ClosedResourceError) as exc:
                    log.debug("tunnel %s connection ended: %s", name, exc)
        return handle

    async def _carry(self, name: str, token: str | None, stream: Any,
                     ack: Any = None) -> None:
        """Carry one client stream to tunnel `name`; `ack()` runs once the far end is up."""
        instances = self.node.registry.instances(PREFIX + name)
        if not instances:
            raise not_found(f"no tunnel named {name!r} is exposed")
        inst = instances[0]
        if inst["node"] == self.node.name:
            target = await self._connect_target(name, token, self.node.name)
            if ack is not None:
                await ack()
            async with target:
                await _both(_pipe(lambda: stream.receive_some(CHUNK), target.send_all,
                                  target.send_eof),
                            _pipe(lambda: target.receive_some(CHUNK), stream.send_all,
                                  stream.send_eof))
            return
        ch, reply = await self._open_far_end(inst, name, token)
        async with ch:
            if not isinstance(reply, dict) or not reply.get("ok"):
                raise MeshError.from_dict(reply.get("error") if isinstance(reply, dict)
                                          else None)
            if ack is not None:
                await ack()
            await pipe_channel_stream(ch, stream, close_stream=False)

    async def _open_far_end(self, inst: dict[str, Any], name: str,
                            token: str | None) -> tuple[Channel, Any]:
        """A tunnel channel to the exposing node and its answer to the request. A link that
        went away under the request (it lost to the peer's simultaneous dial, or broke) is
        tried once more on a fresh one: nothing of the client's stream was read yet (at
        worst the target saw one connection that carried nothing)."""
        addr = self.node.rpc.node_addr(inst)
        for attempt in (1, 2):
            try:
                ch = await self.node.links.open_channel(addr, CHANNEL)
            except (LinkError, ChannelClosed) as exc:
                raise unavailable(f"cannot reach node {inst['node']}: {exc}") from None
            try:
                await ch.send(wire.dumps({"name": name, "token": token}))
                try:
                    return ch, wire.loads(await ch.receive(), max_depth=8)
                except wire.WireError:
                    return ch, None
            except ChannelClosed:
                await ch.aclose()
                if attempt == 2 or not ch.link.closed:
                    raise unavailable(f"node {inst['node']} closed tunnel {name!r} while it "
                                      "was being set up") from None
        raise AssertionError("unreachable")

    # --- exposing side -----------------------------------------------------------------------

    async def _connect_target(self, name: str, token: str | None,
                              caller_node: str | None) -> trio.SocketStream:
        if name not in self.exposed:
            raise not_found(f"tunnel {name!r} is not exposed on {self.node.name}")
        # tunnels are in the default namespace
        self.node.auth.check(token, caller_node, ("tunnel", name, ""), namespace="default")
        target = self._target(name)
        host, port = addrs.parse(target)
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise unavailable(f"tunnel {name!r}: cannot connect to {target}: "
                              f"{exc.strerror or exc}") from None

    def _target(self, name: str) -> str:
        for inst in self.node.registry.instances(PREFIX + name):
            if inst["node"] == self.node.name:
                return inst["metadata"]["target"]
        raise not_found(f"tunnel {name!r} is not exposed on {self.node.name}")

    async def _serve_channel(self, ch: Channel) -> None:
        try:
            head = wire.loads(await ch.receive(), max_depth=8)
            name, token = head["name"], head.get("token")
            if not isinstance(name, str):
                raise TypeError
        except (wire.WireError, TypeError, KeyError, AttributeError):
            await ch.send(wire.dumps({"ok": False, "error": bad_request(
                "malformed tunnel request").to_dict()}))
            return
        caller_node = ch.peer_node  # from the link's proven key, never from the request
        try:
            who = self.node.auth.identify(token if isinstance(token, str) else None,
                                          caller_node)
            stream = await self._connect_target(name, token, caller_node)
        except MeshError as exc:
            log.info("refused tunnel %s to %s from node %s: %s", name,
                     "token" if token else "no token", caller_node, exc.detail)
            await ch.send(wire.dumps({"ok": False, "error": exc.to_dict()}))
            return
        await ch.send(wire.dumps({"ok": True}))
        started = time.time()
        counts = await pipe_channel_stream(ch, stream)
        log.info("tunnel session name=%s caller=%s from_node=%s started=%s bytes_in=%d "
                 "bytes_out=%d seconds=%.1f", name, who.id, caller_node,
                 time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)), counts[0],
                 counts[1], time.time() - started)


# --- pipes -------------------------------------------------------------------------------------

async def _pipe(read: Any, write: Any, finish: Any) -> int:
    total = 0
    try:
        while True:
            data = await read()
            if not data:
                break
            total += len(data)
            await write(data)
    except (ChannelClosed, EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await finish()
    return total


async def _both(a: Any, b: Any) -> tuple[int, int]:
    counts = [0, 0]

    async def run(i: int, coro: Any) -> None:
        counts[i] = await coro

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, a)
        nursery.start_soon(run, 1, b)
    return counts[0], counts[1]


async def pipe_channel_stream(ch: Channel, stream: trio.SocketStream,
                               close_stream: bool = True) -> tuple[int, int]:
    """Pipe `ch` and `stream` both ways until both ends finished; (bytes in, bytes out).
    A TCP stream is read and written through rawio (no scheduler round per chunk)."""
    return await _pipe_channel_stream(ch, stream, close_stream, RawSocket.of(stream))


async def _pipe_channel_stream(ch: Channel, stream: trio.SocketStream, close_stream: bool,
                               raw: RawSocket | None) -> tuple[int, int]:
    async def from_channel() -> bytes:
        data = await ch.receive()
        return data

    async def from_stream() -> bytes:
        if raw is not None:
            return await raw.receive_some(CHUNK)
        return await stream.receive_some(CHUNK)

    async def to_stream(data: bytes) -> None:
        if raw is not None:
            await raw.send_all(stream, data)
        else:
            await stream.send_all(data)

    async def close_write() -> None:
        await stream.send_eof()

    async def channel_eof() -> None:
        await ch.send(b"")  # an empty message is end-of-data: the other way stays open

    pipes = (_pipe(from_channel, to_stream, close_write),
             _pipe(from_stream, ch.send, channel_eof))
    if not close_stream:
        return await _both(*pipes)
    async with stream:
        return await _both(*pipes)

"""In-process meshes of LinkManagers on loopback, with a fake routing table set by the test.

Each node is a real LinkManager with its own identity, listening on 127.0.0.1:0, sharing one
cluster keyring. The hooks the node normally sets from membership and routing read plain
dicts owned by the test:

    mesh.routes["a"][addr]    = (next hop address, destination name)   -> route(addr) on a
    mesh.next_hops["b"][name] = address of b's next hop toward `name`  -> next_hop_for on b
    mesh.keys[addr]           = identity key of the live member there  -> expected_key
    mesh.names[key]           = member name holding that key            -> node_of_key

A node runs under its own cancel scope, so a test can kill one (`await mesh.kill(node)`):
every link and task it had ends, as when its process dies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from meshd.identity import Identity
from meshd.secure.keyring import Keyring, new_secret
from meshd.transport.links import RELAY, Channel, ChannelClosed, LinkManager

HANDSHAKE_TIMEOUT = 3.0  # shorter than the 5 s default: a dial that hangs fails sooner
GUARD = 10.0  # trio.fail_after guard for a condition that must come true


@dataclass
class Node:
    name: str
    manager: LinkManager
    addr: str
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def key(self) -> bytes:
        return self.manager.identity.public_bytes

    @property
    def short(self) -> str:
        return self.manager.identity.short

    @property
    def stats(self) -> dict[str, int]:
        return self.manager.stats


@dataclass
class Mesh:
    nursery: trio.Nursery
    keyring: Keyring = field(default_factory=lambda: Keyring([new_secret()]))
    nodes: dict[str, Node] = field(default_factory=dict)
    routes: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    next_hops: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    names: dict[bytes, str] = field(default_factory=dict)

    async def add(self, name: str, *, my_name: str | None = None,
                  identity: Identity | None = None, member: bool = True) -> Node:
        """Start a node called `name` (answering relays for `my_name`, by default its name);
        a member's address and key go into the membership view (keys, names)."""
        manager = LinkManager(identity or Identity.generate(), self.keyring, "127.0.0.1:0",
                              handshake_timeout=HANDSHAKE_TIMEOUT)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def runner(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await manager.run(listeners, task_status=task_status)
            finally:
                stopped.set()

        port = await self.nursery.start(runner)
        manager.advertise = addr = f"127.0.0.1:{port}"
        self.routes.setdefault(name, {})
        self.next_hops.setdefault(name, {})
        manager.my_name = my_name if my_name is not None else name
        manager.route = lambda a: self.routes[name].get(a)
        manager.next_hop_for = lambda dest: self.next_hops[name].get(dest)
        manager.expected_key = lambda a: self.keys.get(a)
        manager.node_of_key = lambda k: self.names.get(k)
        node = Node(name, manager, addr, scope, stopped)
        self.nodes[name] = node
        if member:
            self.keys[addr] = node.key
            self.names[node.key] = name
        return node

    async def kill(self, node: Node) -> None:
        """End a node as its process dying would: every link and task of it stops."""
        node.scope.cancel()
        with trio.fail_after(GUARD):
            await node.stopped.wait()


async def wait_for(condition: Callable[[], bool], what: str, guard: float = GUARD) -> None:
    """Wait until `condition()` holds (checked every few milliseconds), failing the test with
    `what` if it does not within `guard` seconds. Used where the condition is set by another
    node's tasks and no event of ours marks it; the guard only bounds a broken run."""
    try:
        with trio.fail_after(guard):
            while not condition():
                await trio.sleep(0.005)
    except trio.TooSlowError:
        raise AssertionError(f"never happened: {what}") from None


def task_names() -> list[str]:
    """Names of every task running in this trio run."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names.append(child.name)
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def relay_tasks() -> list[str]:
    """Tasks that exist only while some node serves a channel or pumps a relay."""
    return [n for n in task_names() if n.endswith(("pump", "_serve_channel"))]


def open_channels(*nodes: Node) -> int:
    return sum(len(link.channels) for node in nodes for link in node.manager.live)


class Echo:
    """A channel handler that answers every message with itself and records who called."""

    def __init__(self) -> None:
        self.calls: list[Channel] = []
        self.received: list[bytes] = []
        self.arrived = trio.Event()

    async def __call__(self, ch: Channel) -> None:
        self.calls.append(ch)
        self.arrived.set()
        while True:
            try:
                message = await ch.receive()
            except ChannelClosed:
                return
            self.received.append(message)
            await ch.send(message)


class RelayTap:
    """Records every message a node's relay channels carry, both ways: it wraps the channel
    the relay handler gets (bytes from the previous hop) and the onward relay channels the
    node opens (bytes from the next hop), then runs the node's own relay code unchanged."""

    def __init__(self, node: Node) -> None:
        self.carried: list[bytes] = []
        manager = node.manager
        serve_relay = manager._serve_relay
        open_channel = manager.open_channel

        async def tapped_serve(ch: Channel) -> None:
            await serve_relay(self._tap(ch))

        async def tapped_open(addr: str, name: str) -> Channel:
            ch = await open_channel(addr, name)
            return self._tap(ch) if name == RELAY else ch

        manager.handlers[RELAY] = tapped_serve
        manager.open_channel = tapped_open  # type: ignore[method-assign]

    def _tap(self, ch: Channel) -> Channel:
        receive, hooked = ch.receive, ch._hooked

        async def recording_receive() -> bytes:
            data = await receive()
            self.carried.append(data)
            return data

        def recording_hook(data: bytes) -> bool:  # what the relay passes on in the reader
            taken = hooked(data)
            if taken:
                self.carried.append(data)
            return taken

        ch.receive = recording_receive  # type: ignore[method-assign]
        ch._hooked = recording_hook  # type: ignore[method-assign]
        return ch

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.carried)


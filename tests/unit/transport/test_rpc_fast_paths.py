"""Cross-node calls answered from callbacks (meshd/rpc/remote.py) against hostile or
departing peers: the callee's call slots, a huge timeout, a client hanging up with fast
calls pending, and a retry's deadline and tries. The RPC service is real; the registry, the
links and the call channels are fakes the test drives (MockClock: no real waiting)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from meshd import wire
from meshd.control import ControlServer, MuxClient
from meshd.errors import MeshError
from meshd.ops import Op, OpTable
from meshd.registry.service import LocalInstance
from meshd.rpc import remote
from meshd.rpc.service import RpcService, _FastCall
from meshd.transport.links import LinkError

SLOTS = 8  # call slots of the fake channel (the real one has MAX_CALLS_PER_CHANNEL)


class FakeFramed:
    """A service session's writer: takes every call frame (the service answers later)."""

    def __init__(self) -> None:
        self.flushing = True
        self.frames: list[dict[str, Any]] = []

    def write_nowait(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)


class FakeLinks:
    """Opening a call channel to a node: `fail` nodes are unreachable (LinkError), others
    never answer (the dial hangs)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.dialed: list[str] = []
        self.fail: set[str] = set()

    async def open_channel(self, addr: str, name: str) -> Any:
        self.dialed.append(addr)
        if addr in self.fail:
            raise LinkError(f"{addr} unreachable")
        await trio.sleep_forever()


def _inst(node: str, n: int) -> dict[str, Any]:
    return {"id": f"svc-{n}", "service": "svc", "node": node, "address": f"{node}:1",
            "version": "1", "endpoints": [{"name": "E"}], "namespace": "default"}


def _rpc(instances: list[dict[str, Any]] = ()) -> tuple[RpcService, LocalInstance, FakeLinks]:
    local = LocalInstance("svc-1", "svc", SimpleNamespace(framed=FakeFramed()), 0.0)
    local.ready.set()
    registry = SimpleNamespace(local={local.id: local},
                               instances=lambda service, namespace: list(instances))
    core = SimpleNamespace(me=SimpleNamespace(name="me"), members={})
    links = FakeLinks()
    return RpcService(registry, links, core), local, links  # type: ignore[arg-type]


class StuckChannel:
    """A call channel whose caller never grants window for replies: nothing goes at once,
    and a send waits for ever."""

    def __init__(self) -> None:
        self.link = SimpleNamespace(tagged=False, closed=False)
        self.peer_node = "caller"
        self._closed_local = self._closed_remote = False
        self.waiting = 0
        self.sent: list[Any] = []

    def send_nowait(self, message: bytes) -> bool:
        return False

    async def send(self, message: bytes) -> None:
        self.waiting += 1
        try:
            await trio.sleep_forever()
        finally:
            self.waiting -= 1


class OpenChannel(StuckChannel):
    """A call channel that takes every reply at once (recorded)."""

    def send_nowait(self, message: bytes) -> bool:
        self.sent.append(wire.loads(message))
        return True

    async def send(self, message: bytes) -> None:
        self.sent.append(wire.loads(message))


def _request(rid: int, timeout: Any = 5.0) -> bytes:
    return wire.dumps({"id": rid, "instance": "svc-1", "endpoint": "E", "body": {"n": rid},
                       "meta": {}, "timeout": timeout})


async def test_a_caller_granting_no_window_holds_no_more_replies_than_call_slots(mock_clock):
    """A reply the window has no room for keeps its call's slot until it is sent or the
    call's deadline passes: a caller that sends requests (the hook grants it window for
    them) but never reads replies gets no more than a channel's call slots of them
    waiting, each with its task and payload."""
    rpc, local, _ = _rpc()
    ch = StuckChannel()
    slots = trio.Semaphore(SLOTS)
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        taken = 0
        for _ in range(3):
            for rid in range(20):
                taken += remote.serve(rpc, ch, _request(rid), slots)  # type: ignore[arg-type]
            for cid in list(local.pending):  # the service answers every call
                local.pending.pop(cid).send_nowait({"ok": True, "body": "x" * 100})
            await trio.testing.wait_all_tasks_blocked()
        assert taken == SLOTS and ch.waiting == SLOTS and slots.value == 0
        mock_clock.jump(5.0)  # the calls' deadline: the replies are given up, slots back
        await trio.testing.wait_all_tasks_blocked()
        assert ch.waiting == 0 and slots.value == SLOTS
        nursery.cancel_scope.cancel()


async def test_a_huge_integer_timeout_gets_a_400_and_leaves_the_slot_free():
    """10**400 decodes (bignum), passes the type check and fails float(): the hook declines
    it before taking a slot, and the ordinary path answers 400."""
    rpc, _, _ = _rpc()
    ch = OpenChannel()
    slots = trio.Semaphore(SLOTS)
    data = _request(7, timeout=10**400)
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        for _ in range(2 * SLOTS):
            assert not remote.serve(rpc, ch, data, slots)  # type: ignore[arg-type]
        assert slots.value == SLOTS
        await rpc._serve_one(ch, data)  # type: ignore[arg-type]
        assert [(r["id"], r["ok"], r["error"]["status"]) for r in ch.sent] == [(7, False, 400)]
        # the channel still serves calls at full width
        for rid in range(SLOTS):
            assert remote.serve(rpc, ch, _request(rid), slots)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_a_client_hanging_up_with_fast_calls_pending_leaves_the_node_running(
        tmp_path: Path, mock_clock):
    """A multiplexed control client hangs up while a local and a cross-node fast call wait
    for their service; at their deadline they expire into a connection with no flusher:
    nobody to answer, and the RPC service (the node's nursery) runs on."""
    mock_clock.rate = 1  # the sockets need time to pass; jumps pass the calls' deadlines
    rpc, local, _ = _rpc()
    calls: list[Any] = []

    def fast(args: dict[str, Any], token: Any, finish: Any, size: int) -> bool:
        deadline = trio.current_time() + 60.0
        if args.get("kind") == "local":
            local.next_call += 1
            call: Any = _FastCall(rpc, local, local.next_call, finish, "svc.E", 60.0)
            local.pending[call.cid] = call
        else:
            mux = SimpleNamespace(pending={}, broken=False)
            call = remote.RemoteCall(rpc, mux, 1, _inst("far", 2), "E", {}, 60.0,  # type: ignore[arg-type]
                                     deadline, {}, None, False, finish, None, {})
            mux.pending[1] = call
        calls.append(call)
        rpc._add_deadline(deadline, call)
        return True

    async def never(args: dict[str, Any]) -> Any:
        await trio.sleep_forever()

    table = OpTable()
    table.add([Op("held", never, "public", fast=fast)])
    server = ControlServer(tmp_path / "c.sock", table)

    async def call(client: MuxClient, kind: str) -> None:
        with contextlib.suppress(MeshError):
            await client.call("held", {"kind": kind})

    with trio.fail_after(600):  # a guard only (the jumps pass 63 s of its clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(rpc.run)
            await nursery.start(server.run)
            client = MuxClient(tmp_path / "c.sock")
            async with trio.open_nursery() as callers:
                callers.start_soon(call, client, "local")
                callers.start_soon(call, client, "remote")
                while len(calls) < 2:
                    await trio.sleep(0.005)
                await client.aclose()  # hang up with both calls pending
            while server.gate.open:
                await trio.sleep(0.005)
            mock_clock.jump(61.0)
            while not all(c.finished for c in calls):
                await trio.sleep(0.005)
            # the deadline task lives on: a later call still expires with its 408
            got: list[Any] = []
            rpc._add_deadline(trio.current_time() + 1.0, _FastCall(
                rpc, local, 99, lambda result, exc: got.append(exc.status), "svc.E", 1.0))
            mock_clock.jump(2.0)
            while not got:
                await trio.sleep(0.005)
            assert got == [408]
            nursery.cancel_scope.cancel()


async def test_a_fast_call_retried_elsewhere_keeps_its_deadline(autojump_clock):
    """An undelivered reply to a fast cross-node call is retried the ordinary way in what
    remains of its deadline, not a whole timeout from the retry."""
    rpc, _, links = _rpc([_inst("b", 2), _inst("d", 4)])  # d's dial hangs
    ended: list[tuple[float, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        start = trio.current_time()
        mux = SimpleNamespace(pending={}, broken=False)
        call = remote.RemoteCall(
            rpc, mux, 1, _inst("b", 2), "E", {}, 10.0, start + 10.0, {}, None,  # type: ignore[arg-type]
            False, lambda result, exc: ended.append((trio.current_time(), exc.status)), None,
            {"service": "svc", "selector": "random", "namespace": "default"})
        rpc._add_deadline(start + 10.0, call)
        await trio.sleep(4.0)
        call.send_nowait({"id": 1, "undelivered": True,
                          "error": {"status": 503, "detail": "instance gone"}})
        while not ended:
            await trio.sleep(0.5)
        assert ended == [(pytest.approx(start + 10.0), 408)]
        assert links.dialed == ["d:1"]
        nursery.cancel_scope.cancel()


async def test_the_fast_try_counts_as_one_of_the_call_s_tries(autojump_clock):
    rpc, _, links = _rpc([_inst("b", 2), _inst("c", 3), _inst("d", 4)])
    rpc.retries = 1  # two tries: the fast one and one more
    links.fail = {"c:1", "d:1"}
    ended: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        mux = SimpleNamespace(pending={}, broken=False)
        call = remote.RemoteCall(
            rpc, mux, 1, _inst("b", 2), "E", {}, 10.0, trio.current_time() + 10.0, {},  # type: ignore[arg-type]
            None, False, lambda result, exc: ended.append(exc.status), None,
            {"service": "svc", "selector": "random", "namespace": "default"})
        call.send_nowait({"id": 1, "undelivered": True,
                          "error": {"status": 503, "detail": "instance gone"}})
        while not ended:
            await trio.sleep(0.5)
        assert ended == [503] and len(links.dialed) == 1
        nursery.cancel_scope.cancel()

"""The control socket's transport (meshd/control.py): frames written by many tasks at once,
and multiplexed connections (`control.mux`, MuxClient) against a real ControlServer on a
unix socket in a temporary directory."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from meshd.control import MUX_IN_FLIGHT, MUX_OP, ControlServer, Framed, MuxClient
from meshd.errors import MeshError
from meshd.ops import REQUEST_TOKEN, Op, OpTable


def frames_of(data: bytes) -> list[Any]:
    out = []
    while data:
        (n,) = struct.unpack_from(">I", data)
        out.append(cbor2.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


async def test_frames_written_by_many_tasks_at_once_arrive_whole_and_together():
    send, recv = trio.testing.memory_stream_pair()
    framed = Framed(send)
    writes = []
    real_send_all = send.send_all

    async def counting_send_all(data: bytes) -> None:
        writes.append(len(data))
        await trio.sleep(0.01)  # slow: others queue behind this send
        await real_send_all(data)

    send.send_all = counting_send_all  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(framed.write, {"n": i, "pad": "x" * i})
        got = b""
        while len(frames_of_safe(got)) < 50:
            got += await recv.receive_some()
    assert sorted(f["n"] for f in frames_of(got)) == list(range(50))
    assert len(writes) < 50  # frames queued during a send went out together


def frames_of_safe(data: bytes) -> list[Any]:
    out, i = [], 0
    while i + 4 <= len(data):
        (n,) = struct.unpack_from(">I", data, i)
        if i + 4 + n > len(data):
            break
        out.append(cbor2.loads(data[i + 4:i + 4 + n]))
        i += 4 + n
    return out


async def test_a_failed_send_breaks_the_connection_for_every_writer():
    send, _recv = trio.testing.memory_stream_pair()
    framed = Framed(send)
    started = trio.Event()

    async def failing_send_all(data: bytes) -> None:
        started.set()
        await trio.sleep(0.01)
        raise trio.BrokenResourceError("gone")

    send.send_all = failing_send_all  # type: ignore[method-assign]
    failures = []

    async def write(i: int) -> None:
        try:
            await framed.write({"n": i})
        except trio.BrokenResourceError:
            failures.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(write, i)
    assert sorted(failures) == [0, 1, 2, 3, 4]
    with pytest.raises(trio.BrokenResourceError):
        await framed.write({"after": True})


# --- multiplexed connections ----------------------------------------------------------------

class Server:
    def __init__(self, path: Path) -> None:
        self.running = 0
        self.most = 0
        self.release = trio.Event()
        self.cancelled = 0
        t = OpTable()
        t.add([Op("echo", self.echo, "public"), Op("slow", self.slow, "public"),
               Op("hold", self.hold, "public"), Op("whoami", self.whoami, "public"),
               Op("fail", self.fail, "public"),
               Op("quick", self.echo, "public", fast=self.quick),
               Op("buggy", self.echo, "public", fast=self.buggy),
               Op("watch", self.watch, "public", "stream")])
        self.control = ControlServer(path, t)

    async def echo(self, args: dict[str, Any]) -> Any:
        return args.get("v")

    async def slow(self, args: dict[str, Any]) -> Any:
        await trio.sleep(float(args["s"]))
        return args["v"]

    async def hold(self, args: dict[str, Any]) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return "released"

    async def whoami(self, args: dict[str, Any]) -> Any:
        await trio.sleep(0.001)
        return REQUEST_TOKEN.get()

    async def fail(self, args: dict[str, Any]) -> Any:
        raise MeshError(409, "no")

    def quick(self, args: dict[str, Any], token: Any, finish: Any, size: int) -> bool:
        if args.get("v") == "slow way":
            return False  # not taken: the ordinary handler answers
        finish({"fast": args.get("v"), "size": size > 0}, None)
        return True

    def buggy(self, args: dict[str, Any], token: Any, finish: Any, size: int) -> bool:
        raise RuntimeError("a bug in a fast path")

    async def watch(self, args: dict[str, Any], emit: Any) -> None:
        await emit(1)


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[Server, MuxClient]]:
    """A ControlServer on a socket in tmp_path and a MuxClient of it, closed after."""
    async with trio.open_nursery() as nursery:
        server = Server(tmp_path / "c.sock")
        await nursery.start(server.control.run)
        mux = MuxClient(tmp_path / "c.sock")
        try:
            yield server, mux
        finally:
            await mux.aclose()
            nursery.cancel_scope.cancel()


async def test_many_calls_share_one_connection_and_each_gets_its_own_reply(tmp_path):
    async with serving(tmp_path) as (_, mux):
        got: dict[int, Any] = {}

        async def one(i: int) -> None:
            # later calls finish first: replies come back out of order
            got[i] = await mux.call("slow", {"v": i, "s": (40 - i) * 0.002})

        async with trio.open_nursery() as calls:
            for i in range(40):
                calls.start_soon(one, i)
        assert got == {i: i for i in range(40)}
        assert mux._client is not None and mux.failed is None  # one connection throughout
        with pytest.raises(MeshError) as err:
            await mux.call("fail", {})
        assert err.value.status == 409
        assert await mux.call("echo", {"v": "still usable"}) == "still usable"


async def test_each_call_carries_its_own_token(tmp_path):
    async with serving(tmp_path) as (_, mux):
        got: dict[str, Any] = {}

        async def one(token: str | None) -> None:
            got[str(token)] = await mux.call("whoami", {}, token)

        async with trio.open_nursery() as calls:
            for token in ("t1", "t2", None, "t3"):
                calls.start_soon(one, token)
        assert got == {"t1": "t1", "t2": "t2", "None": None, "t3": "t3"}


async def test_a_stream_op_is_refused_inside_a_mux_and_the_connection_goes_on(tmp_path):
    async with serving(tmp_path) as (_, mux):
        with pytest.raises(MeshError) as err:
            await mux.call("watch", {})
        assert err.value.status == 400 and "connection of its own" in err.value.detail
        assert await mux.call("echo", {"v": 1}) == 1


async def test_a_cancelled_call_leaves_the_others_answered(tmp_path):
    async with serving(tmp_path) as (_, mux):
        got = []

        async def one(i: int) -> None:
            got.append(await mux.call("slow", {"v": i, "s": 0.05}))

        async with trio.open_nursery() as calls:
            with trio.move_on_after(0.01):  # the first caller, likely the reader, gives up
                await mux.call("slow", {"v": "gone", "s": 0.05})
            for i in range(5):
                calls.start_soon(one, i)
        assert sorted(got) == [0, 1, 2, 3, 4]


async def test_calls_in_flight_are_capped_per_connection_and_hangup_cancels_them(tmp_path):
    async with serving(tmp_path) as (server, mux):
        async with trio.open_nursery() as calls:
            for _ in range(MUX_IN_FLIGHT + 20):
                calls.start_soon(mux.call, "hold", {})
            with trio.fail_after(10):
                while server.running < MUX_IN_FLIGHT:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert server.most == MUX_IN_FLIGHT  # the rest wait unread
            server.release.set()
        assert server.running == 0
        server.release = trio.Event()
        calls_failed = []

        async def held() -> None:
            try:
                await mux.call("hold", {})
            except MeshError as exc:
                calls_failed.append(exc.status)

        async with trio.open_nursery() as calls:
            for _ in range(3):
                calls.start_soon(held)
            with trio.fail_after(10):
                while server.running < 3:
                    await trio.sleep(0.01)
            await mux.aclose()  # hang up: the daemon cancels what still runs
        with trio.fail_after(10):
            while server.cancelled < 3:
                await trio.sleep(0.01)
        assert calls_failed == [503, 503, 503]


async def test_garbage_on_a_mux_connection_ends_that_connection_only(tmp_path):
    async with serving(tmp_path) as (_, mux):
        stream = await trio.open_unix_socket(str(tmp_path / "c.sock"))
        framed = Framed(stream)
        await framed.write({"id": 1, "op": MUX_OP})
        assert (await framed.read())["ok"] is True
        await framed.write({"id": 2, "op": "nope"})
        assert (await framed.read())["error"]["status"] == 404
        await framed.write(["not", "a", "map"])
        assert (await framed.read())["error"]["status"] == 400
        await stream.send_all(struct.pack(">I", 3) + b"\xff\xff\xff")  # not CBOR
        assert (await framed.read())["error"]["status"] == 400
        with pytest.raises(EOFError):
            await framed.read()  # the connection is closed after unreadable bytes
        await stream.aclose()
        assert await mux.call("echo", {"v": "ok"}) == "ok"  # the listener serves on


async def test_a_writer_cancelled_before_sending_leaves_the_connection_whole():
    send, recv = trio.testing.memory_stream_pair()
    framed = Framed(send)
    with trio.CancelScope() as scope:
        scope.cancel()
        await framed.write({"n": 1})  # cancelled at once: nothing was handed over
    await framed.write({"n": 2})  # the connection works, and the queued frame goes first
    got = b""
    while len(frames_of_safe(got)) < 2:
        got += await recv.receive_some()
    assert frames_of(got) == [{"n": 1}, {"n": 2}]


async def test_fast_paths_answer_and_what_they_do_not_take_runs_the_ordinary_way(tmp_path):
    async with serving(tmp_path) as (_, mux):
        assert await mux.call("quick", {"v": 1}) == {"fast": 1, "size": True}
        assert await mux.call("quick", {"v": "slow way"}) == "slow way"
        assert await mux.call("buggy", {"v": "still answered"}) == "still answered"
        assert await mux.call("echo", {"v": "connection fine"}) == "connection fine"

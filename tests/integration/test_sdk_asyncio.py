"""The SDK from asyncio (meshd_sdk.aio) and from trio, against a real daemon: a service with
typed handlers and a subscriber, calls, broker subscriptions, the store and config, and
cancellation both ways (an asyncio task cancelled mid-call ends its call; cancelling the
service's task cancels its running asyncio handlers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sniffio
import trio

from meshd.errors import MeshError
from meshd_sdk import Client, Config, Service, Store, aio, current_call
from meshd_sdk.testing import Cluster, cluster

BOUND = 20.0  # seconds any one wait may take


@dataclass
class Hello:
    name: str


@dataclass
class Greeting:
    text: str
    caller_seen: bool


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Cluster]:
    with cluster(1, root=tmp_path_factory.mktemp("sdkaio")) as m:
        yield m


def asyncio_service(sock: Path, name: str, events: asyncio.Queue,
                    cancelled: asyncio.Event) -> aio.Service:
    service = aio.Service(name, addr=sock)

    @service.handler("Greeter.Hello")
    async def hello(req: Hello) -> Greeting:
        await asyncio.sleep(0)  # asyncio code runs in the handler
        task = asyncio.current_task()
        assert task is not None
        return Greeting(f"hello {req.name}", current_call() is not None)

    @service.handler("Greeter.Slow")
    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    @service.handler("Greeter.WhoCalls")
    async def who_calls(req: dict[str, Any]) -> dict[str, Any]:
        info = current_call()
        return {"caller": info.caller if info else "", "library":
                sniffio.current_async_library()}

    @service.handler("Greeter.AskMyself")
    async def ask_myself(req: dict[str, Any]) -> dict[str, Any]:
        """A call made from inside a handler goes as the service (its context crosses)."""
        async with aio.Client(sock) as inner:
            return await inner.call(name, "Greeter.WhoCalls", {})

    @service.handler("Greeter.Fail")
    async def fail(req: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("broken on purpose")

    @service.subscriber("aiosvc.events")
    async def on_event(event: dict[str, Any]) -> None:
        await events.put(event)

    return service


def test_the_sdk_from_asyncio(mesh):
    sock = mesh.node(0).socket

    async def main() -> None:
        events: asyncio.Queue = asyncio.Queue()
        cancelled = asyncio.Event()
        service = asyncio_service(sock, "aiosvc", events, cancelled)
        runner = asyncio.create_task(service.run())
        await asyncio.wait_for(service.wait_registered(), BOUND)
        async with aio.Client(sock) as client:
            reply = await client.call("aiosvc", "Greeter.Hello", {"name": "Ada"})
            assert reply == {"text": "hello Ada", "caller_seen": True}
            typed = await client.call("aiosvc", "Greeter.Hello", Hello("Bo"),
                                      response=Greeting)
            assert typed == Greeting("hello Bo", True)
            with pytest.raises(MeshError) as exc:
                await client.call("nosuch", "X.Y", {})
            assert exc.value.status in (404, 503)

            # handlers run as asyncio (sniffio says so), calls from them go as the service
            direct = await client.call("aiosvc", "Greeter.WhoCalls", {})
            assert direct["library"] == "asyncio"
            nested = await client.call("aiosvc", "Greeter.AskMyself", {})
            assert nested["caller"] == "service:aiosvc", (direct, nested)
            assert nested["caller"] != direct["caller"]

            # a handler that raises is a 500 for that call; the service serves on
            with pytest.raises(MeshError) as exc:
                await client.call("aiosvc", "Greeter.Fail", {})
            assert exc.value.status == 500

            # broker: a subscription held open across awaits, messages acked from asyncio
            async with client.subscribe("aiosvc.>") as sub:
                await client.publish("aiosvc.other", {"n": 1})
                msg = await asyncio.wait_for(sub.receive(), BOUND)
                assert (msg.topic, msg.body) == ("aiosvc.other", {"n": 1})
                for n in (2, 3, 4):
                    await client.publish("aiosvc.other", {"n": n})
                async for first in sub:  # leaving a loop early loses nothing
                    assert first.body == {"n": 2}
                    break
                rest = [(await asyncio.wait_for(sub.receive(), BOUND)).body for _ in (3, 4)]
                assert rest == [{"n": 3}, {"n": 4}]
            # the service's own subscriber (an asyncio coroutine)
            for _ in range(100):  # core delivery: it counts once its subscription is up
                await client.publish("aiosvc.events", {"n": 2})
                try:
                    got = await asyncio.wait_for(events.get(), 0.2)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("the asyncio subscriber never got an event")
            assert got == {"n": 2}

            # a call's deadline ends the call for the caller (the handler runs on)
            with pytest.raises(MeshError) as exc:
                await client.call("aiosvc", "Greeter.Slow", {}, timeout=0.5)
            assert exc.value.status in (408, 504)
            assert not cancelled.is_set()

            # an asyncio task cancelled mid-call: the call ends, the client serves on
            task = asyncio.create_task(client.call("aiosvc", "Greeter.Slow", {}, timeout=30))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.call("aiosvc", "Greeter.Hello", {"name": "C"}))["text"] \
                == "hello C"

        store = aio.Store(table="aio", addr=sock)
        await store.write("k", "v")
        assert await store.get("k") == b"v"
        assert await store.incr("n", 2) == 2
        await store.aclose()

        config = aio.Config(addr=sock)
        seen: list = []

        async def watch() -> None:
            async for value in config.watch("aio.flag"):
                seen.append(value)
                if value == "on":
                    return
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        await config.set("aio.flag", "on")
        await asyncio.wait_for(watcher, BOUND)
        assert seen[-1] == "on"
        assert await config.get("aio.flag") == "on"
        await config.aclose()

        # stopping the service (cancelling its asyncio task) cancels its running handlers
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert cancelled.is_set(), "the slow handler was not cancelled with the service"

    asyncio.run(main())


async def test_the_same_from_trio(mesh):
    sock = mesh.node(0).socket
    service = Service("triosvc", addr=sock)

    @service.handler("Greeter.Hello")
    async def hello(req: Hello) -> Greeting:
        await trio.sleep(0)
        return Greeting(f"hello {req.name}", current_call() is not None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        with trio.fail_after(BOUND):
            await service.registered.wait()
        async with Client(sock) as client:
            assert await client.call("triosvc", "Greeter.Hello", {"name": "Ada"}) \
                == {"text": "hello Ada", "caller_seen": True}
            async with client.subscribe("triosvc.>") as sub:
                await client.publish("triosvc.x", {"n": 1})
                with trio.fail_after(BOUND):
                    msg = await sub.receive()
                assert msg.body == {"n": 1}
        store = Store(table="trio", addr=sock)
        await store.write("k", "v")
        assert await store.get("k") == b"v"
        await store.aclose()
        config = Config(addr=sock)
        await config.set("trio.flag", "on")
        assert await config.get("trio.flag") == "on"
        await config.aclose()
        nursery.cancel_scope.cancel()


def test_asyncio_runs_end_cleanly_with_the_bridge_started(mesh):
    """Two asyncio.run in a row, each using the SDK: each loop's bridge ends with it."""
    sock = mesh.node(0).socket

    async def once() -> list:
        async with aio.Client(sock) as client:
            return await client.services()

    for _ in range(2):
        assert isinstance(asyncio.run(once()), list)

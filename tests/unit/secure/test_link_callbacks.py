"""The links' callback paths: Channel.send_nowait, Channel.hook, and rawio's sends and
receives without a scheduler round (transport/links.py, transport/rawio.py)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio

from meshd.identity import Identity
from meshd.secure.keyring import Keyring, new_secret
from meshd.transport import rawio
from meshd.transport.links import CHUNK, MIN_FRAME_COST, WINDOW_BYTES, Channel, LinkManager

GUARD = 10


async def _pair(nursery: trio.Nursery) -> tuple[LinkManager, LinkManager]:
    secret = new_secret()
    a = LinkManager(Identity.generate(), Keyring([secret]), "127.0.0.1:0")
    b = LinkManager(Identity.generate(), Keyring([secret]), "127.0.0.1:0")
    port_a = await nursery.start(a.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
    port_b = await nursery.start(b.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
    a.advertise, b.advertise = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    return a, b


async def _served(b: LinkManager) -> tuple[list[Channel], trio.Event]:
    """A handler "sink" on b that parks its channel (the test reads it) until told."""
    chans: list[Channel] = []
    release = trio.Event()

    async def sink(ch: Channel) -> None:
        chans.append(ch)
        await release.wait()

    b.handlers["sink"] = sink
    return chans, release


async def _sink(nursery: trio.Nursery) -> tuple[Any, Any, Any, list, trio.Event]:
    """Two linked managers and a's channel "sink" to b, once b serves it and a's link can
    queue: (a, b, the channel, b's served channels, the event that ends b's serving)."""
    a, b = await _pair(nursery)
    chans, release = await _served(b)
    ch = await a.open_channel(b.advertise, "sink")
    with trio.fail_after(GUARD):
        while not chans or not ch.link.can_queue:
            await trio.sleep(0.01)
    return a, b, ch, chans, release


async def test_send_nowait_sends_one_frame_messages_in_order_and_declines_the_rest():
    async with trio.open_nursery() as nursery:
        _, _, ch, chans, release = await _sink(nursery)
        with trio.fail_after(GUARD):
            far = chans[0]
            assert ch.send_nowait(b"one") and ch.send_nowait(b"two")
            await ch.send(b"three")
            assert [await far.receive() for _ in range(3)] == [b"one", b"two", b"three"]
            # longer than a frame: only send() splits it
            assert not ch.send_nowait(os.urandom(CHUNK + 1))
            # a short window: declined, and nothing of it was sent or charged
            ch._send_window = MIN_FRAME_COST - 1
            assert not ch.send_nowait(b"x")
            assert ch._send_window == MIN_FRAME_COST - 1
            ch._send_window = WINDOW_BYTES
            # a multi-frame send under way holds the channel: its parts must not interleave
            async with ch._send_lock:
                assert not ch.send_nowait(b"x")
            await ch.aclose()
            assert not ch.send_nowait(b"after close")
        release.set()
        nursery.cancel_scope.cancel()


async def test_a_hook_takes_messages_in_the_reader_and_a_declined_one_keeps_the_order():
    """What the hook declines waits in the queue, and every message after it goes there too
    until receive() emptied it: the hook never overtakes a message (a relay's order, a
    relayed link's nonces depend on it). A hook that fails declines; the link lives on."""
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery)
        chans, release = await _served(b)
        ch = await a.open_channel(b.advertise, "sink")
        taken: list[bytes] = []
        decline = {b"2"}

        def hook(message: bytes) -> bool:
            if message == b"boom":
                raise RuntimeError("a bug in a hook")
            if message in decline:
                return False
            taken.append(message)
            return True

        with trio.fail_after(GUARD):
            while not chans:
                await trio.sleep(0.01)
            far = chans[0]
            far.hook = hook
            for m in (b"1", b"2", b"3", b"4"):
                await ch.send(m)
            while far._queued < 3:
                await trio.sleep(0.01)
            assert taken == [b"1"]  # 2 declined: 3 and 4 queued behind it
            assert [await far.receive() for _ in range(3)] == [b"2", b"3", b"4"]
            await ch.send(b"5")  # the queue is empty again: the hook takes it
            while taken != [b"1", b"5"]:
                await trio.sleep(0.01)
            await ch.send(b"boom")
            assert await far.receive() == b"boom"
            assert not far.link.closed
            # what the hook took gives its window back like receive does: more than a
            # window's worth goes through (without the grants the sender would stop)
            big = os.urandom(CHUNK)
            for _ in range(WINDOW_BYTES // CHUNK + 8):
                await ch.send(big)
            while len(taken) < 2 + WINDOW_BYTES // CHUNK + 8:
                await trio.sleep(0.01)
            assert far._buffered == 0 and far.link.buffered == 0
        release.set()
        nursery.cancel_scope.cancel()


async def test_raw_socket_sends_what_the_kernel_takes_and_the_rest_goes_after_it():
    left, right = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    raw = rawio.RawSocket.of(stream)
    assert raw is not None
    assert rawio.RawSocket.of(object()) is None  # only TCP/unix socket streams
    data = os.urandom(8 << 20)  # more than the socket buffers hold
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(data):
            got.extend(await peer.receive_some(1 << 20))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await raw.send_all(stream, data)  # partly at once, the rest through the stream
    assert bytes(got) == data
    await stream.aclose()
    with pytest.raises(OSError):  # closed: never a descriptor number reused since
        raw.send_now(b"x")
    await peer.aclose()


async def test_raw_receive_with_data_always_there_still_lets_other_tasks_run():
    left, right = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    raw = rawio.RawSocket.of(stream)
    assert raw is not None
    right.sendall(b"x" * 4096)
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.sleep(0)
            start = ticks
            for _ in range(4 * rawio.YIELD_EVERY):
                assert await raw.receive_some(1) == b"x"
            # it yielded once per YIELD_EVERY receives (4 times): the other task ran at
            # each but perhaps the last (trio may resume the reader first in that batch)
            assert ticks - start >= 3
            nursery.cancel_scope.cancel()
    await stream.aclose()
    right.close()


async def test_raw_receive_never_loses_bytes_to_a_cancel():
    """A cancelled caller reads nothing (the bytes stay for the next read), also when the
    receive would have yielded after reading (its streak): trio's receive_some rule."""
    left, right = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    raw = rawio.RawSocket.of(stream)
    assert raw is not None
    right.sendall(b"ab")
    for streak in (0, rawio.YIELD_EVERY - 1):
        raw._streak = streak
        with trio.CancelScope() as scope:
            scope.cancel()
            await raw.receive_some(1)
        assert scope.cancelled_caught
    assert await raw.receive_some(1) == b"a" and await raw.receive_some(1) == b"b"
    await stream.aclose()
    right.close()


async def test_send_nowait_on_a_link_whose_connection_failed_says_it_was_not_sent():
    """A raw write that fails closes the link: send_nowait returns False (the caller goes
    the ordinary way, which learns the link is gone), never True for a lost frame."""
    async with trio.open_nursery() as nursery:
        _, _, ch, _, release = await _sink(nursery)
        assert ch.link._raw is not None and not ch.link._out and not ch.link._writing
        ch.link._raw._sock.shutdown(socket.SHUT_WR)  # the next write fails (EPIPE)
        assert not ch.send_nowait(b"lost")
        assert ch.link.closed
        release.set()
        nursery.cancel_scope.cancel()


def test_a_reset_peer_is_an_error_not_a_sigpipe_even_with_sigpipe_at_its_default():
    """rawio sends with MSG_NOSIGNAL: code that resets SIGPIPE to SIG_DFL (embedding, a
    signal helper) does not let a peer's reset kill the process (checked in a child)."""
    import subprocess
    import sys

    code = """if True:
        import signal, socket, trio
        from meshd.transport import rawio
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        left, right = socket.socketpair()
        right.close()
        raw = rawio.RawSocket.of(trio.SocketStream(trio.socket.from_stdlib_socket(left)))
        try:
            raw.send_now(b"x" * 65536)
            raw.send_now(b"x" * 65536)
        except OSError:
            print("error")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "error"), out.stderr


async def test_a_flood_of_small_frames_already_read_still_lets_other_tasks_run():
    """2,000 PINGs arrive in one receive: the reader yields every YIELD_FRAMES frames, not
    only every rawio.YIELD_EVERY receives (counted per task step by an instrument)."""
    from meshd.transport import links as links_mod

    async with trio.open_nursery() as nursery:
        _, b, ch, _, release = await _sink(nursery)
        most = 0

        class Steps(trio.abc.Instrument):
            start: int | None = None

            def before_task_step(self, task: trio.lowlevel.Task) -> None:
                self.start = b.stats["link_frames_in"]

            def after_task_step(self, task: trio.lowlevel.Task) -> None:
                nonlocal most
                if self.start is not None:
                    most = max(most, b.stats["link_frames_in"] - self.start)

        link = ch.link
        flood = b"".join(link.cipher.seal(links_mod.HEADER.pack(links_mod.PING, 0))
                         for _ in range(2000))  # sealed in order, no await between
        before = b.stats["link_frames_in"]
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            assert link._raw is not None and link._raw.send_now(flood) == len(flood)
            with trio.fail_after(GUARD):
                while b.stats["link_frames_in"] < before + 2000:
                    await trio.sleep(0.01)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert most <= links_mod.YIELD_FRAMES
        release.set()
        nursery.cancel_scope.cancel()

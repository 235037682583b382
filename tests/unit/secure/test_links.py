"""Handshake, AEAD frames and multiplexed links on loopback."""

from __future__ import annotations

import os

import pytest
import trio

from meshd.identity import Identity
from meshd.secure.frames import FrameCipher, FrameError
from meshd.secure.handshake import SECRET_MISMATCH, HandshakeError, Initiator, Responder
from meshd.secure.keyring import Keyring, KeyringError, SealError, new_secret, parse_secret
from meshd.transport.links import Channel, LinkError, LinkManager


def test_handshake_agrees_on_keys_and_identities():
    secret = new_secret()
    a, b = Identity.generate(), Identity.generate()
    ini = Initiator(a, Keyring([secret]), "a:1")
    res = Responder(b, Keyring([secret]), "b:1")
    confirm, ikeys = ini.on_welcome(res.on_hello(ini.hello()))
    rkeys = res.on_confirm(confirm)
    assert ikeys.send_key == rkeys.recv_key and ikeys.recv_key == rkeys.send_key
    assert ikeys.peer_id == b.node_id and rkeys.peer_id == a.node_id
    assert rkeys.peer_addr == "a:1" and ikeys.peer_addr == "b:1"


def test_handshake_refuses_wrong_secret_and_tampering():
    a, b = Identity.generate(), Identity.generate()
    ini = Initiator(a, Keyring([new_secret()]), "a:1")
    res = Responder(b, Keyring([new_secret()]), "b:1")
    with pytest.raises(HandshakeError, match=SECRET_MISMATCH):
        res.on_hello(ini.hello())
    secret = new_secret()
    ini = Initiator(a, Keyring([secret]), "a:1")
    res = Responder(b, Keyring([secret]), "b:1")
    welcome = bytearray(res.on_hello(ini.hello()))
    welcome[-5] ^= 1
    with pytest.raises(HandshakeError):
        ini.on_welcome(bytes(welcome))


def test_frames_reject_replay_reorder_and_tamper():
    k1, k2 = os.urandom(32), os.urandom(32)
    tx, rx = FrameCipher(k1, k2, 1024), FrameCipher(k2, k1, 1024)
    f1, f2 = tx.seal(b"one")[4:], tx.seal(b"two")[4:]
    assert rx.open(f1) == b"one"
    with pytest.raises(FrameError):
        rx.open(f1)  # replay
    rx2 = FrameCipher(k2, k1, 1024)
    with pytest.raises(FrameError):
        rx2.open(f2)  # reorder
    with pytest.raises(FrameError):
        tx.seal(b"x" * 2000)


def test_keyring_seal_open_roll_and_errors():
    old, new = new_secret(), new_secret()
    ring = Keyring([old])
    sealed_old = ring.seal(b"hello")
    assert ring.install(new) and not ring.install(new)
    ring.use(new)
    assert ring.open(sealed_old) == b"hello"
    assert Keyring([new]).open(ring.seal(b"x")) == b"x"
    with pytest.raises(SealError):
        Keyring([old]).open(ring.seal(b"x"))
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(new)
    assert ring.remove(old)
    with pytest.raises(SealError):
        ring.open(sealed_old)
    with pytest.raises(KeyringError, match="base64"):
        parse_secret("not base64!!")


async def _pair(secret_b: bytes | None = None, *, nursery):
    secret = new_secret()
    a = LinkManager(Identity.generate(), Keyring([secret]), "127.0.0.1:0")
    b = LinkManager(Identity.generate(), Keyring([secret_b or secret]), "127.0.0.1:0")
    port_a = await nursery.start(a.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
    port_b = await nursery.start(b.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
    a.advertise, b.advertise = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    return a, b


async def test_link_channels_echo_large_messages_with_flow_control():
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery=nursery)

        async def echo(ch: Channel) -> None:
            while True:
                await ch.send(await ch.receive())

        b.handlers["echo"] = echo
        big = os.urandom(3 * 1024 * 1024)
        async with await a.open_channel(b.advertise, "echo") as ch:
            await ch.send(b"small")
            assert await ch.receive() == b"small"
            await ch.send(big)
            assert await ch.receive() == big
        # many channels share one link
        chans = [await a.open_channel(b.advertise, "echo") for _ in range(5)]
        assert len({id(c.link) for c in chans}) == 1
        for i, c in enumerate(chans):
            await c.send(str(i).encode())
        assert [await c.receive() for c in chans] == [str(i).encode() for i in range(5)]
        nursery.cancel_scope.cancel()


async def test_link_with_wrong_secret_fails_fast_and_clearly():
    async with trio.open_nursery() as nursery:
        a, b = await _pair(new_secret(), nursery=nursery)
        with trio.fail_after(5):
            with pytest.raises(LinkError, match="secret does not match"):
                await a.connect(b.advertise)
        assert b.stats["handshakes_failed"] == 1
        nursery.cancel_scope.cancel()


async def test_garbage_on_the_stream_is_dropped_node_keeps_serving():
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery=nursery)

        async def echo(ch: Channel) -> None:
            await ch.send(await ch.receive())

        b.handlers["echo"] = echo
        port = int(b.advertise.rsplit(":", 1)[1])
        for payload in (b"\x00\x00\x00\x05hello", b"\xff" * 64, os.urandom(1000)):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(payload)
            await s.aclose()
        async with await a.open_channel(b.advertise, "echo") as ch:
            await ch.send(b"still here")
            assert await ch.receive() == b"still here"
        nursery.cancel_scope.cancel()


async def test_receive_ready_takes_what_is_here_and_leaves_the_rest_to_receive():
    """Messages already here come off the channel without waiting; a long message (several
    frames) or a close is left whole for receive(), and the window freed meanwhile is granted
    back, so a peer sending past a window's worth is never stuck."""
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery=nursery)
        got: list[bytes] = []
        done = trio.Event()

        async def drain(ch: Channel) -> None:
            try:
                while True:
                    got.append(await ch.receive())
                    while (more := ch.receive_ready()) is not None:
                        got.append(more)
            except Exception:
                done.set()
                raise

        b.handlers["drain"] = drain
        big = os.urandom(300 * 1024)  # several frames
        async with await a.open_channel(b.advertise, "drain") as ch:
            sent = [os.urandom(1000) for _ in range(6000)]  # past one window's worth (4 MiB)
            with trio.fail_after(20):
                for m in sent[:3000]:
                    await ch.send(m)
                await ch.send(big)
                for m in sent[3000:]:
                    await ch.send(m)
                while len(got) < 6001:
                    await trio.sleep(0.01)
        assert got == [*sent[:3000], big, *sent[3000:]]
        with trio.fail_after(5):
            await done.wait()  # the close reached receive(), which raised ChannelClosed
        nursery.cancel_scope.cancel()

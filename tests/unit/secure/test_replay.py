"""Issue 11 item 14: sealed UDP has a replay window. A packet is opened once; a replay of it,
or a packet stamped too far from our clock, is refused (and counted by the transport)."""

from __future__ import annotations

import socket

import pytest
import trio

from meshd.secure.keyring import (
    Keyring,
    ReplayCacheFull,
    ReplayedPacket,
    ReplayWindow,
    SealError,
    StalePacket,
    new_secret,
)
from meshd.transport.udp import UdpTransport

NOW = 1_700_000_000.0


def test_a_replayed_packet_is_refused_the_second_time():
    ring = Keyring([new_secret()])
    packet = ring.seal(b"suspect b", NOW)
    assert ring.open(packet, NOW + 1) == b"suspect b"
    with pytest.raises(ReplayedPacket):
        ring.open(packet, NOW + 2)
    assert ring.open(ring.seal(b"suspect b", NOW + 2), NOW + 2) == b"suspect b", \
        "the same message sealed again is a new packet"


@pytest.mark.parametrize("age", [600.0, -600.0])
def test_a_packet_ten_minutes_off_our_clock_is_refused(age):
    ring = Keyring([new_secret()])
    with pytest.raises(StalePacket):
        ring.open(ring.seal(b"ping", NOW - age), NOW)
    assert ring.open(ring.seal(b"ping", NOW - age / 20), NOW) == b"ping", "30 s is fine"


def test_the_time_is_authenticated():
    ring = Keyring([new_secret()])
    packet = bytearray(ring.seal(b"ping", NOW - 600))
    packet[4:12] = int(NOW * 1000).to_bytes(8, "big")  # made fresh again by hand
    with pytest.raises(SealError, match="authentication"):
        ring.open(bytes(packet), NOW)


def test_nonces_are_forgotten_once_a_replay_would_be_stale_anyway():
    window = ReplayWindow(60.0)
    for i in range(100):
        window.check(int(NOW * 1000), i.to_bytes(12, "big"), NOW)
    assert len(window) == 100
    window.check(int((NOW + 200) * 1000), b"x" * 12, NOW + 200)
    assert len(window) == 1, "memory is bounded by the window"


def test_at_capacity_new_packets_are_refused_not_old_ones_forgotten():
    window = ReplayWindow(60.0, max_entries=3)
    for i in range(3):
        window.check(int(NOW * 1000), bytes([i]) * 12, NOW)
    with pytest.raises(ReplayCacheFull):
        window.check(int(NOW * 1000), b"\x09" * 12, NOW)
    with pytest.raises(ReplayedPacket):  # still remembered
        window.check(int(NOW * 1000), b"\x00" * 12, NOW)


async def test_udp_transport_drops_and_counts_replayed_and_stale_packets():
    ring = Keyring([new_secret()])
    rx = UdpTransport(ring)
    port = await rx.bind("127.0.0.1", 0)
    got: list[bytes] = []
    last = trio.Event()

    def handle(addr: str, plaintext: bytes) -> None:
        got.append(plaintext)
        if plaintext == b"last":
            last.set()

    out = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rx.serve, handle)
        captured = ring.seal(b"suspect")
        for packet in (captured, captured, ring.seal(b"old", 1.0),
                       ring.seal(b"last")):
            await out.sendto(packet, ("127.0.0.1", port))
        with trio.fail_after(10):  # a hang guard, not a timing check
            await last.wait()
        nursery.cancel_scope.cancel()
    out.close()
    rx.close()
    assert got == [b"suspect", b"last"]
    assert rx.stats["udp_dropped_replay"] == 1
    assert rx.stats["udp_dropped_stale"] == 1
    assert rx.stats["udp_in"] == 2


def test_one_source_cannot_fill_the_window_for_everyone():
    from meshd.secure.keyring import ReplayCacheFull, ReplayWindow

    w = ReplayWindow(60.0, max_entries=800)  # a source may hold an eighth: 100
    now = 1000.0
    refused = 0
    for i in range(300):
        try:
            w.check(int(now * 1000), i.to_bytes(12, "big"), now, "10.0.0.66")
        except ReplayCacheFull:
            refused += 1
    assert refused == 200
    w.check(int(now * 1000), b"x" * 12, now, "10.0.0.5")  # another member is still heard
    assert len(w) == 101
    w.check(int((now + 200) * 1000), b"y" * 12, now + 200, "10.0.0.66")  # the window moved on

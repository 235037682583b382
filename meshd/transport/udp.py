"""Sealed UDP datagrams for probes and gossip.

Rules:
- Every packet out is sealed with the keyring's primary secret and stamped with our wall
  clock; every packet in must open with one of its secrets, or it is dropped and counted
  (never raised).
- Replay window (`replay_window`, the limits.udp_replay_window setting): a packet stamped
  more than the window away from our clock is dropped (udp_dropped_stale), one already
  received within it too (udp_dropped_replay; udp_dropped_replay_full when the window's
  memory is full: refused rather than forgotten). Replayed pings and suspicions would
  otherwise make members answer and refute again and again.
- Packets larger than `max_packet` are dropped on both sides.
- Datagrams go only to IP-literal addresses (a peer can name any text as an address; we
  never resolve names on its behalf); others are dropped and counted.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import trio

from meshd.secure.keyring import (
    REPLAY_WINDOW,
    Keyring,
    ReplayCacheFull,
    ReplayedPacket,
    ReplayWindow,
    SealError,
    StalePacket,
)

from . import addr as addrs

log = logging.getLogger("meshd.transport.udp")


class UdpTransport:
    def __init__(self, keyring: Keyring, max_packet: int = 65000,
                 replay_window: float = REPLAY_WINDOW) -> None:
        self.keyring = keyring
        self.max_packet = max_packet
        self.replay = ReplayWindow(replay_window)
        self.sock: trio.socket.SocketType | None = None
        self.stats = {"udp_in": 0, "udp_out": 0, "udp_dropped_unsealed": 0,
                      "udp_dropped_oversize": 0, "udp_send_errors": 0, "udp_bad_address": 0,
                      "udp_dropped_stale": 0, "udp_dropped_replay": 0,
                      "udp_dropped_replay_full": 0}

    async def bind(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await sock.bind((host, port))
        self.sock = sock
        return sock.getsockname()[1]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    async def send(self, addr: str, plaintext: bytes) -> None:
        assert self.sock is not None
        data = self.keyring.seal(plaintext, time.time())
        if len(data) > self.max_packet:
            self.stats["udp_dropped_oversize"] += 1
            return
        try:
            host, port = addrs.parse(addr)
            ipaddress.ip_address(host)  # gossip goes to IP literals only: no DNS on this path
        except ValueError:
            self.stats["udp_bad_address"] += 1
            return
        try:
            await self.sock.sendto(data, (host, port))
            self.stats["udp_out"] += 1
        except (OSError, ValueError) as exc:
            self.stats["udp_send_errors"] += 1
            log.debug("udp send to %s failed: %s", addr, exc)

    async def serve(self, handle: Callable[[str, bytes], Awaitable[None] | None]) -> None:
        """Receive forever; hand each opened packet to handle(sender_addr, plaintext)."""
        assert self.sock is not None
        while True:
            try:
                data, source = await self.sock.recvfrom(65536)
            except OSError as exc:  # e.g. ICMP port unreachable surfaced on Linux
                log.debug("udp receive error: %s", exc)
                continue
            if len(data) > self.max_packet:
                self.stats["udp_dropped_oversize"] += 1
                continue
            try:
                plaintext = self.keyring.open(data, time.time(), self.replay, source[0])
            except StalePacket:
                self.stats["udp_dropped_stale"] += 1
                continue
            except ReplayCacheFull:
                self.stats["udp_dropped_replay_full"] += 1
                continue
            except ReplayedPacket:
                self.stats["udp_dropped_replay"] += 1
                continue
            except SealError:
                self.stats["udp_dropped_unsealed"] += 1
                continue
            self.stats["udp_in"] += 1
            result = handle(addrs.format(source[0], source[1]), plaintext)
            if result is not None:
                await result

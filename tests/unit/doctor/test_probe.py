"""The daemon's side of `meshd doctor` (meshd/doctor/probe.py), two probes talking over
in-memory channels: the clock offset of a skewed member, UDP each way, its version, and a
member that does not answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.doctor.probe import CHANNEL, DoctorProbe
from meshd.transport.links import ChannelClosed, LinkError


@dataclass
class Member:
    name: str
    addr: str
    state: int = 0
    rtt_at: float | None = None


@dataclass
class Core:
    me: Member
    members: dict[str, Member] = field(default_factory=dict)
    unreached: frozenset[str] = frozenset()

    def member_list(self) -> list[Member]:
        return [self.me, *self.members.values()]


class End:
    """One end of an in-memory channel."""

    def __init__(self, send: Any, recv: Any, peer: str) -> None:
        self.send_ch, self.recv_ch, self.peer_node = send, recv, peer

    async def send(self, data: bytes) -> None:
        await self.send_ch.send(data)

    async def receive(self) -> bytes:
        try:
            return await self.recv_ch.receive()
        except trio.EndOfChannel:
            raise ChannelClosed("closed") from None

    async def __aenter__(self) -> End:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.send_ch.aclose()


class Links:
    """Routes open_channel(addr) to the handler of the probe at addr."""

    def __init__(self, name: str, world: dict[str, Links], nursery: trio.Nursery) -> None:
        self.name, self.world, self.nursery = name, world, nursery
        self.handlers: dict[str, Any] = {}

    async def open_channel(self, addr: str, name: str) -> End:
        other = self.world.get(addr)
        if other is None:
            raise LinkError(f"no route to {addr}")
        a_send, b_recv = trio.open_memory_channel[bytes](10)
        b_send, a_recv = trio.open_memory_channel[bytes](10)
        self.nursery.start_soon(other.handlers[name], End(b_send, b_recv, self.name))
        return End(a_send, a_recv, addr)


class Keyring:
    def secrets(self) -> list[bytes]:
        return [b"s1", b"s2"]


async def test_a_skewed_member_is_measured_and_udp_is_reported_each_way():
    now = trio.current_time()
    async with trio.open_nursery() as nursery:
        world: dict[str, Links] = {}
        a_core = Core(Member("a", "a"), {"b": Member("b", "b", rtt_at=now - 2.0),
                                         "gone": Member("gone", "gone")})
        b_core = Core(Member("b", "b"), {"a": Member("a", "a", rtt_at=None)},
                      unreached=frozenset({"a"}))
        world["a"] = Links("a", world, nursery)
        world["b"] = Links("b", world, nursery)
        wall = 1_000_000
        a = DoctorProbe(a_core, world["a"], "1.1", Keyring(), wall_ms=lambda: wall)
        DoctorProbe(b_core, world["b"], "1.0", Keyring(), wall_ms=lambda: wall + 45_000)
        assert CHANNEL in world["b"].handlers
        report = await a.doctor({})
    assert report["name"] == "a" and report["version"] == "1.1"
    assert report["keyring"] == {"count": 2}
    b, gone = report["members"]
    assert b["name"] == "b" and b["version"] == "1.0"
    assert 44_000 < b["offset_ms"] <= 45_000  # b's clock runs 45 s ahead of ours
    assert b["udp_out_unreached"] is False and 1.9 < b["udp_out_age_s"] < 10
    assert b["udp_in_age_s"] is None and b["udp_in_unreached"] is True  # b never heard us
    assert gone["name"] == "gone" and "no route" in gone["error"]


async def test_a_channel_from_a_non_member_or_with_junk_gets_nothing():
    core = Core(Member("a", "a"), {})
    sent: list[bytes] = []

    class Ch:
        peer_node: str | None = None

        async def receive(self) -> bytes:
            return b"[" * 5000

        async def send(self, data: bytes) -> None:
            sent.append(data)

    probe = DoctorProbe(core, Links("a", {}, None), "1", Keyring())  # type: ignore[arg-type]
    await probe._serve(Ch())  # not a member: not even read
    member = Ch()
    member.peer_node = "x"
    await probe._serve(member)  # over MAX_REQUEST
    assert sent == []

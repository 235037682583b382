"""The daemon's side of `meshd doctor`: a round trip to each member over its link.

Theory of operation: the op `doctor` opens channel `doctor` to every member not gone (left) at once
(bounded: PROBE_TIMEOUT each) and sends our wall clock; the member answers with its own wall
clock, its version and how its direct UDP probes of us fare (seconds since our last direct
ack, and whether it counts us as unreached). From our side we add how our probes of it fare.
So one exchange gives: TCP both ways (the round trip), UDP each way, the clock offset (its
clock minus ours at the midpoint of the round trip) and its version.

Rules:
- Channel `doctor` answers only members (the link's proven identity names the asker) and
  reads one bounded request (MAX_REQUEST bytes of JSON) per channel.
- The op is the operator's (it probes the whole cluster); it also reports this node's pid
  and how many secrets its keyring holds (never the secrets).
- A member that does not know channel `doctor` (an older release) or does not answer is
  reported with the error, not left out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from meshd.ops import Op
from meshd.transport.links import Channel, LinkManager

CHANNEL = "doctor"
MAX_REQUEST = 1024  # and answer: both are one small JSON object
MAX_WALL_MS = 2**53
PROBE_TIMEOUT = 5.0
PROBED = (0, 1, 2)  # alive, suspect, dead (why dead is what a doctor is for)


class DoctorProbe:
    def __init__(self, core: Any, links: LinkManager, version: str, keyring: Any,
                 wall_ms: Callable[[], int] | None = None) -> None:
        self.core = core
        self.links = links
        self.version = version
        self.keyring = keyring
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        links.handlers[CHANNEL] = self._serve

    def ops(self) -> list[Op]:
        return [Op("doctor", self.doctor, "operator")]

    def _udp_view(self, name: str | None) -> tuple[float | None, bool | None]:
        """(seconds since `name` last answered our direct probe, whether it is unreached)."""
        member = self.core.members.get(name) if name else None
        if member is None:
            return None, None
        age = None if member.rtt_at is None else round(trio.current_time() - member.rtt_at, 3)
        return age, name in self.core.unreached

    async def _serve(self, ch: Channel) -> None:
        asker = ch.peer_node
        if asker is None:
            return
        with trio.move_on_after(PROBE_TIMEOUT):
            raw = await ch.receive()
            if len(raw) > MAX_REQUEST:
                return
            try:
                request = json.loads(raw)
            except (ValueError, RecursionError):
                return
            if not isinstance(request, dict):
                return
            age, unreached = self._udp_view(asker)
            await ch.send(json.dumps({"t": self.wall_ms(), "version": self.version,
                                      "udp_age_s": age, "unreached": unreached}).encode())

    async def doctor(self, _: dict[str, Any]) -> dict[str, Any]:
        me = self.core.me.name
        members = [m for m in self.core.member_list() if m.name != me and m.state in PROBED]
        reports: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            for m in members:
                nursery.start_soon(self._probe, m, reports)
        return {"name": me, "pid": os.getpid(), "version": self.version,
                "keyring": {"count": len(self.keyring.secrets())},
                "members": sorted(reports, key=lambda r: r["name"])}

    async def _probe(self, member: Any, reports: list[dict[str, Any]]) -> None:
        out_age, out_unreached = self._udp_view(member.name)
        report: dict[str, Any] = {"name": member.name, "address": member.addr,
                                  "udp_out_age_s": out_age,
                                  "udp_out_unreached": out_unreached}
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                async with await self.links.open_channel(member.addr, CHANNEL) as ch:
                    t0, m0 = self.wall_ms(), trio.current_time()
                    await ch.send(json.dumps({"t": t0}).encode())
                    raw = await ch.receive()
                    rtt = trio.current_time() - m0
            report.update(_answer(raw, t0, rtt))
        except trio.TooSlowError:
            report["error"] = f"no answer within {PROBE_TIMEOUT:g} s"
        except Exception as exc:  # whatever the member sent or the link did: its row says
            report["error"] = (str(exc) or type(exc).__name__)[:200]
        reports.append(report)


def _answer(raw: bytes, t0: int, rtt: float) -> dict[str, Any]:
    """A member's answer, checked: a small JSON object, a wall clock in range, printable
    text and finite numbers only (it is shown on the operator's terminal)."""
    if len(raw) > MAX_REQUEST:
        raise ValueError(f"an answer of {len(raw)} bytes (at most {MAX_REQUEST})")
    answer = json.loads(raw)
    t = answer.get("t") if isinstance(answer, dict) else None
    if type(t) is not int or not 0 <= t < MAX_WALL_MS:
        raise ValueError("not a doctor answer")
    age = answer.get("udp_age_s")
    version = str(answer.get("version", ""))[:64]
    return {"rtt_ms": round(rtt * 1000, 3), "offset_ms": round(t - (t0 + rtt * 500), 1),
            "version": "".join(c for c in version if c.isprintable()),
            "udp_in_age_s": age if type(age) in (int, float) and math.isfinite(age)
            and age >= 0 else None,
            "udp_in_unreached": answer["unreached"]
            if isinstance(answer.get("unreached"), bool) else None}

"""Wire protocol versions: the range of each protocol this release speaks, and the version
two nodes use (memberlist's ProtocolMin/Max/Cur, per protocol).

Theory of operation: every wire protocol has a range [min, max]. A node advertises its
ranges in the membership tag `proto` ("membership=2-2,link=2-2,..."), so every member knows
what every other speaks before it opens a link or sends a packet; toward a member it uses
the highest version both speak (`use`), and it accepts any version in its own range
(`check`). A member that advertises no ranges is an earlier release (before 0.2.0), which
spoke exactly BASELINE. Only a peer with no version in common is refused, and the refusal
names both ranges, so the operator knows which side to upgrade.

Rules:
- Raising a protocol's `max` adds a version; raising its `min` drops the oldest, which is
  allowed only once no supported release speaks it: this release and the previous one always
  share a version of every protocol (docs/operations.md, "Rolling upgrades").
- The tag is bounded (MAX_TAG characters, MAX_ENTRIES protocols); a malformed tag counts as
  no tag (BASELINE), never as an error that drops the member.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshd.errors import MeshError

TAG = "proto"
MAX_TAG = 200
MAX_ENTRIES = 16


@dataclass(frozen=True)
class Range:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}..{self.high}"

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and self.low <= version <= self.high


# What this release speaks. membership: UDP packets and gossip items; link: the stream
# handshake and frames; replication: store, registry and broker sync over links; control:
# the control socket's requests; proxy: outside clients over WebSocket (environments).
PROTOCOLS: dict[str, Range] = {
    "membership": Range(2, 3),
    "link": Range(2, 2),
    "replication": Range(1, 1),
    "control": Range(1, 1),
    "proxy": Range(1, 1),
}

# What a member without the `proto` tag speaks: the releases before ranges were advertised.
BASELINE: dict[str, Range] = {
    "membership": Range(2, 2),
    "link": Range(2, 2),
    "replication": Range(1, 1),
    "control": Range(1, 1),
    "proxy": Range(1, 1),
}


class VersionError(MeshError):
    """No version of a protocol both sides speak."""

    def __init__(self, detail: str) -> None:
        super().__init__(426, detail, id="meshd.versions")


def tag(ranges: Mapping[str, Range] = PROTOCOLS) -> str:
    """The `proto` tag's value: "membership=2-2,link=2-2,..."."""
    return ",".join(f"{name}={r.low}-{r.high}" for name, r in ranges.items())


def parse(text: str | None) -> dict[str, Range]:
    """A member's ranges from its `proto` tag (BASELINE for a missing or malformed tag,
    and for any protocol it does not name)."""
    out = dict(BASELINE)
    if not isinstance(text, str) or not text or len(text) > MAX_TAG:
        return out
    entries = text.split(",")
    if len(entries) > MAX_ENTRIES:
        return out
    for entry in entries:
        name, _, span = entry.partition("=")
        low, _, high = span.partition("-")
        if not (name and low.isascii() and low.isdigit() and high.isascii()
                and high.isdigit() and len(low) <= 6 and len(high) <= 6):
            return dict(BASELINE)
        if int(low) > int(high):
            return dict(BASELINE)
        out[name] = Range(int(low), int(high))
    return out


def use(protocol: str, theirs: Mapping[str, Range], peer: str = "the peer",
        mine: Mapping[str, Range] = PROTOCOLS) -> int:
    """The version to speak to a peer with ranges `theirs`: the highest both speak."""
    a, b = mine[protocol], theirs.get(protocol, BASELINE[protocol])
    best = min(a.high, b.high)
    if best < max(a.low, b.low):
        raise VersionError(f"{protocol} protocol: this node speaks {a}, {peer} speaks {b}: "
                           "no version in common (upgrade the older side)")
    return best


def check(protocol: str, version: object, peer: str = "the peer",
          mine: Mapping[str, Range] = PROTOCOLS) -> int:
    """`version` if this node speaks it, else VersionError naming both."""
    r = mine[protocol]
    if version in r:
        return version  # type: ignore[return-value]
    return _refuse(protocol, version, peer, r)


def _refuse(protocol: str, version: object, peer: str, r: Range) -> int:
    raise VersionError(f"{protocol} protocol: {peer} spoke version {version!r}, this node "
                       f"speaks {r} (upgrade the older side)")


def offered(protocol: str, value: object, peer: str = "the client") -> int:
    """The version to speak to a client that offered the range `value` ([low, high]; none:
    a client from before ranges, which speaks BASELINE)."""
    if value is None:
        theirs = BASELINE[protocol]
    elif (isinstance(value, list) and len(value) == 2
          and all(type(v) is int and 0 <= v < 1_000_000 for v in value)
          and value[0] <= value[1]):
        theirs = Range(value[0], value[1])
    else:
        raise MeshError(400, f"v must be [low, high], the {protocol} protocol versions the "
                             "client speaks", id="meshd.versions")
    return use(protocol, {protocol: theirs}, peer)


def mine(protocol: str) -> list[int]:
    """This node's range of `protocol`, as sent on the wire ([low, high])."""
    r = PROTOCOLS[protocol]
    return [r.low, r.high]


def describe(ranges: Mapping[str, Range] = PROTOCOLS) -> dict[str, list[int]]:
    """The ranges as JSON: {"link": [2, 2], ...} (`meshd version --json`, status)."""
    return {name: [r.low, r.high] for name, r in ranges.items()}

"""Membership messages and their strict CBOR wire format.

Rules:
- A packet is the CBOR array ``[VERSION, [item, ...]]``; an item is ``[type, field, ...]``.
  The first item is the packet's main message; the rest are piggybacked broadcasts (a gossip
  packet has only broadcasts). Every item is handled the same way on receipt.
- Decoding is strict: the version, each item's type, field count, field types and sizes are
  checked. Anything wrong raises :class:`DecodeError` and nothing else, whatever the bytes.
- Messages are plain slotted classes; the core never sees bytes.
- Identity: an Alive (and a push-pull's member state) carries the member's ed25519 public
  key and its signature over ``alive_payload`` (incarnation, name, address, tags, key), so
  a member's name and address are bound to the key that proved them; only the key's holder
  can change them. Keys and signatures are empty only where no identity is used (the
  simulator); the daemon refuses unsigned alives (see membership/identity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from sys import intern
from typing import Any, ClassVar

import cbor2

from meshd.versions import PROTOCOLS

# 2: alives and member states carry the identity key and its signature
# 3: digest push-pull (Digest, DigestReply), sent only to members that advertise 3
VERSION = 2  # what a packet says unless it carries a version-3 message
DIGEST_VERSION = 3

# Bounds checked while decoding. Sizes of whole packets and frames are the shell's business;
# these bound each field so a hostile peer cannot make us hold huge objects.
MAX_NAME = 128  # node names
MAX_ADDR = 256  # "host:port", "[v6]:port" or ws:// URLs
MAX_TAGS = 64  # number of tag entries
MAX_TAG_TEXT = 256  # length of one tag key or value
MAX_ITEMS = 256  # messages in one packet
MAX_STATES = 100_000  # members in one push-pull
MAX_UINT = 2**63 - 1
MAX_SEQ = 2**32 - 1
MAX_HOPS = 8  # relays a routed indirect probe may pass (core.py P5)
DIGEST_BUCKETS = 256  # anti-entropy digest buckets (table.py), 4 bytes each on the wire
KEY_BYTES = 32  # ed25519 public key
SIG_BYTES = 64  # ed25519 signature

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATE_NAMES = ("alive", "suspect", "dead", "left")


class DecodeError(ValueError):
    """Raised for any input that is not a valid membership packet."""


@dataclass(slots=True)
class Ping:
    """Direct probe. `target` is the name the sender thinks it is probing. A `quiet` ping
    (a measurement, core rule P6) is answered with a bare ack: no piggybacked broadcasts."""

    TYPE: ClassVar[int] = 1
    seq: int
    target: str
    source: str
    source_addr: str
    quiet: bool = False

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.seq, self.target, self.source, self.source_addr, self.quiet]


@dataclass(slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` on the sender's behalf (and nack if `nack`)."""

    TYPE: ClassVar[int] = 2
    seq: int
    target: str
    target_addr: str
    source: str
    source_addr: str
    nack: bool
    hops: int = 0  # relays this request already passed (routed probes, see core.py P5)

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.seq, self.target, self.target_addr, self.source,
                self.source_addr, self.nack, self.hops]


@dataclass(slots=True)
class Ack:
    TYPE: ClassVar[int] = 3
    seq: int

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.seq]


@dataclass(slots=True)
class Nack:
    """An indirect prober heard nothing from the target (Lifeguard)."""

    TYPE: ClassVar[int] = 4
    seq: int

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.seq]


@dataclass(slots=True)
class Alive:
    TYPE: ClassVar[int] = 5
    incarnation: int
    node: str
    addr: str
    tags: dict[str, str]
    key: bytes = b""  # the member's identity key (ed25519 public)
    sig: bytes = b""  # its signature over alive_payload(...)

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.incarnation, self.node, self.addr, self.tags, self.key,
                self.sig]

    def payload(self) -> bytes:
        return alive_payload(self.incarnation, self.node, self.addr, self.tags, self.key)


def alive_payload(incarnation: int, node: str, addr: str, tags: dict[str, str],
                  key: bytes) -> bytes:
    """The bytes a member signs to say who and where it is (canonical CBOR)."""
    return cbor2.dumps(["meshd-alive-v1", incarnation, node, addr, tags, key], canonical=True)


@dataclass(slots=True)
class Suspect:
    TYPE: ClassVar[int] = 6
    incarnation: int
    node: str
    source: str

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.incarnation, self.node, self.source]


@dataclass(slots=True)
class Dead:
    """`node` is dead at `incarnation`; when source == node it left gracefully."""

    TYPE: ClassVar[int] = 7
    incarnation: int
    node: str
    source: str

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.incarnation, self.node, self.source]


@dataclass(slots=True)
class MemberState:
    """One member as carried by push-pull, and as a member table holds it (a record: never
    changed once made, shared by the cores of a simulation)."""

    node: str
    addr: str
    incarnation: int
    state: int
    tags: dict[str, str]
    key: bytes = b""
    sig: bytes = b""  # the member's own signature of its alive at this incarnation
    # its digest hash once computed (membership/table.py); never on the wire
    h: int = field(default=-1, compare=False, repr=False)

    def to_wire(self) -> list[Any]:
        return [self.node, self.addr, self.incarnation, self.state, self.tags, self.key,
                self.sig]


@dataclass(slots=True)
class PushPull:
    """Full-state exchange (anti-entropy). `join` marks a join or reconnect attempt;
    `reply` marks the answer to a request."""

    TYPE: ClassVar[int] = 8
    source: str
    join: bool
    reply: bool
    states: list[MemberState]

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.source, self.join, self.reply,
                [s.to_wire() for s in self.states]]


@dataclass(slots=True)
class Digest:
    """Anti-entropy by digest (version 3): the sender's member table as DIGEST_BUCKETS
    bucket digests (table.py). The receiver answers with a DigestReply."""

    TYPE: ClassVar[int] = 9
    source: str
    buckets: bytes

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.source, self.buckets]


@dataclass(slots=True)
class DigestReply:
    """The answer to a Digest: `want` is a bitmap of the buckets that differ (empty: the
    tables agree) and `states` the replier's members in them. The digest's sender merges
    them and sends its own in those buckets back as a one-way PushPull (reply=True)."""

    TYPE: ClassVar[int] = 10
    source: str
    want: bytes
    states: list[MemberState]

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.source, self.want, [s.to_wire() for s in self.states]]


Message = (Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | PushPull | Digest
           | DigestReply)
_V3 = (Digest, DigestReply)
_V3_TYPES = frozenset(c.TYPE for c in _V3)


def encode_packet(msgs: list[Message]) -> bytes:
    """Encode messages as one packet: version 2 unless it carries a version-3 message
    (which the core sends only to members that speak 3)."""
    version = DIGEST_VERSION if any(isinstance(m, _V3) for m in msgs) else VERSION
    return cbor2.dumps([version, [m.to_wire() for m in msgs]])


def wire_size(msg: Message) -> int:
    """Encoded size of one item inside a packet: counted without encoding for the messages
    every probe sends (equal to the encoder's by test), encoded for the rest."""
    kind = type(msg)
    if kind is Ack or kind is Nack:
        return 2 + _int_size(msg.seq)  # type: ignore[union-attr]
    if kind is Ping:
        return (3 + _int_size(msg.seq) + _text_size(msg.target)  # type: ignore[union-attr]
                + _text_size(msg.source) + _text_size(msg.source_addr))  # type: ignore[union-attr]
    if kind is IndirectPing:
        return (3 + _int_size(msg.seq) + _text_size(msg.target)  # type: ignore[union-attr]
                + _text_size(msg.target_addr) + _text_size(msg.source)  # type: ignore[union-attr]
                + _text_size(msg.source_addr) + _int_size(msg.hops))  # type: ignore[union-attr]
    return len(cbor2.dumps(msg.to_wire()))


def _head_size(n: int) -> int:
    """CBOR's initial bytes for an argument n >= 0 (an unsigned int, or a length)."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    return 5 if n < 0x100000000 else 9


def _int_size(n: int) -> int:
    if 0 <= n < 24:
        return 1
    return _head_size(n if n >= 0 else -1 - n)


def _text_size(s: str) -> int:
    n = len(s) if s.isascii() else len(s.encode())
    return (1 if n < 24 else _head_size(n)) + n


# --- strict decoding -------------------------------------------------------------------

def _uint(v: Any, limit: int = MAX_UINT) -> int:
    if type(v) is not int or v < 0 or v > limit:
        raise DecodeError(f"expected unsigned integer <= {limit}")
    return v


def _text(v: Any, limit: int, allow_empty: bool = False) -> str:
    if type(v) is not str or len(v) > limit or (not v and not allow_empty):
        raise DecodeError(f"expected text of 1..{limit} characters")
    return v


def _flag(v: Any) -> bool:
    if type(v) is not bool:
        raise DecodeError("expected boolean")
    return v


def _tags(v: Any) -> dict[str, str]:
    if type(v) is not dict or len(v) > MAX_TAGS:
        raise DecodeError(f"expected a map of at most {MAX_TAGS} tags")
    for key, value in v.items():
        _text(key, MAX_TAG_TEXT)
        _text(value, MAX_TAG_TEXT, allow_empty=True)
    # interned: the keys and most values (versions, auth root) are the same on every member,
    # and a daemon holds thousands of members' tags (interned strings die with their users)
    return {intern(key): intern(value) for key, value in v.items()}


def _blob(v: Any, size: int) -> bytes:
    """Empty, or exactly `size` bytes (keys and signatures)."""
    if type(v) is not bytes or len(v) not in (0, size):
        raise DecodeError(f"expected 0 or {size} bytes")
    return v


def _state(v: Any) -> MemberState:
    if type(v) is not list or len(v) != 7:
        raise DecodeError("member state must be a 7-item array")
    state = _uint(v[3], LEFT)
    return MemberState(intern(_text(v[0], MAX_NAME)), intern(_text(v[1], MAX_ADDR)),
                       _uint(v[2]), state, _tags(v[4]), _blob(v[5], KEY_BYTES),
                       _blob(v[6], SIG_BYTES))


def _states(v: Any) -> list[MemberState]:
    if type(v) is not list or len(v) > MAX_STATES:
        raise DecodeError("push-pull states must be an array")
    return [_state(s) for s in v]


def _digest_blob(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != 4 * DIGEST_BUCKETS:
        raise DecodeError(f"expected {4 * DIGEST_BUCKETS} bytes of digests")
    return v


def _want(v: Any) -> bytes:
    if type(v) is not bytes or len(v) not in (0, DIGEST_BUCKETS // 8):
        raise DecodeError(f"expected 0 or {DIGEST_BUCKETS // 8} bytes of bucket bitmap")
    return v


_DECODERS: dict[int, tuple[int, Any]] = {
    Ping.TYPE: (6, lambda f: Ping(_uint(f[1], MAX_SEQ), _text(f[2], MAX_NAME),
                                  _text(f[3], MAX_NAME), _text(f[4], MAX_ADDR), _flag(f[5]))),
    IndirectPing.TYPE: (8, lambda f: IndirectPing(
        _uint(f[1], MAX_SEQ), _text(f[2], MAX_NAME), _text(f[3], MAX_ADDR),
        _text(f[4], MAX_NAME), _text(f[5], MAX_ADDR), _flag(f[6]), _uint(f[7], MAX_HOPS))),
    Ack.TYPE: (2, lambda f: Ack(_uint(f[1], MAX_SEQ))),
    Nack.TYPE: (2, lambda f: Nack(_uint(f[1], MAX_SEQ))),
    Alive.TYPE: (7, lambda f: Alive(_uint(f[1]), _text(f[2], MAX_NAME), _text(f[3], MAX_ADDR),
                                    _tags(f[4]), _blob(f[5], KEY_BYTES),
                                    _blob(f[6], SIG_BYTES))),
    Suspect.TYPE: (4, lambda f: Suspect(_uint(f[1]), _text(f[2], MAX_NAME),
                                        _text(f[3], MAX_NAME))),
    Dead.TYPE: (4, lambda f: Dead(_uint(f[1]), _text(f[2], MAX_NAME), _text(f[3], MAX_NAME))),
    PushPull.TYPE: (5, lambda f: PushPull(_text(f[1], MAX_NAME), _flag(f[2]), _flag(f[3]),
                                          _states(f[4]))),
    Digest.TYPE: (3, lambda f: Digest(_text(f[1], MAX_NAME), _digest_blob(f[2]))),
    DigestReply.TYPE: (4, lambda f: DigestReply(_text(f[1], MAX_NAME), _want(f[2]),
                                                _states(f[3]))),
}


def decode_item(item: Any, version: int = DIGEST_VERSION) -> Message:
    """Decode one already-parsed item ``[type, field, ...]`` of a packet of `version`."""
    if type(item) is not list or not item:
        raise DecodeError("message must be a non-empty array")
    kind = item[0]
    if type(kind) is not int or kind not in _DECODERS:
        raise DecodeError(f"unknown message type {kind!r}")
    if version < DIGEST_VERSION and kind in _V3_TYPES:
        raise DecodeError(f"message type {kind} needs membership protocol {DIGEST_VERSION}")
    nfields, build = _DECODERS[kind]
    if len(item) != nfields:
        raise DecodeError(f"message type {kind} needs {nfields} fields, got {len(item)}")
    return build(item)


def decode_packet(data: bytes) -> list[Message]:
    """Decode a packet strictly; raises DecodeError for anything invalid."""
    try:
        raw = cbor2.loads(data, max_depth=8)
    except Exception as exc:  # cbor2 raises many types for hostile input; all mean "invalid"
        raise DecodeError(f"not valid CBOR: {type(exc).__name__}") from None
    if type(raw) is not list or len(raw) != 2:
        raise DecodeError("packet must be [version, items]")
    if type(raw[0]) is not int or raw[0] not in PROTOCOLS["membership"]:
        raise DecodeError(f"membership protocol version {raw[0]!r}: this node speaks "
                          f"{PROTOCOLS['membership']} (a different meshd release?)")
    items = raw[1]
    if type(items) is not list or not items or len(items) > MAX_ITEMS:
        raise DecodeError(f"packet must carry 1..{MAX_ITEMS} messages")
    return [decode_item(item, raw[0]) for item in items]

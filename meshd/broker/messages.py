"""Broker messages and the copies daemons send each other (sans-IO): build, encode, check.

Rules:
- A message is {id, topic, headers, body, published_at, publisher}: `id` is the publisher's
  (a new one is 26 characters, time-ordered: 48 bits of milliseconds then 80 random bits, in
  Crockford base32 as ULIDs are) and is what durable topics deduplicate on; `headers` map
  text to text; `body` is bytes or a JSON value; `publisher` is who published (the account
  or node:NAME the publisher's daemon identified, never what a client claims).
- Bounds: headers and body together at most `max_bytes` (broker.max_message_bytes) as
  encoded; at most MAX_HEADERS headers of at most MAX_HEADER bytes each; ids of 1..MAX_ID
  characters. Anything else is a 400 (from a client) or a WireError (from a peer: the
  shell drops the copy and counts it, the link stays).
- A copy is what a publisher's daemon sends to one interested node: {t: "copy", ns, msg,
  plain, groups}: `plain` whether the node's plain subscribers get it, `groups` the queue groups
  the node is to serve (one member each). Copies are decoded strictly: every field is
  checked, unknown fields refused.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from meshd import namespaces
from meshd.errors import MeshError, bad_request

from . import subjects

MAX_HEADERS = 64
MAX_HEADER = 4096
MAX_ID = 128
MAX_GROUPS = 1024
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class WireError(ValueError):
    """A copy from a peer that is not one."""


_PAIRS = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]  # 10 bits -> 2 digits


def new_id(now: float | None = None, random: bytes | None = None) -> str:
    """A new message id: time-ordered, unique (ULID layout: the 128-bit number as 26
    Crockford base32 digits, 48 bits of milliseconds then 80 random bits). Every publish
    makes one, so it is written two digits at a time, from a table; the first ten digits
    hold only the milliseconds (bits 80..127) and are made once per millisecond. `random`:
    10 random bytes (from `Ids`), else drawn from the OS."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    n = int.from_bytes(os.urandom(10) if random is None else random, "big")
    p = _PAIRS
    return "".join((_ms_digits(ms), p[n >> 70], p[(n >> 60) & 1023], p[(n >> 50) & 1023],
                    p[(n >> 40) & 1023], p[(n >> 30) & 1023], p[(n >> 20) & 1023],
                    p[(n >> 10) & 1023], p[n & 1023]))


class Ids:
    """Message ids for one publisher of many (a daemon's broker): the random bytes are
    drawn from the OS 4,000 at a time instead of one system call per id."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def new(self, now: float | None = None) -> str:
        if self._at + 10 > len(self._pool):
            self._pool, self._at = os.urandom(4000), 0
        self._at += 10
        return new_id(now, self._pool[self._at - 10:self._at])


@functools.lru_cache(maxsize=4)
def _ms_digits(ms: int) -> str:
    n, p = ms << 80, _PAIRS
    return "".join((p[n >> 120], p[(n >> 110) & 1023], p[(n >> 100) & 1023],
                    p[(n >> 90) & 1023], p[(n >> 80) & 1023]))


@dataclass(frozen=True)
class Message:
    id: str
    topic: str
    body: Any
    published_at: float
    publisher: str
    headers: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "headers": dict(self.headers),
                "body": self.body, "published_at": self.published_at,
                "publisher": self.publisher}


def build(topic: Any, body: Any, headers: Any, publisher: str, max_bytes: int,
          msg_id: Any = None, now: float | None = None, ids: Ids | None = None) -> Message:
    """A message from a client's request; a 400 saying what is wrong otherwise."""
    topic = subjects.check_topic(topic)
    if msg_id is not None and not _is_id(msg_id):
        raise bad_request(f"a message id is 1..{MAX_ID} characters of text",
                          id="meshd.broker")
    hdrs = _headers(headers, bad_request)
    size = _size(body, hdrs)
    if size > max_bytes:
        raise bad_request(f"message of {size} bytes exceeds the {max_bytes}-byte limit "
                          "(broker.max_message_bytes)", id="meshd.broker")
    at = time.time() if now is None else now
    return Message(msg_id or (ids.new(at) if ids is not None else new_id(at)), topic, body,
                   at, publisher, hdrs)


def copy(ns: str, msg: dict[str, Any], plain: bool, groups: list[str]) -> dict[str, Any]:
    """A copy of a message (`Message.to_wire()`, made once for all its copies) for one node,
    as an item of the daemons' broker channel."""
    return {"t": "copy", "ns": ns, "msg": msg, "plain": plain, "groups": sorted(groups)}


_COPY_KEYS = frozenset({"t", "ns", "msg", "plain", "groups"})
_MESSAGE_KEYS = frozenset({"id", "topic", "headers", "body", "published_at", "publisher"})


def decode_copy(value: Any, max_bytes: int) -> tuple[str, Message, bool, list[str]]:
    """(namespace, message, plain, groups) of a copy from a peer; WireError otherwise."""
    if not isinstance(value, dict) or value.keys() != _COPY_KEYS \
            or value["t"] != "copy":
        raise WireError("a copy is a map of t (copy), ns, msg, plain and groups")
    ns, plain, groups = value["ns"], value["plain"], value["groups"]
    try:
        namespaces.check(ns)
    except MeshError as exc:
        raise WireError(exc.detail) from None
    if not isinstance(ns, str) or not isinstance(plain, bool) or not isinstance(groups, list) \
            or len(groups) > MAX_GROUPS or not all(
                isinstance(g, str) and 0 < len(g) <= MAX_ID for g in groups):
        raise WireError("a copy's namespace, plain flag or groups are malformed")
    return ns, decode_message(value["msg"], max_bytes), plain, list(groups)


def decode_message(raw: Any, max_bytes: int) -> Message:
    """A message from a peer (in a copy, a durable delivery or a replica); WireError
    otherwise."""
    if not isinstance(raw, dict) or raw.keys() != _MESSAGE_KEYS:
        raise WireError("a message is a map of id, topic, headers, body, published_at and "
                        "publisher")
    try:
        topic = subjects.check_topic(raw["topic"])
    except MeshError as exc:
        raise WireError(exc.detail) from None
    at, publisher = raw["published_at"], raw["publisher"]
    if not _is_id(raw["id"]) or not isinstance(at, int | float) or isinstance(at, bool) \
            or not isinstance(publisher, str) or not 0 < len(publisher) <= 256:
        raise WireError("a message's id, published_at or publisher are malformed")
    hdrs = _headers(raw["headers"], WireError)
    if _size(raw["body"], hdrs) > max_bytes:
        raise WireError("message over the size limit")
    return Message(raw["id"], topic, raw["body"], float(at), publisher, hdrs)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID


def _headers(value: Any, error: Any) -> dict[str, str]:
    if value is None or (type(value) is dict and not value):
        return {}
    if not isinstance(value, dict) or len(value) > MAX_HEADERS:
        raise error(f"headers are a map of at most {MAX_HEADERS} text keys and values")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k \
                or len(k.encode()) + len(v.encode()) > MAX_HEADER:
            raise error(f"a header is a non-empty text key and a text value, at most "
                        f"{MAX_HEADER} bytes together")
    return dict(value)


def _cbor_head(n: int) -> int:
    """Bytes of the CBOR head of a byte or text string of length n."""
    return 1 if n < 24 else 2 if n < 256 else 3 if n < 65536 else 5 if n < 1 << 32 else 9


def _size(body: Any, headers: dict[str, str]) -> int:
    """The body's encoded size (bytes and text, the common bodies, without encoding them)
    plus its headers'."""
    import cbor2

    extra = sum(len(k.encode()) + len(v.encode()) for k, v in headers.items()) \
        if headers else 0
    if type(body) is bytes or (type(body) is str and body.isascii()):
        return _cbor_head(len(body)) + len(body) + extra
    try:
        return len(cbor2.dumps(body)) + extra
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        raise bad_request("the body must be bytes or a JSON value", id="meshd.broker"
                          ) from None

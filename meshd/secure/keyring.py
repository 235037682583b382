"""Cluster keyring: the secrets that admit a node to the cluster, and UDP packet sealing.

Rules:
- A cluster secret is 32 random bytes, shown to people as base64. The keyring holds one or
  more; the primary one seals outgoing packets, any of them opens incoming ones, so a new
  secret can be rolled in without downtime (install everywhere, use, remove the old).
- Keys used on the wire are derived with HKDF-SHA256 (distinct info labels for gossip
  sealing and link handshakes); the secret itself never travels.
- A sealed packet is: key hint (4 bytes, from the secret's hash) | sender's wall-clock time
  (8 bytes, unix ms, big-endian) | nonce (12 random bytes) | ChaCha20-Poly1305(ciphertext +
  tag), with hint and time as associated data. The seal key's label says v2: packets of
  the earlier format (no time) do not open. Anything that does not open raises SealError.
- Replay window: an opened packet whose time is more than the window away from `now`
  raises StalePacket; one whose nonce was already opened within the window raises
  ReplayedPacket. Only authenticated packets are checked and remembered, so forged traffic
  cannot fill the memory of nonces. Time is injected (`now`, unix seconds): the shell reads
  the clock; None reads it here, for tools and tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshd.datadir import read_json, write_json

SECRET_BYTES = 32
HINT_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_LABEL = b"meshd gossip seal v2"
_TIME = struct.Struct(">Q")
HEADER_BYTES = HINT_BYTES + _TIME.size  # hint | time: associated data
SEAL_OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
KEYRING_FILE = "keyring.json"
# Replay window and the most nonces it remembers (see ReplayWindow); the window default is
# the `limits.udp_replay_window` setting's.
REPLAY_WINDOW = 60.0
REPLAY_MAX_ENTRIES = 200_000


class SealError(ValueError):
    """A packet that is not sealed with any key we hold."""


class StalePacket(SealError):
    """An authentic packet whose time is outside the replay window."""


class ReplayedPacket(SealError):
    """An authentic packet already opened within the replay window."""


class ReplayCacheFull(ReplayedPacket):
    """The replay window remembers as many nonces as it may: refused, not forgotten."""


class KeyringError(ValueError):
    """A bad secret or keyring operation."""


class ReplayWindow:
    """The nonces of packets opened lately, each kept until a replay of it would be stale.

    Nonces are grouped by their packet's time, in buckets one window wide; a bucket goes
    once every time in it is more than a window behind now (so from one to two windows of
    traffic is remembered, whatever the wall clock does). Memory is capped at `max_entries`
    nonces (about 100 bytes each, 20 MB at 200,000): at the cap new packets are refused
    (ReplayCacheFull, counted) rather than older nonces forgotten, since a forgotten nonce
    could be replayed. Only authentic packets are remembered, so only a holder of the
    cluster secret could fill it, and gossip stays far below the 1,600 packets/s it takes.
    One source address may hold at most `per_source` of them (an eighth): a member that
    floods gets its own packets refused, not everyone's.
    """

    __slots__ = ("_buckets", "_by_source", "_count", "_expire_at", "max_entries",
                 "per_source", "window_ms")

    def __init__(self, window: float = REPLAY_WINDOW,
                 max_entries: int = REPLAY_MAX_ENTRIES, per_source: int = 0) -> None:
        if not window > 0 or max_entries < 1:
            raise ValueError("the replay window and its capacity must be positive")
        self.window_ms = max(1, int(window * 1000))
        self.max_entries = max_entries
        self.per_source = per_source or max(1, max_entries // 8)
        self._buckets: dict[int, dict[bytes, str | None]] = {}
        self._by_source: dict[str | None, int] = {}
        self._count = 0
        self._expire_at = float("inf")

    def __len__(self) -> int:
        return self._count

    def check(self, sent_ms: int, nonce: bytes, now: float,
              source: str | None = None) -> None:
        """Accept (and remember) a packet sent at `sent_ms` from `source`, or raise why
        not."""
        now_ms = int(now * 1000)
        w = self.window_ms
        if abs(now_ms - sent_ms) > w:
            raise StalePacket(f"packet time is {(now_ms - sent_ms) / 1000:+.1f} s from ours, "
                              f"beyond the {w / 1000:g} s window")
        if now_ms >= self._expire_at:
            self._expire(now_ms)
        b = sent_ms // w
        seen = self._buckets.get(b)
        if seen is not None and nonce in seen:
            raise ReplayedPacket("packet already received")
        if self._count >= self.max_entries:
            raise ReplayCacheFull(f"replay window full ({self.max_entries} packets)")
        held = self._by_source.get(source, 0)
        if source is not None and held >= self.per_source:
            raise ReplayCacheFull(f"{source} sent {held} packets within the window")
        if seen is None:
            seen = self._buckets[b] = {}
            self._expire_at = min(self._expire_at, (b + 2) * w)
        seen[nonce] = source
        self._by_source[source] = held + 1
        self._count += 1

    def _expire(self, now_ms: int) -> None:
        w = self.window_ms
        for b in [b for b in self._buckets if (b + 2) * w <= now_ms]:
            bucket = self._buckets.pop(b)
            self._count -= len(bucket)
            for source in bucket.values():
                left = self._by_source[source] - 1
                if left:
                    self._by_source[source] = left
                else:
                    del self._by_source[source]
        self._expire_at = min(((b + 2) * w for b in self._buckets), default=float("inf"))


def derive(secret: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(secret)


def hint_of(secret: bytes) -> bytes:
    return hashlib.sha256(b"meshd-hint" + secret).digest()[:HINT_BYTES]


def parse_secret(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("a cluster secret is 32 bytes in base64 (as `meshd invite` "
                           "prints it)") from None
    if len(raw) != SECRET_BYTES:
        raise KeyringError(f"a cluster secret is {SECRET_BYTES} bytes in base64; this one "
                           f"decodes to {len(raw)} bytes")
    return raw


def format_secret(secret: bytes) -> str:
    return base64.b64encode(secret).decode()


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


class _Key:
    __slots__ = ("aead", "hint", "link_psk", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.hint = hint_of(secret)
        self.aead = ChaCha20Poly1305(derive(secret, SEAL_LABEL))
        self.link_psk = derive(secret, b"meshd link psk v1")


class Keyring:
    def __init__(self, secrets: list[bytes], primary: bytes | None = None) -> None:
        if not secrets:
            raise KeyringError("the keyring needs at least one secret")
        # used by open() when the caller brings no window of its own (tools, tests)
        self.replay = ReplayWindow()
        self._keys: dict[bytes, _Key] = {}
        for s in secrets:
            self._add(s)
        self._primary = self._keys[hint_of(primary or secrets[0])]

    def _add(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise KeyringError(f"a cluster secret is {SECRET_BYTES} bytes")
        self._keys[hint_of(secret)] = _Key(secret)

    @property
    def primary(self) -> bytes:
        return self._primary.secret

    @property
    def primary_hint(self) -> bytes:
        return self._primary.hint

    def secrets(self) -> list[bytes]:
        return [k.secret for k in self._keys.values()]

    def install(self, secret: bytes) -> bool:
        """Add a secret; False if it was already there."""
        if hint_of(secret) in self._keys:
            return False
        self._add(secret)
        return True

    def use(self, secret: bytes) -> None:
        key = self._keys.get(hint_of(secret))
        if key is None:
            raise KeyringError("that secret is not installed; install it first")
        self._primary = key

    def remove(self, secret: bytes) -> bool:
        hint = hint_of(secret)
        if hint not in self._keys:
            return False
        if self._keys[hint] is self._primary:
            raise KeyringError("cannot remove the primary secret; `use` another one first")
        del self._keys[hint]
        return True

    def psk_for(self, hint: bytes) -> bytes | None:
        key = self._keys.get(hint)
        return None if key is None else key.link_psk

    def seal(self, plaintext: bytes, now: float | None = None) -> bytes:
        """Seal with the primary secret, stamped with `now` (unix seconds)."""
        key = self._primary
        nonce = os.urandom(NONCE_BYTES)
        header = key.hint + _TIME.pack(int((time.time() if now is None else now) * 1000))
        return header + nonce + key.aead.encrypt(nonce, plaintext, header)

    def open(self, packet: bytes, now: float | None = None,
             replay: ReplayWindow | None = None, source: str | None = None) -> bytes:
        """The plaintext of an authentic, fresh, first-seen packet; else SealError (or its
        subclasses StalePacket, ReplayedPacket). `replay` is the receiver's window (the
        keyring's own if None)."""
        if len(packet) < SEAL_OVERHEAD:
            raise SealError("packet too short")
        key = self._keys.get(packet[:HINT_BYTES])
        if key is None:
            raise SealError("sealed with a key we do not hold")
        nonce = packet[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES]
        try:
            plaintext = key.aead.decrypt(nonce, packet[HEADER_BYTES + NONCE_BYTES:],
                                         packet[:HEADER_BYTES])
        except InvalidTag:
            raise SealError("packet failed authentication") from None
        (self.replay if replay is None else replay).check(
            _TIME.unpack_from(packet, HINT_BYTES)[0], nonce,
            time.time() if now is None else now, source)
        return plaintext

    # --- persistence ---------------------------------------------------------------------

    def save(self, data_dir: Path) -> None:
        write_json(data_dir / KEYRING_FILE, {
            "primary": format_secret(self.primary),
            "keys": [format_secret(s) for s in self.secrets()],
        })

    @classmethod
    def load(cls, data_dir: Path) -> Keyring | None:
        path = data_dir / KEYRING_FILE
        data = read_json(path, None)
        if data is None:
            return None
        try:
            secrets = [parse_secret(s) for s in data["keys"]]
            return cls(secrets, parse_secret(data["primary"]))
        except (KeyError, TypeError, KeyringError) as exc:
            raise KeyringError(f"{path} is not a valid keyring: {exc}") from None

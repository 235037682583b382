"""Cluster keyring: the secrets that admit a node to the cluster, and UDP packet sealing.

Rules:
- A cluster secret is 32 random bytes, shown to people as base64. The keyring holds one or
  more; the primary one seals outgoing packets, any of them opens incoming ones, so a new
  secret can be rolled in without downtime (install everywhere, use, remove the old).
- Keys used on the wire are derived with HKDF-SHA256 (distinct info labels for gossip
  sealing and link handshakes); the secret itself never travels.
- A sealed packet is: key hint (4 bytes, from the secret's hash) | nonce (12 random bytes) |
  ChaCha20-Poly1305(ciphertext + tag), with the protocol byte as associated data. Anything
  that does not open raises SealError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshd.datadir import read_json, write_json

SECRET_BYTES = 32
HINT_BYTES = 4
NONCE_BYTES = 12
SEAL_AAD = b"meshd-udp-1"
KEYRING_FILE = "keyring.json"


class SealError(ValueError):
    """A packet that is not sealed with any key we hold."""


class KeyringError(ValueError):
    """A bad secret or keyring operation."""


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
        self.aead = ChaCha20Poly1305(derive(secret, b"meshd gossip seal v1"))
        self.link_psk = derive(secret, b"meshd link psk v1")


class Keyring:
    def __init__(self, secrets: list[bytes], primary: bytes | None = None) -> None:
        if not secrets:
            raise KeyringError("the keyring needs at least one secret")
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

    def seal(self, plaintext: bytes) -> bytes:
        key = self._primary
        nonce = os.urandom(NONCE_BYTES)
        return key.hint + nonce + key.aead.encrypt(nonce, plaintext, SEAL_AAD)

    def open(self, packet: bytes) -> bytes:
        if len(packet) < HINT_BYTES + NONCE_BYTES + 16:
            raise SealError("packet too short")
        key = self._keys.get(packet[:HINT_BYTES])
        if key is None:
            raise SealError("sealed with a key we do not hold")
        nonce = packet[HINT_BYTES:HINT_BYTES + NONCE_BYTES]
        try:
            return key.aead.decrypt(nonce, packet[HINT_BYTES + NONCE_BYTES:], SEAL_AAD)
        except InvalidTag:
            raise SealError("packet failed authentication") from None

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

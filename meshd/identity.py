"""Node identity: an ed25519 key pair kept in the data dir; the node id derives from it.

Rules:
- The private key file is written once, mode 0600, and never rewritten.
- node id = base32(sha256(public key))[:26], lowercase, no padding; the short form
  printed everywhere is its first 8 characters.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .datadir import write_secret_file

KEY_FILE = "identity.key"


def node_id_from_public(public: bytes) -> str:
    digest = hashlib.sha256(public).digest()
    return base64.b32encode(digest).decode().lower().rstrip("=")[:26]


def short_id(node_id: str) -> str:
    return node_id[:8]


class Identity:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public_bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.node_id = node_id_from_public(self.public_bytes)

    @property
    def short(self) -> str:
        return short_id(self.node_id)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        path = data_dir / KEY_FILE
        if path.exists():
            raw = path.read_bytes()
            try:
                key = serialization.load_pem_private_key(raw, password=None)
            except ValueError:
                raise ValueError(f"{path} is not an ed25519 private key; move it away "
                                 "to create a new identity") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} holds a key that is not ed25519")
            return cls(key)
        ident = cls.generate()
        pem = ident.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        write_secret_file(path, pem)
        return ident


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True

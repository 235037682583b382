"""Account secrets: stored only as scrypt hashes; checked in constant time."""

from __future__ import annotations

import base64
import hmac
import os

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

N, R, P = 2**14, 8, 1


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = Scrypt(salt=salt, length=32, n=N, r=R, p=P).derive(secret.encode())
    return "scrypt$" + base64.b64encode(salt + digest).decode()


def check_secret(secret: str, stored: str) -> bool:
    if not stored.startswith("scrypt$"):
        return False
    raw = base64.b64decode(stored[7:])
    salt, digest = raw[:16], raw[16:]
    candidate = Scrypt(salt=salt, length=32, n=N, r=R, p=P).derive(secret.encode())
    return hmac.compare_digest(candidate, digest)

"""Stream link handshake (sans-IO): X25519 ephemerals, ed25519 signatures, cluster proof.

Theory of operation
-------------------
    I -> R  hello   [1, "hello", hint, e_i, id_i, addr_i]
    R -> I  welcome [1, "welcome", e_r, id_r, addr_r, sig_r, proof_r]   or  [1, "reject", why]
    I -> R  confirm [1, "confirm", sig_i, proof_i]

th = sha256(hello bytes | e_r | id_r | addr_r). From dh = X25519(e, e') and the link PSK of
the cluster secret named by `hint`, HKDF derives 96 bytes: a proof key and one session key per
direction. Each side signs b"meshd-resp"/b"meshd-init" + th with its identity key and proves
the cluster secret with HMAC(proof key, role + th). So a peer that lacks the secret, forges an
identity or tampers with any handshake byte fails; the ephemerals give each link fresh keys.
Rules:
- Every handshake message is decoded strictly; any fault raises HandshakeError.
- A responder that does not hold the hinted secret answers "reject" with the reason, so the
  joining operator is told the secret does not match instead of waiting on a timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshd.identity import Identity, node_id_from_public, verify
from meshd.versions import PROTOCOLS

from .keyring import HINT_BYTES, Keyring

VERSION = PROTOCOLS["link"].high  # what this node sends (meshd/versions.py)
# 2: link frames are AES-256-GCM (1 was ChaCha20-Poly1305)
MAX_HANDSHAKE_BYTES = 4096
SECRET_MISMATCH = "the cluster secret does not match"


class HandshakeError(Exception):
    """The handshake failed; `str()` says why in words an operator can act on."""


@dataclass(slots=True)
class LinkKeys:
    send_key: bytes
    recv_key: bytes
    peer_id: str
    peer_public: bytes
    peer_addr: str


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _decode(data: bytes, kind: str, nfields: int) -> list[Any]:
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError("handshake message too large")
    try:
        msg = cbor2.loads(data, max_depth=4)
    except Exception:
        raise HandshakeError("peer did not speak the meshd link protocol") from None
    if type(msg) is not list or len(msg) < 2 or msg[0] not in PROTOCOLS["link"]:
        spoke = msg[0] if type(msg) is list and msg else "?"
        raise HandshakeError(f"the peer spoke meshd link protocol version {spoke!r}, this "
                             f"node speaks {PROTOCOLS['link']} (a different meshd release: "
                             "upgrade the older side)")
    if msg[1] == "reject" and len(msg) == 3 and isinstance(msg[2], str):
        raise HandshakeError(msg[2][:200])
    if msg[1] != kind or len(msg) != nfields:
        raise HandshakeError(f"expected a {kind} message")
    return msg


def _bytes(v: Any, n: int, what: str) -> bytes:
    if type(v) is not bytes or len(v) != n:
        raise HandshakeError(f"malformed {what}")
    return v


def _text(v: Any, what: str) -> str:
    if type(v) is not str or not 0 < len(v) <= 256:
        raise HandshakeError(f"malformed {what}")
    return v


def _derive(dh: bytes, psk: bytes, th: bytes) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=psk,
               info=b"meshd link keys v1" + th).derive(dh)
    return okm[:32], okm[32:64], okm[64:]


def _proof(key: bytes, role: bytes, th: bytes) -> bytes:
    return hmac.new(key, role + th, hashlib.sha256).digest()


class Initiator:
    def __init__(self, identity: Identity, keyring: Keyring, addr: str) -> None:
        self._id = identity
        self._keyring = keyring
        self._addr = addr
        self._eph = X25519PrivateKey.generate()
        self._hint = keyring.primary_hint
        self._hello = cbor2.dumps([VERSION, "hello", self._hint, _raw(self._eph.public_key()),
                                   identity.public_bytes, addr])

    def hello(self) -> bytes:
        return self._hello

    def on_welcome(self, data: bytes) -> tuple[bytes, LinkKeys]:
        """Check the welcome; return the confirm message and the session keys."""
        msg = _decode(data, "welcome", 7)
        e_r = _bytes(msg[2], 32, "ephemeral key")
        id_r = _bytes(msg[3], 32, "identity key")
        addr_r = _text(msg[4], "address")
        sig_r = _bytes(msg[5], 64, "signature")
        proof_r = _bytes(msg[6], 32, "proof")
        th = hashlib.sha256(self._hello + e_r + id_r + addr_r.encode()).digest()
        psk = self._keyring.psk_for(self._hint)
        assert psk is not None
        try:
            dh = self._eph.exchange(X25519PublicKey.from_public_bytes(e_r))
        except ValueError:
            raise HandshakeError("malformed ephemeral key") from None
        k_proof, k_i2r, k_r2i = _derive(dh, psk, th)
        if not hmac.compare_digest(proof_r, _proof(k_proof, b"resp", th)):
            raise HandshakeError(SECRET_MISMATCH)
        if not verify(id_r, sig_r, b"meshd-resp" + th):
            raise HandshakeError("peer's identity signature is invalid")
        confirm = cbor2.dumps([VERSION, "confirm", self._id.sign(b"meshd-init" + th),
                               _proof(k_proof, b"init", th)])
        return confirm, LinkKeys(k_i2r, k_r2i, node_id_from_public(id_r), id_r, addr_r)


class Responder:
    def __init__(self, identity: Identity, keyring: Keyring, addr: str) -> None:
        self._id = identity
        self._keyring = keyring
        self._addr = addr
        self._pending: tuple[bytes, bytes, bytes, bytes, bytes, str] | None = None

    @staticmethod
    def reject(reason: str) -> bytes:
        return cbor2.dumps([VERSION, "reject", reason])

    def on_hello(self, data: bytes) -> bytes:
        """Answer a hello with a welcome; raises HandshakeError (reply reject(str(err)))."""
        msg = _decode(data, "hello", 6)
        hint = _bytes(msg[2], HINT_BYTES, "key hint")
        e_i = _bytes(msg[3], 32, "ephemeral key")
        id_i = _bytes(msg[4], 32, "identity key")
        addr_i = _text(msg[5], "address")
        psk = self._keyring.psk_for(hint)
        if psk is None:
            raise HandshakeError(SECRET_MISMATCH)
        eph = X25519PrivateKey.generate()
        e_r = _raw(eph.public_key())
        th = hashlib.sha256(data + e_r + self._id.public_bytes + self._addr.encode()).digest()
        try:
            dh = eph.exchange(X25519PublicKey.from_public_bytes(e_i))
        except ValueError:
            raise HandshakeError("malformed ephemeral key") from None
        k_proof, k_i2r, k_r2i = _derive(dh, psk, th)
        self._pending = (th, k_proof, k_i2r, k_r2i, id_i, addr_i)
        return cbor2.dumps([VERSION, "welcome", e_r, self._id.public_bytes, self._addr,
                            self._id.sign(b"meshd-resp" + th), _proof(k_proof, b"resp", th)])

    def on_confirm(self, data: bytes) -> LinkKeys:
        if self._pending is None:
            raise HandshakeError("confirm before hello")
        th, k_proof, k_i2r, k_r2i, id_i, addr_i = self._pending
        msg = _decode(data, "confirm", 4)
        sig_i = _bytes(msg[2], 64, "signature")
        proof_i = _bytes(msg[3], 32, "proof")
        if not hmac.compare_digest(proof_i, _proof(k_proof, b"init", th)):
            raise HandshakeError(SECRET_MISMATCH)
        if not verify(id_i, sig_i, b"meshd-init" + th):
            raise HandshakeError("peer's identity signature is invalid")
        return LinkKeys(k_r2i, k_i2r, node_id_from_public(id_i), id_i, addr_i)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)

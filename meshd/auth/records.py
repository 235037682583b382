"""Signed records of the auth database (sans-IO): holding the cluster secret lets a member
replicate auth state, never write it.

Theory of operation
-------------------
Every register of the store's ``auth`` database carries, in its metadata, the id of the
issuer key that signed it and an ed25519 signature over (table, key, timestamp, value,
expiry) — see ``payload``. A node merges an auth record from a peer only if that signature
verifies with an issuer key it trusts; anything else is refused and counted.

Which keys are trusted:
- The root is the cluster's first issuer key (made by ``auth bootstrap``); its record in the
  ``keys`` table is signed by itself. A node trusts one root, named by its fingerprint (the
  first 16 hex digits of sha256 of the key's PEM) and pinned in the data dir: the one it
  made, the one the operator gave (`--auth-root`, printed by `meshd invite`), or the one
  the seeds it joined through vouch for (their ``authroot`` membership tag, signed with
  their identity keys) — never a vote among members, whom anyone with the secret can add.
- Any other key record is trusted when signed by a trusted key that is not revoked.
- Revocation is the root's word: a ``keystate`` record saying ``revoked`` counts only when
  the root key signed it (one is refused on merge otherwise), and the root itself cannot be
  revoked. A revoked key takes down every key whose trust goes through it (the closure
  above skips revoked signers), and what those keys signed stops counting: records are
  read only if their signer is trusted and not revoked (``counts``). Nothing is re-signed,
  so a stolen key cannot have its work laundered by the revocation.
- Key records do not change once written (state such as retired or revoked lives in the
  ``keystate`` table), so the chain of trust never loops back on itself.

Rules:
- ``Trust.check`` decides one incoming register: None (accept) or the reason to refuse.
- ``Trust.refresh`` recomputes the trusted set from the local records; call it whenever the
  ``keys`` or ``keystate`` tables changed. It does not re-verify signatures: every record
  in local state was checked when it was merged or written here.
- Pure computation: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DB = "auth"
KEYS, KEYSTATE = "keys", "keystate"
# tables whose records vouch for others merge first within one message
MERGE_FIRST = ((DB, KEYS), (DB, KEYSTATE))


def payload(table: str, key: str, ts: Any, value: bytes | None, expiry: int | None) -> bytes:
    """The bytes an issuer key signs for one register."""
    return cbor2.dumps(["meshd-auth-v1", table, key, list(ts), value, expiry], canonical=True)


def fingerprint(public_pem: bytes | str) -> str:
    raw = public_pem.encode() if isinstance(public_pem, str) else public_pem
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public(public_pem: bytes | str) -> Ed25519PublicKey | None:
    raw = public_pem.encode() if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def load_private(private_pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("issuer key is not ed25519")
    return key


def sign(kid: str, private: Ed25519PrivateKey, table: str, key: str, ts: Any,
         value: bytes | None, expiry: int | None) -> dict[str, Any]:
    """The metadata that makes a register verifiable: {"kid", "sig"}."""
    return {"kid": kid, "sig": private.sign(payload(table, key, ts, value, expiry))}


def _json(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


@dataclass
class KeyInfo:
    kid: str
    public: Ed25519PublicKey
    pem: str
    signer: str  # the node holding the private key
    endorsed_by: str  # kid that signed its record (itself for the root)
    created: float


class Trust:
    """The issuer keys this node trusts, and the check of incoming auth records."""

    def __init__(self, pin: str | None = None) -> None:
        self.pin = pin  # fingerprint of the root key; None until pinned
        self.keys: dict[str, KeyInfo] = {}  # trusted keys (revoked ones included)
        self.revoked: set[str] = set()
        self.retired: dict[str, float] = {}
        self.root: str | None = None

    def usable(self, kid: str) -> KeyInfo | None:
        """A trusted key that may sign and verify (not revoked)."""
        if kid in self.revoked:
            return None
        return self.keys.get(kid)

    def counts(self, reg: Any) -> bool:
        """Whether a register in local state counts: signed by a usable key."""
        meta = reg[2] if type(reg) is list and len(reg) == 4 else None
        kid = meta.get("kid") if isinstance(meta, dict) else None
        return kid in self.keys and kid not in self.revoked

    def refresh(self, keys: dict[str, list[Any]], keystate: dict[str, list[Any]]) -> None:
        """Recompute the trusted set from the registers of the keys and keystate tables."""
        records: dict[str, tuple[dict[str, Any], str]] = {}
        for kid, reg in keys.items():
            value = _json(reg[1])
            meta = reg[2] if isinstance(reg[2], dict) else {}
            if isinstance(value, dict) and isinstance(value.get("public"), str) \
                    and isinstance(meta.get("kid"), str):
                records[kid] = (value, meta["kid"])
        trusted: dict[str, KeyInfo] = {}
        self.root = None
        for kid, (value, by) in records.items():
            if by == kid and self.pin is not None and fingerprint(value["public"]) == self.pin:
                info = self._info(kid, value, by)
                if info is not None:
                    trusted[kid] = info
                    self.root = kid
        self.revoked, self.retired = set(), {}
        for kid, reg in keystate.items():
            state = _json(reg[1])
            if not isinstance(state, dict):
                continue
            signer = reg[2].get("kid") if isinstance(reg[2], dict) else None
            if state.get("revoked") and signer == self.root and kid != self.root:
                self.revoked.add(kid)
            if isinstance(state.get("retired"), int | float):
                self.retired[kid] = float(state["retired"])
        grew = True
        while grew:
            grew = False
            for kid, (value, by) in records.items():
                if kid in trusted or by not in trusted or by in self.revoked:
                    continue
                info = self._info(kid, value, by)
                if info is not None:
                    trusted[kid] = info
                    grew = True
        self.keys = trusted

    @staticmethod
    def _info(kid: str, value: dict[str, Any], by: str) -> KeyInfo | None:
        public = load_public(value["public"])
        if public is None:
            return None
        created = value.get("created")
        return KeyInfo(kid, public, value["public"], str(value.get("signer", "")), by,
                       float(created) if isinstance(created, int | float) else 0.0)

    def check(self, table: str, key: str, reg: Any) -> str | None:
        """None if this register may be merged, else why not."""
        if type(reg) is not list or len(reg) != 4 or type(reg[2]) is not dict:
            return "not a signed register"
        meta = reg[2]
        kid, sig = meta.get("kid"), meta.get("sig")
        if type(kid) is not str or type(sig) is not bytes or len(sig) != 64:
            return "unsigned"
        data = payload(table, key, reg[0], reg[1], reg[3])
        if table == KEYS and kid == key and kid not in self.keys:
            # a self-signed key record: only the pinned root
            value = _json(reg[1])
            if not isinstance(value, dict) or not isinstance(value.get("public"), str):
                return "malformed key record"
            if self.pin is None:
                return "no auth root pinned yet"
            if fingerprint(value["public"]) != self.pin:
                return f"self-signed key {kid} is not this cluster's auth root"
            public = load_public(value["public"])
            if public is None:
                return "malformed key record"
        else:
            info = self.usable(kid)
            if info is None:
                return f"signed by an untrusted or revoked key ({kid})"
            if table == KEYSTATE and kid != self.root \
                    and isinstance(value := _json(reg[1]), dict) and value.get("revoked"):
                return "only the root key revokes keys"
            public = info.public
        try:
            public.verify(sig, data)
        except InvalidSignature:
            return "bad signature"
        return None

"""Signed auth records (auth/records.py): which records a node merges and which keys it
trusts."""

from __future__ import annotations

import json

from meshd.auth import records
from meshd.auth.records import KEYS, KEYSTATE, Trust
from meshd.auth.tokens import new_signing_key


def key():
    kid, private, public = new_signing_key()
    return kid, records.load_private(private), public.decode()


def reg(table, k, value, signer, ts=(1, 0, "n"), expiry=None):
    raw = None if value is None else json.dumps(value).encode()
    meta = records.sign(signer[0], signer[1], table, k, ts, raw, expiry)
    return [list(ts), raw, meta, expiry]


def key_record(new, signer):
    return reg(KEYS, new[0], {"public": new[2], "signer": "n", "created": 1.0}, signer)


def test_only_the_pinned_root_may_sign_itself():
    root, other = key(), key()
    trust = Trust(pin=None)
    assert trust.check(KEYS, root[0], key_record(root, root)) == "no auth root pinned yet"
    trust.pin = records.fingerprint(root[2])
    assert trust.check(KEYS, root[0], key_record(root, root)) is None
    assert "not this cluster's auth root" in trust.check(KEYS, other[0],
                                                         key_record(other, other))


def test_records_need_a_trusted_signature():
    root, rogue = key(), key()
    trust = Trust(pin=records.fingerprint(root[2]))
    trust.refresh({root[0]: key_record(root, root)}, {})
    good = reg("accounts", "ada", {"scopes": ["x"]}, root)
    assert trust.check("accounts", "ada", good) is None
    forged = reg("accounts", "eve", {"scopes": ["admin"]}, rogue)
    assert "untrusted" in trust.check("accounts", "eve", forged)
    unsigned = [[1, 0, "n"], b"{}", {}, None]
    assert trust.check("accounts", "eve", unsigned) == "unsigned"
    tampered = list(good)
    tampered[1] = json.dumps({"scopes": ["admin"]}).encode()
    assert trust.check("accounts", "ada", tampered) == "bad signature"
    moved = reg("accounts", "ada", {"scopes": ["x"]}, root)
    assert trust.check("accounts", "bob", moved) == "bad signature"  # key is signed too


def test_trust_follows_endorsements_and_stops_at_revoked_keys():
    root, k2, k3 = key(), key(), key()
    keys = {root[0]: key_record(root, root), k2[0]: key_record(k2, root),
            k3[0]: key_record(k3, k2)}
    trust = Trust(pin=records.fingerprint(root[2]))
    trust.refresh(keys, {})
    assert set(trust.keys) == {root[0], k2[0], k3[0]}
    state = {k2[0]: reg(KEYSTATE, k2[0], {"revoked": 5.0}, root)}
    trust.refresh(keys, state)
    assert trust.usable(k2[0]) is None
    assert k3[0] not in trust.keys  # endorsed only by a revoked key
    assert "revoked" in trust.check("rules", "r", reg("rules", "r", {}, k2))


def test_a_wrong_pin_trusts_nothing():
    root = key()
    trust = Trust(pin="0" * 16)
    trust.refresh({root[0]: key_record(root, root)}, {})
    assert trust.keys == {} and trust.root is None


def test_the_root_retires_but_is_never_revoked():
    root, k2 = key(), key()
    keys = {root[0]: key_record(root, root), k2[0]: key_record(k2, root)}
    state = {root[0]: reg(KEYSTATE, root[0], {"retired": 5.0, "revoked": 6.0}, root),
             k2[0]: reg(KEYSTATE, k2[0], {"revoked": 7.0}, k2)}  # only the root revokes
    trust = Trust(pin=records.fingerprint(root[2]))
    trust.refresh(keys, state)
    assert root[0] in trust.retired and trust.usable(root[0]) is not None
    assert trust.usable(k2[0]) is not None
    revoking = reg(KEYSTATE, root[0], {"revoked": 8.0}, k2)
    assert trust.check(KEYSTATE, root[0], revoking) == "only the root key revokes keys"

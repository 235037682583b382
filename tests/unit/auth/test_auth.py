"""Rules engine tables, token refusals (each a case) and secret hashing."""

from __future__ import annotations

import base64
import json
import time

import pytest

from meshd.auth.accounts import check_secret, hash_secret
from meshd.auth.rules import RuleError, decide, make_rule
from meshd.auth.tokens import TokenError, Verifier, issue, make_claims, new_signing_key

R = make_rule


@pytest.mark.parametrize("rules, scopes, resource, allowed, winner", [
    ([], ["admin"], ("service", "x", "y"), False, None),
    ([R("pub", "service:web:*", "", "granted")], None, ("service", "web", "Get"), True, "pub"),
    ([R("any", "*:*:*", "*", "granted")], None, ("service", "web", "Get"), False, None),
    ([R("any", "*:*:*", "*", "granted")], [], ("store", "db", "t"), True, "any"),
    ([R("dev", "service:api:*", "dev", "granted")], ["ops"], ("service", "api", "A"), False,
     None),
    ([R("g", "*:*:*", "dev", "granted"), R("d", "service:pay:*", "dev", "denied")], ["dev"],
     ("service", "pay", "Charge"), False, "d"),  # equal priority: deny wins
    ([R("g", "service:pay:*", "dev", "granted", 10), R("d", "*:*:*", "dev", "denied", 0)],
     ["dev"], ("service", "pay", "Charge"), True, "g"),  # higher priority wins
    ([R("p", "service:pay:Get*", "dev", "granted")], ["dev"], ("service", "pay", "GetX"),
     True, "p"),
    ([R("p", "service:pay:Get*", "dev", "granted")], ["dev"], ("service", "pay", "Put"),
     False, None),
])
def test_rules_table(rules, scopes, resource, allowed, winner):
    ok, rule = decide(rules, scopes, resource)
    assert ok == allowed
    assert (rule.id if rule else None) == winner


def test_bad_rules_are_refused():
    with pytest.raises(RuleError):
        make_rule("x", "nosuchtype:a:b", "", "granted")
    with pytest.raises(RuleError):
        make_rule("x", "service:a:b", "", "maybe")


KID, PRIV, PUB = new_signing_key()
OTHER_KID, OTHER_PRIV, _ = new_signing_key()


def verifier(revoked=(), leeway=60.0):
    return Verifier("cluster-1", lambda: {KID: PUB}, lambda jti: jti in revoked, leeway)


def token(**over):
    claims = make_claims("ada", ["dev"], "n1", "cluster-1", 3600)
    claims.update(over)
    return issue(KID, PRIV, claims), claims


def test_good_token_verifies_and_is_cached(monkeypatch):
    import pyseto

    t, claims = token()
    v = verifier()
    assert v.verify(t)["sub"] == "ada"

    def no_signature_checks(*args, **kwargs):
        raise AssertionError("a cached token was checked again")

    monkeypatch.setattr(pyseto, "decode", no_signature_checks)
    assert v.verify(t)["jti"] == claims["jti"]
    with pytest.raises(TokenError):
        verifier().verify(t)  # a verifier without it in its cache does check


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize("case", ["unknown-key", "tampered", "truncated", "v2", "local",
                                  "expired", "not-yet", "audience", "revoked", "jwt-none",
                                  "refresh-as-access", "garbage"])
def test_refused_tokens(case):
    t, claims = token()
    revoked = ()
    if case == "unknown-key":
        t = issue(OTHER_KID, OTHER_PRIV, claims)
    elif case == "tampered":
        prefix, body, footer = t[:10], t[10:].split(".")[0], t.split(".")[-1]
        raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        raw[10] ^= 1
        t = prefix + _b64(bytes(raw)) + "." + footer
    elif case == "truncated":
        t = t[:-20]
    elif case == "v2":
        t = "v2.public." + t[10:]
    elif case == "local":
        t = "v4.local." + t[10:]
    elif case == "expired":
        t, _ = token(exp=int(time.time()) - 120)
    elif case == "not-yet":
        t, _ = token(nbf=int(time.time()) + 120)
    elif case == "audience":
        t, _ = token(aud="another-cluster")
    elif case == "revoked":
        revoked = (claims["jti"],)
    elif case == "jwt-none":
        t = (_b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "."
             + _b64(json.dumps({"sub": "admin", "scopes": ["admin"]}).encode()) + ".")
    elif case == "refresh-as-access":
        t, _ = token(typ="refresh")
    elif case == "garbage":
        t = 12345
    with pytest.raises(TokenError):
        verifier(revoked).verify(t)


def test_clock_skew_within_leeway_accepted_beyond_refused():
    now = time.time()
    t, _ = token(nbf=int(now) + 30, iat=int(now) + 30)
    assert verifier().verify(t, now=now)["sub"] == "ada"
    t, _ = token(nbf=int(now) + 90, iat=int(now) + 90)
    with pytest.raises(TokenError, match="not valid yet"):
        verifier().verify(t, now=now)
    t, _ = token(exp=int(now) - 30)
    assert verifier().verify(t, now=now)["sub"] == "ada"


def test_revocation_applies_to_cached_tokens():
    t, claims = token()
    revoked: set[str] = set()
    v = Verifier("cluster-1", lambda: {KID: PUB}, lambda jti: jti in revoked)
    v.verify(t)
    revoked.add(claims["jti"])
    with pytest.raises(TokenError, match="revoked"):
        v.verify(t)


def test_secret_hashing():
    stored = hash_secret("correct horse")
    assert "correct horse" not in stored and stored.startswith("scrypt$")
    assert check_secret("correct horse", stored)
    assert not check_secret("wrong", stored)

"""Token claims and framing: the claim names we issue, the footer that names the key, the
size bound, and the verifier's defaults."""

from __future__ import annotations

import base64
import json

import pytest

from meshd.auth.tokens import (
    MAX_FOOTER,
    MAX_TOKEN,
    TokenError,
    Verifier,
    issue,
    make_claims,
    new_signing_key,
    unverified_claims,
)

KID, PRIV, PUB = new_signing_key()
NOW = 1_800_000_000


def _verifier(**kw: float) -> Verifier:
    return Verifier("cluster-1", lambda: {KID: PUB}, lambda jti: False, **kw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _with_footer(token: str, footer: str | None) -> str:
    head = ".".join(token.split(".")[:3])
    return head if footer is None else f"{head}.{footer}"


def test_claims_carry_the_standard_names_and_times():
    claims = make_claims("ada", ["dev", "ops"], "n1", "cluster-1", 600.5, now=NOW + 0.9)
    assert set(claims) == {"sub", "scopes", "iss", "aud", "iat", "nbf", "exp", "jti", "typ"}
    assert (claims["sub"], claims["scopes"], claims["iss"], claims["aud"], claims["typ"]) == \
        ("ada", ["dev", "ops"], "n1", "cluster-1", "access")
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (NOW, NOW, NOW + 601)
    assert len(claims["jti"]) == 24
    jtis = {make_claims("ada", [], "n1", "c", 1)["jti"] for _ in range(2)}
    assert len(jtis) == 2


def test_the_verified_claims_are_what_was_issued():
    claims = make_claims("ada", ["dev"], "n1", "cluster-1", 600, typ="refresh", now=NOW)
    token = issue(KID, PRIV, claims)
    assert _verifier().verify(token, now=NOW, typ="refresh") == claims
    assert unverified_claims(token) == claims


def test_without_nbf_the_issue_time_is_the_not_before():
    claims = make_claims("ada", ["dev"], "n1", "cluster-1", 600, now=NOW)
    del claims["nbf"]
    token = issue(KID, PRIV, claims)
    with pytest.raises(TokenError, match="not valid yet"):
        _verifier().verify(token, now=NOW - 61)
    assert _verifier().verify(token, now=NOW - 60)["sub"] == "ada"


def test_the_default_leeway_is_sixty_seconds():
    token = issue(KID, PRIV, make_claims("ada", [], "n1", "cluster-1", 600, now=NOW))
    assert _verifier().leeway == 60
    assert _verifier().verify(token, now=NOW + 600 + 60)["sub"] == "ada"
    with pytest.raises(TokenError, match="expired"):
        _verifier().verify(token, now=NOW + 600 + 61)


@pytest.mark.parametrize("footer", [
    None,  # no footer at all
    _b64(b"[1, 2]"),  # JSON, not an object
    _b64(b'{"kid": 7}'),  # a kid that is not a string
    _b64(b"not json"),
    _b64(json.dumps({"kid": "k" * MAX_FOOTER}).encode()),  # over the footer bound
], ids=["missing", "list", "kid-not-str", "not-json", "too-long"])
def test_a_footer_that_does_not_name_a_key_is_refused(footer):
    token = issue(KID, PRIV, make_claims("ada", [], "n1", "cluster-1", 600, now=NOW))
    with pytest.raises(TokenError):
        _verifier().verify(_with_footer(token, footer), now=NOW)


def test_the_size_bound_is_checked_before_anything_else():
    too_long = "v4.public." + "A" * (MAX_TOKEN - len("v4.public.") + 1)
    with pytest.raises(TokenError, match="not a PASETO"):
        _verifier().verify(too_long, now=NOW)
    with pytest.raises(TokenError, match="not a PASETO"):
        unverified_claims(too_long)
    at_the_bound = too_long[:-1]
    assert len(at_the_bound) == MAX_TOKEN
    with pytest.raises(TokenError, match="key id footer"):
        _verifier().verify(at_the_bound, now=NOW)  # past the size check, refused later
    with pytest.raises(TokenError, match="malformed"):
        unverified_claims(at_the_bound)


def test_unverified_claims_refuse_what_is_not_a_token():
    for bad in (42, "v2.public.xxx", "v4.public.!!!!"):
        with pytest.raises(TokenError):
            unverified_claims(bad)
    listed = "v4.public." + _b64(b"[1]" + bytes(64))
    with pytest.raises(TokenError, match="not an object"):
        unverified_claims(listed)



def test_a_footer_of_exactly_the_bound_is_read():
    token = issue(KID, PRIV, make_claims("ada", [], "n1", "cluster-1", 600, now=NOW))
    empty = len(json.dumps({"kid": KID, "pad": ""}))
    raw = json.dumps({"kid": KID, "pad": "x" * (MAX_FOOTER * 3 // 4 - empty)}).encode()
    footer = _b64(raw)
    assert len(footer) == MAX_FOOTER
    # read as a key id, then refused by the signature (which covers the original footer)
    with pytest.raises(TokenError, match="bad token"):
        _verifier().verify(_with_footer(token, footer), now=NOW)

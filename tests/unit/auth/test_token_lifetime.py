"""Token expiry at its exact boundaries, and the verification cache.

Times are explicit (`now=`), so the leeway boundary is tested to the second: a token is
good up to exp + leeway inclusive and refused one second later, the same on the first
(uncached) verification and on cached ones. The cache must skip the signature check on a
second use (counted at pyseto.decode) and nothing else: expiry, revocation and the signing
key's validity still apply to a cached token.
"""

from __future__ import annotations

import pytest

from meshd.auth.tokens import TokenError, Verifier, issue, make_claims, new_signing_key

KID, PRIV, PUB = new_signing_key()
NOW = 1_800_000_000
TTL = 600
EXP = NOW + TTL
LEEWAY = 60


def _token(**over: object) -> tuple[str, dict]:
    claims = make_claims("ada", ["dev"], "n1", "cluster-1", TTL, now=NOW)
    claims.update(over)
    return issue(KID, PRIV, claims), claims


def _verifier(keys: dict[str, bytes] | None = None, revoked: set[str] | None = None
              ) -> Verifier:
    keys = {KID: PUB} if keys is None else keys
    revoked = set() if revoked is None else revoked
    return Verifier("cluster-1", lambda: dict(keys), lambda jti: jti in revoked, LEEWAY)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every signature check the verifier makes (pyseto.decode calls), by token."""
    import pyseto

    calls: list[str] = []
    real = pyseto.decode

    def counting(key, token, *args, **kwargs):
        calls.append(token if isinstance(token, str) else token.decode())
        return real(key, token, *args, **kwargs)

    monkeypatch.setattr(pyseto, "decode", counting)
    return calls


# --- expiry and not-before at the leeway boundary ----------------------------------------------

def test_a_fresh_verifier_accepts_up_to_exp_plus_leeway_and_refuses_one_second_later():
    t, _ = _token()
    assert _verifier().verify(t, now=EXP + LEEWAY)["sub"] == "ada"
    with pytest.raises(TokenError, match="expired"):
        _verifier().verify(t, now=EXP + LEEWAY + 1)


def test_a_token_twice_the_leeway_past_its_expiry_is_refused():
    t, _ = _token()
    with pytest.raises(TokenError, match="expired"):
        _verifier().verify(t, now=EXP + 2 * LEEWAY)


def test_not_before_is_accepted_up_to_leeway_early_and_refused_one_second_earlier():
    t, _ = _token()
    assert _verifier().verify(t, now=NOW - LEEWAY)["sub"] == "ada"
    with pytest.raises(TokenError, match="not valid yet"):
        _verifier().verify(t, now=NOW - LEEWAY - 1)


def test_a_token_without_an_expiry_is_refused():
    t, _ = _token(exp=None)
    with pytest.raises(TokenError, match="expired"):
        _verifier().verify(t, now=NOW)


# --- the cache ---------------------------------------------------------------------------------

def test_the_second_verification_does_not_check_the_signature_again(decodes):
    t, claims = _token()
    v = _verifier()
    assert v.verify(t, now=NOW)["jti"] == claims["jti"]
    assert v.verify(t, now=NOW + 1)["jti"] == claims["jti"]
    assert v.verify(t, now=NOW + 2)["sub"] == "ada"
    assert decodes == [t], "only the first verification may check the signature"


def test_each_distinct_token_is_checked_once(decodes):
    t1, _ = _token()
    t2, _ = _token()
    v = _verifier()
    for _ in range(3):
        v.verify(t1, now=NOW)
        v.verify(t2, now=NOW)
    assert sorted(decodes) == sorted([t1, t2])


def test_a_cached_token_still_expires(decodes):
    t, _ = _token()
    v = _verifier()
    v.verify(t, now=NOW)
    assert v.verify(t, now=EXP + LEEWAY)["sub"] == "ada"
    with pytest.raises(TokenError, match="expired"):
        v.verify(t, now=EXP + LEEWAY + 1)
    assert decodes == [t], "the refusal came from the cached entry"


def test_a_refused_token_is_not_cached(decodes):
    t, _ = _token()
    v = _verifier()
    with pytest.raises(TokenError, match="not valid yet"):
        v.verify(t, now=NOW - LEEWAY - 1)
    assert v.verify(t, now=NOW)["sub"] == "ada"
    assert decodes == [t, t], "a token refused once is checked in full when it comes again"


def test_a_cached_token_is_refused_once_revoked(decodes):
    t, claims = _token()
    revoked: set[str] = set()
    v = _verifier(revoked=revoked)
    v.verify(t, now=NOW)
    v.verify(t, now=NOW)
    revoked.add(claims["jti"])
    with pytest.raises(TokenError, match="revoked"):
        v.verify(t, now=NOW)
    assert decodes == [t]


def test_a_cached_token_is_refused_once_its_key_is_no_longer_valid(decodes):
    t, _ = _token()
    keys = {KID: PUB}
    v = _verifier(keys=keys)
    v.verify(t, now=NOW)
    other_kid, _, other_pub = new_signing_key()
    keys[other_kid] = other_pub  # a rotation keeps the old key: still good
    assert v.verify(t, now=NOW)["sub"] == "ada"
    del keys[KID]  # the signing key is revoked or retired
    with pytest.raises(TokenError, match="no longer valid"):
        v.verify(t, now=NOW)
    assert decodes == [t]

"""PASETO v4.public tokens (ed25519), issued by nodes that hold an issuer key, verified
offline by every node.

Rules:
- Claims: sub (account), scopes, iss (issuing node), aud (the cluster id), iat, nbf, exp,
  jti (token id), typ ("access" or "refresh"), ns (the account's namespace; absent for
  "default", so tokens from before namespaces are default's). The footer names the key id
  (kid).
- Anything that is not a v4.public token (a JWT, `alg: none`, v2, local) is refused before
  any parsing. Then: known key, valid signature, audience, not expired and not before its
  time (both within `leeway`), not revoked.
- Verified tokens are cached by their exact string until their expiry; revocation and the
  signing key's validity are checked on every use, so a cached token stops working as soon
  as its revocation (or its key's) arrives.
- Parsing is bounded: a token over MAX_TOKEN characters or a footer over MAX_FOOTER is
  refused before any decoding, and JSON goes through meshd.wire (no recursion blow-ups).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import wire

# pyseto is imported when a token is first issued or checked (it is large and many nodes
# never see a token).

PREFIX = "v4.public."
MAX_TOKEN = 8192  # characters; real tokens are about 400
MAX_FOOTER = 256  # characters of the base64 footer ({"kid": ...})


class TokenError(Exception):
    """Why a token is refused (for the log; callers only ever see a plain 401)."""


def new_signing_key() -> tuple[str, bytes, bytes]:
    """(kid, private PEM, public PEM)."""
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = priv.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return os.urandom(6).hex(), pem, pub


def issue(kid: str, private_pem: bytes, claims: dict[str, Any]) -> str:
    import pyseto
    from pyseto import Key

    key = Key.new(version=4, purpose="public", key=private_pem)
    token = pyseto.encode(key, json.dumps(claims).encode(),
                          footer=json.dumps({"kid": kid}).encode())
    return token.decode()


def make_claims(sub: str, scopes: list[str], iss: str, aud: str, ttl: float,
                typ: str = "access", now: float | None = None, ns: str = "default"
                ) -> dict[str, Any]:
    now = time.time() if now is None else now
    claims = {"sub": sub, "scopes": list(scopes), "iss": iss, "aud": aud, "iat": int(now),
              "nbf": int(now), "exp": int(now + ttl), "jti": os.urandom(12).hex(),
              "typ": typ}
    if ns != "default":
        claims["ns"] = ns
    return claims


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload without checking the signature (for revocation of expired tokens)."""
    if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > MAX_TOKEN:
        raise TokenError("not a PASETO v4.public token")
    try:
        body = _b64(token[len(PREFIX):].split(".")[0])
        claims = wire.loads_json(body[:-64])
    except (ValueError, IndexError) as exc:
        raise TokenError(f"malformed token: {exc}") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed token: claims are not an object")
    return claims


class Verifier:
    def __init__(self, audience: str, keys: Callable[[], dict[str, bytes]],
                 revoked: Callable[[str], bool], leeway: float = 60.0) -> None:
        self.audience = audience
        self.keys = keys  # kid -> public PEM
        self.revoked = revoked
        self.leeway = leeway
        self._cache: dict[str, tuple[dict[str, Any], str]] = {}  # token -> (claims, kid)
        self._key_objs: dict[str, Any] = {}

    def verify(self, token: Any, now: float | None = None, typ: str = "access"
               ) -> dict[str, Any]:
        now = time.time() if now is None else now
        if not isinstance(token, str) or not token.startswith(PREFIX) \
                or len(token) > MAX_TOKEN:
            raise TokenError("not a PASETO v4.public token")
        cached = self._cache.get(token)
        if cached is not None and cached[1] not in self.keys():
            raise TokenError(f"token signed by a key no longer valid ({cached[1]!r})")
        claims = cached[0] if cached is not None else self._verify_signature(token)
        if claims.get("aud") != self.audience:
            raise TokenError(f"token is for another audience ({claims.get('aud')!r})")
        if claims.get("typ") != typ:
            raise TokenError(f"a {claims.get('typ')} token cannot be used as {typ} token")
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int | float) or now > exp + self.leeway:
            raise TokenError("token expired")
        if isinstance(nbf, int | float) and now < nbf - self.leeway:
            raise TokenError("token not valid yet (check the clocks)")
        if self.revoked(str(claims.get("jti"))):
            raise TokenError("token revoked")
        if cached is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[token] = (claims, self._kid(token))
        return claims

    @staticmethod
    def _kid(token: str) -> str:
        """The key id named by a token's footer (TokenError if there is none)."""
        parts = token.split(".")
        if len(parts) != 4 or len(parts[3]) > MAX_FOOTER:
            raise TokenError("token has no key id footer")
        try:
            footer = wire.loads_json(_b64(parts[3]))
        except ValueError:
            raise TokenError("token footer is not a key id") from None
        kid = footer.get("kid") if isinstance(footer, dict) else None
        if not isinstance(kid, str):
            raise TokenError("token footer is not a key id")
        return kid

    def _verify_signature(self, token: str) -> dict[str, Any]:
        import pyseto
        from pyseto import Key

        kid = self._kid(token)
        pem = self.keys().get(kid)
        if pem is None:
            raise TokenError(f"token signed by an unknown key ({kid!r})")
        key = self._key_objs.get(kid)
        if key is None:
            key = self._key_objs[kid] = Key.new(version=4, purpose="public", key=pem)
        try:
            decoded = pyseto.decode(key, token)
        except Exception as exc:  # pyseto raises several types for bad signatures/formats
            raise TokenError(f"bad token: {type(exc).__name__}") from None
        try:
            claims = wire.loads_json(decoded.payload)
        except ValueError:
            raise TokenError("token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise TokenError("token payload is not a claims object")
        return claims

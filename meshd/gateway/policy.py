"""What the API gateway decides about a request before routing it (sans-IO): who it acts as,
whether CORS lets the browser see it, whether a rate limit holds it back, its request id.

Rules:
- Identity: `Authorization: Bearer TOKEN`, else a `meshd_token` cookie, else none. No token
  means the public scope (""): the request acts as nobody, never as the node, so the rules
  decide what is public. A malformed Authorization header is a 401, not "no token". The
  cookie counts only for a request from this origin or a listed one (`cross_site`): a page
  of another site cannot act with a visitor's cookie (CSRF, WebSocket hijacking).
- CORS: an `Origin` in `api.cors_origins` (or "*" there) is echoed in
  Access-Control-Allow-Origin with Vary: Origin; credentials are allowed only for listed
  origins, never for "*". A preflight (OPTIONS with Access-Control-Request-Method) from an
  allowed origin gets 204 with the methods and the requested headers (bounded); from any
  other origin a 403. Without an Origin header nothing CORS applies.
- Rate limits: one token bucket per token (keyed by a hash of it, so no token is kept) and
  one per client address; a request spends one token of each; the first that is empty
  answers 429 with Retry-After (whole seconds, at least 1).
- Request id: a client's X-Request-Id is kept when it is 1..128 visible ASCII characters,
  else a new one is made; it is sent back and passed to the service in the call's metadata.
- Headers are looked up case-insensitively (ASGI gives them lower-cased); values are decoded
  as latin-1 and only where needed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from meshd.buckets import TokenBuckets
from meshd.errors import MeshError

Headers = Iterable[tuple[bytes, bytes]]
COOKIE = "meshd_token"
MAX_TOKEN = 8192
MAX_REQUEST_ID = 128
METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_ALLOW_HEADERS = 1024


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def credentials(headers: Headers) -> tuple[str | None, bool]:
    """(the request's token, whether it came from the cookie)."""
    token = token_of(headers)
    return token, token is not None and header(headers, b"authorization") is None


def cross_site(headers: Headers, scheme: str, cors: Cors) -> bool:
    """Whether a browser sent this request from another site: Sec-Fetch-Site says
    "cross-site" or "same-site", or its Origin is neither this origin (scheme, host, port
    of the Host header) nor listed in api.cors_origins ("*" does not count). Such a request
    may not use the meshd_token cookie (CSRF, cross-site WebSocket hijacking)."""
    fetch = header(headers, b"sec-fetch-site")
    if fetch is not None and fetch.lower() in (b"cross-site", b"same-site"):
        return True
    origin = header(headers, b"origin")
    if origin is None:
        return False
    text = origin.decode("latin-1").rstrip("/")
    if text in cors.origins:
        return False
    return text != _origin_of(scheme, header(headers, b"host"))


def _origin_of(scheme: str, host: bytes | None) -> str:
    """This server's origin as a browser writes it, from the Host the request named."""
    if not host:
        return ""
    name = host.decode("latin-1").strip().lower()
    default = ":443" if scheme in ("https", "wss") else ":80"
    if name.endswith(default):
        name = name[:-len(default)]
    return f"{'https' if scheme in ('https', 'wss') else 'http'}://{name}"


def token_of(headers: Headers) -> str | None:
    """The request's token: bearer header, else the meshd_token cookie, else None."""
    auth = header(headers, b"authorization")
    if auth is not None:
        text = auth.decode("latin-1").strip()
        scheme, _, value = text.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or len(value) > MAX_TOKEN \
                or len(value.split(None, 1)) != 1:
            raise MeshError(401, "Authorization must be 'Bearer TOKEN'", id="meshd.api")
        return value
    cookie = header(headers, b"cookie")
    if cookie is not None:
        for part in cookie.decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value and len(value) <= MAX_TOKEN:
                return value.strip('"')
    return None


def request_id(headers: Headers) -> str:
    given = header(headers, b"x-request-id")
    if given is not None and 0 < len(given) <= MAX_REQUEST_ID \
            and all(33 <= b < 127 for b in given):
        return given.decode("ascii")
    return os.urandom(12).hex()


@dataclass(frozen=True, slots=True)
class Cors:
    """The CORS policy of `api.cors_origins`."""

    origins: frozenset[str]

    @classmethod
    def of(cls, origins: Iterable[str]) -> Cors:
        return cls(frozenset(o.rstrip("/") for o in origins))

    def allow(self, origin: str) -> list[tuple[bytes, bytes]]:
        """Headers for an actual request from `origin` (none if it is not allowed)."""
        if origin in self.origins:
            return [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-credentials", b"true"),
                    (b"access-control-expose-headers", b"x-request-id, traceparent"),
                    (b"vary", b"Origin")]
        if "*" in self.origins:
            return [(b"access-control-allow-origin", b"*"),
                    (b"access-control-expose-headers", b"x-request-id, traceparent")]
        return []

    def preflight(self, origin: str, headers: Headers) -> list[tuple[bytes, bytes]] | None:
        """Headers of a 204 answering a preflight from `origin`; None: refuse it."""
        allowed = self.allow(origin)
        if not allowed:
            return None
        asked = (header(headers, b"access-control-request-headers") or b"")[:MAX_ALLOW_HEADERS]
        extra = [(b"access-control-allow-headers", asked)] if asked else []
        return [*allowed, (b"access-control-allow-methods", METHODS.encode()),
                (b"access-control-max-age", b"600"), *extra]


class RateLimits:
    """Per-token and per-address token buckets (api.rate_per_token / rate_per_address
    requests a second, bursts of twice that)."""

    def __init__(self, per_token: float, per_address: float, cap: int = 10_000) -> None:
        self.tokens = TokenBuckets(max(1.0, 2 * per_token), per_token, cap) \
            if per_token > 0 else None
        self.addresses = TokenBuckets(max(1.0, 2 * per_address), per_address, cap) \
            if per_address > 0 else None

    def wait(self, token: str | None, address: str, now: float) -> float:
        """0 if the request may go, else the seconds until it may."""
        if self.addresses is not None:
            wait = self.addresses.take(address, now)
            if wait:
                return wait
        if token and self.tokens is not None:
            return self.tokens.take(hashlib.blake2b(token.encode(), digest_size=12
                                                    ).hexdigest(), now)
        return 0.0


def retry_after(wait: float) -> bytes:
    return str(max(1, int(wait + 0.999))).encode()

"""The gateway's sans-IO rules: routes (Micro's path rules, versions, query typing, the
upstream path of an HTTP service) and policy (tokens, request ids, CORS, rate limits)."""

from __future__ import annotations

import h11
import pytest

from meshd.errors import MeshError
from meshd.gateway import policy, routes
from meshd.gateway.upstream import check_address


@pytest.mark.parametrize(("path", "service", "endpoint", "exact", "version", "dotted"), [
    ("/greeter/hello", "greeter", "Greeter.Hello", False, "", ""),
    ("/greeter/Greeter.Hello", "greeter", "Greeter.Hello", True, "", ""),
    ("/greeter/say/hello", "greeter", "Say.Hello", False, "", ""),
    ("/foo/bar/baz/cat", "foo", "Baz.Cat", False, "", "foo.bar"),
    ("/v1/greeter/hello", "greeter", "Greeter.Hello", False, "1", ""),
    ("/v12/greeter/Greeter.Hello", "greeter", "Greeter.Hello", True, "12", ""),
])
def test_micro_path_rules(path, service, endpoint, exact, version, dotted):
    r = routes.parse(path)
    assert (r.kind, r.service, r.endpoints, r.exact, r.version, r.dotted) == (
        "service", service, (endpoint,), exact, version, dotted)


def test_fixed_routes_and_unroutable_paths():
    assert routes.parse("/health").kind == "health"
    assert routes.parse("/openapi.json").kind == "openapi"
    assert routes.parse("/rpc").kind == "rpc"
    assert (routes.parse("/events/a/b").kind, routes.parse("/events/a/b").service) == (
        "event", "a.b")
    assert routes.parse("/").kind == "none"
    assert routes.parse("/events").kind == "none"
    assert routes.parse("/x\x00/y").kind == "none"
    assert routes.parse("/a" * 17).kind == "none"
    assert routes.parse("/web").service == "web" and routes.parse("/web").endpoints == ()


def test_endpoint_matching_forgives_case_only_for_derived_names():
    names = {"Greeter.hello", "Greeter.Bye"}
    assert routes.match_endpoint(routes.parse("/greeter/hello"), names) == "Greeter.hello"
    assert routes.match_endpoint(routes.parse("/greeter/Greeter.Hello"), names) is None
    assert routes.match_endpoint(routes.parse("/greeter/Greeter.Bye"), names) == "Greeter.Bye"
    assert routes.near("Greeter.Hel", names)[0] == "Greeter.hello"


def test_version_prefixes():
    for v in ("1", "1.2.0", "v1", "V1.3"):
        assert routes.version_matches("1", v)
    for v in ("10", "11.0", "2.1", "latest", ""):
        assert not routes.version_matches("1", v)
    assert routes.version_matches("", "anything")


def test_upstream_path_keeps_the_raw_rest():
    assert routes.upstream_path(b"/web/a/b%2Fc/", 1) == b"/a/b%2Fc/"
    assert routes.upstream_path(b"/v1/web/x", 2) == b"/x"
    assert routes.upstream_path(b"/web", 1) == b"/"


def test_query_strings_are_typed_by_the_request_format():
    fmt = {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}}, "o": {"type": "object"}}}
    got = routes.query_request(b"n=3&x=1.5&ok=true&tags=a&tags=b&name=Ada&o=%7B%22k%22%3A1%7D",
                               fmt)
    assert got == {"n": 3, "x": 1.5, "ok": True, "tags": ["a", "b"], "name": "Ada",
                   "o": {"k": 1}}
    with pytest.raises(routes.QueryError):
        routes.query_request(b"n=three", fmt)
    with pytest.raises(routes.QueryError):
        routes.query_request(b"ok=maybe", fmt)
    with pytest.raises(routes.QueryError):
        routes.query_request(b"&".join(b"k%d=1" % i for i in range(100)), fmt)


def test_tokens_from_the_header_or_the_cookie():
    assert policy.token_of([(b"authorization", b"Bearer abc")]) == "abc"
    assert policy.token_of([(b"authorization", b"bearer  abc ")]) == "abc"
    assert policy.token_of([(b"cookie", b"a=1; meshd_token=xyz; b=2")]) == "xyz"
    assert policy.token_of([(b"cookie", b"a=1")]) is None
    assert policy.token_of([]) is None
    for bad in (b"Basic abc", b"Bearer", b"Bearer a b", b"Bearer " + b"x" * 9000):
        with pytest.raises(MeshError) as err:
            policy.token_of([(b"authorization", bad)])
        assert err.value.status == 401


def test_request_ids_kept_only_when_sane():
    assert policy.request_id([(b"x-request-id", b"abc-1")]) == "abc-1"
    for bad in (b"", b"a b", b"x" * 129, b"\xff"):
        made = policy.request_id([(b"x-request-id", bad)])
        assert made != bad.decode("latin-1") and len(made) == 24


def test_cors():
    cors = policy.Cors.of(["https://app.example/"])
    assert dict(cors.allow("https://app.example"))[b"access-control-allow-origin"] == \
        b"https://app.example"
    assert cors.allow("https://evil.example") == []
    pre = dict(cors.preflight("https://app.example", [(b"access-control-request-headers",
                                                         b"content-type")]))
    assert pre[b"access-control-allow-headers"] == b"content-type"
    assert cors.preflight("https://evil.example", []) is None
    star = dict(policy.Cors.of(["*"]).allow("https://any.example"))
    assert star[b"access-control-allow-origin"] == b"*"
    assert b"access-control-allow-credentials" not in star


def test_rate_limits_per_address_and_per_token():
    limits = policy.RateLimits(per_token=1, per_address=10)
    assert [limits.wait("t", "a1", 0.0) for _ in range(2)] == [0.0, 0.0]  # burst 2
    assert limits.wait("t", "a2", 0.0) > 0  # the token's bucket, from any address
    assert limits.wait("u", "a2", 0.0) == 0.0
    assert limits.wait("t", "a1", 1.0) == 0.0  # refilled
    off = policy.RateLimits(0, 0)
    assert all(off.wait("t", "a", 0.0) == 0.0 for _ in range(100))
    assert policy.retry_after(0.2) == b"1" and policy.retry_after(2.5) == b"3"


def test_http_service_addresses_are_loopback_only():
    assert check_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert check_address("http://127.0.0.2:81/") == ("127.0.0.2", 81)
    assert check_address("[::1]:9000") == ("::1", 9000)
    for bad in ("10.0.0.1:80", "169.254.169.254:80", "example.com:80", "", None, "127.0.0.1"):
        with pytest.raises(MeshError):
            check_address(bad)


def test_the_cookie_counts_only_from_this_origin_or_a_listed_one():
    cors = policy.Cors.of(["https://app.example"])
    host = [(b"host", b"gw.example:8080")]
    assert not policy.cross_site(host, "http", cors)  # no Origin: not a browser's cross-site
    assert not policy.cross_site([*host, (b"origin", b"http://gw.example:8080")], "http", cors)
    assert not policy.cross_site([(b"host", b"gw.example"), (b"origin", b"https://gw.example")],
                                 "https", cors)  # default port
    assert not policy.cross_site([*host, (b"origin", b"https://app.example")], "http", cors)
    for origin in (b"https://evil.example", b"https://gw.example:8080", b"http://gw.example",
                   b"null"):
        assert policy.cross_site([*host, (b"origin", origin)], "http", cors), origin
    for site in (b"cross-site", b"same-site"):
        assert policy.cross_site([*host, (b"sec-fetch-site", site)], "http", cors)
    assert not policy.cross_site([*host, (b"sec-fetch-site", b"same-origin")], "http", cors)
    star = policy.Cors.of(["*"])  # "*" lets pages read answers, never use the cookie
    assert policy.cross_site([*host, (b"origin", b"https://evil.example")], "http", star)
    token, cookie = policy.credentials([(b"cookie", b"meshd_token=abc")])
    assert (token, cookie) == ("abc", True)
    assert policy.credentials([(b"authorization", b"Bearer x"),
                               (b"cookie", b"meshd_token=abc")]) == ("x", False)


def test_requests_with_both_framings_are_ambiguous():
    from meshd.gateway.http11 import _ambiguous

    def request(*headers: tuple[bytes, bytes]) -> h11.Request:
        return h11.Request(method="POST", target="/", headers=[(b"host", b"x"), *headers])

    assert _ambiguous(request((b"content-length", b"5"), (b"transfer-encoding", b"chunked")))
    assert not _ambiguous(request((b"content-length", b"5")))
    assert not _ambiguous(request((b"transfer-encoding", b"chunked")))

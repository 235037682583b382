"""The dashboard's ASGI app without a server: which Host and Origin it answers, what a POST
must be, how an op's answer and failure travel (HTTP 200, the status in the body), that a
remote caller never runs an operator op, and that its JSON is strict."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from meshd.errors import MeshError
from meshd.ops import REQUEST_REMOTE, REQUEST_TOKEN, Op, OpTable
from meshd.settings import WebSettings
from meshd.web.app import Dashboard, _host_name, dumps


def table() -> OpTable:
    t = OpTable()
    seen: dict[str, Any] = {}

    async def echo(args: dict[str, Any]) -> Any:
        seen["remote"], seen["token"] = REQUEST_REMOTE.get(), REQUEST_TOKEN.get()
        return {"args": args, "nan": float("nan"), "raw": b"\xff\x00", "text": b"hi",
                "keys": {1: "one"}}

    async def boom(args: dict[str, Any]) -> Any:
        raise MeshError(404, "no such thing", id="test")

    async def login(args: dict[str, Any]) -> Any:
        return {"token": "t"}

    async def ticks(args: dict[str, Any], emit: Any) -> None:
        for i in range(2):
            await emit({"tick": i})

    t.add([Op("ticks", ticks, "checked", "stream"), Op("echo", echo, "checked"),
           Op("boom", boom, "checked"),
           Op("join", echo, "operator"), Op("auth.login", login, "public")])
    t.seen = seen  # type: ignore[attr-defined]
    return t


async def request(app: Dashboard, method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None,
                  server: tuple[str, int] = ("127.0.0.1", 8081)) -> tuple[int, dict, bytes]:
    hdrs = {"host": f"{server[0]}:{server[1]}", **(headers or {})}
    scope = {"type": "http", "method": method, "path": path, "scheme": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 50000), "server": server}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    out: dict[str, Any] = {"body": b""}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in msg["headers"]}
        else:
            out["body"] += msg.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["headers"], out["body"]


def app(**settings: Any) -> Dashboard:
    return Dashboard(table(), replace(WebSettings(), **settings))


def api(op: str, **args: Any) -> bytes:
    return json.dumps({"op": op, "args": args}).encode()


JSON = {"content-type": "application/json"}


async def test_the_host_must_be_one_the_dashboard_answers_to():
    d = app(hosts=("dash.example.com",))
    for host in ("127.0.0.1:8081", "localhost:8081", "[::1]:8081", "dash.example.com",
                 "dash.example.com:443", "10.1.2.3:8081"):
        status, _, _ = await request(d, "GET", "/health", headers={"host": host},
                                     server=("10.1.2.3", 8081))
        assert status == 200, host
    for host in ("evil.example:8081", "evil.example", "127.0.0.1.evil.example:8081", "",
                 "dash.example.com.evil:80"):
        status, _, body = await request(d, "GET", "/", headers={"host": host})
        assert status == 403, host
        assert "web.hosts" in json.loads(body)["error"]["detail"]
    assert _host_name("[::1]:8081") == "[::1]" and _host_name("a:80") == "a"


async def test_the_api_answers_its_own_pages_only():
    d = app()
    own = {"origin": "http://127.0.0.1:8081", **JSON}
    assert (await request(d, "POST", "/api/call", api("auth.login"), own))[0] == 200
    tls = {"origin": "https://127.0.0.1:8081", **JSON}  # a TLS proxy in front
    assert (await request(d, "POST", "/api/call", api("auth.login"), tls))[0] == 200
    for origin in ("http://evil.example", "null", "http://127.0.0.1:8082",
                   "http://127.0.0.1:8081.evil.example"):
        status, headers, _ = await request(d, "POST", "/api/call", api("auth.login"),
                                           {"origin": origin, **JSON})
        assert status == 403, origin
        assert "default-src 'none'" in headers["content-security-policy"]


async def test_a_post_is_json_and_only_json():
    d = app(max_body_bytes=64)
    for kind in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, _, _ = await request(d, "POST", "/api/call", api("auth.login"),
                                     {"content-type": kind})
        assert status == 415, kind
    for body in (b"{", b"[1]", b'{"op": 1}', b'{"op": "echo", "args": []}',
                 b'{"op": "echo", "args": {"x": NaN}}'):
        assert (await request(d, "POST", "/api/call", body, JSON))[0] == 400, body
    assert (await request(d, "POST", "/api/call", b" " * 65, JSON))[0] == 413
    assert (await request(d, "GET", "/api/call"))[0] == 405


async def test_op_answers_and_failures_travel_as_answers():
    d = app()
    auth = {"authorization": "Bearer tok", **JSON}
    # without a token only public ops run; an operator op is refused even with one
    status, headers, body = await request(d, "POST", "/api/call", api("echo"), JSON)
    assert status == 200 and headers["x-meshd-status"] == "401"
    assert json.loads(body)["error"]["status"] == 401
    status, headers, body = await request(d, "POST", "/api/call", api("join"), auth)
    assert status == 200 and json.loads(body)["error"]["status"] == 403
    assert "operator" in json.loads(body)["error"]["detail"]
    status, headers, body = await request(d, "POST", "/api/call", api("nope"), auth)
    assert json.loads(body)["error"]["status"] == 404
    status, _, body = await request(d, "POST", "/api/call", api("auth.login"), JSON)
    assert status == 200 and json.loads(body) == {"result": {"token": "t"}}
    status, _, body = await request(d, "POST", "/api/stream", api("auth.login"), JSON)
    assert json.loads(body)["error"]["status"] == 400  # a call is not a stream


async def test_checked_ops_run_as_a_remote_request_of_the_token():
    t = table()

    class Auth:
        def identify(self, token: str | None, node: str | None) -> Any:
            if token != "tok":
                raise MeshError(401, "invalid token")
            return object()

        def check(self, *a: Any, **k: Any) -> Any:
            return object()

    t.auth = Auth()
    d = Dashboard(t, WebSettings())
    auth = {"authorization": "Bearer tok", **JSON}
    status, _, body = await request(d, "POST", "/api/call", api("echo", x=1), auth)
    assert status == 200
    result = json.loads(body)["result"]
    assert t.seen == {"remote": True, "token": "tok"}  # type: ignore[attr-defined]
    assert result["args"] == {"x": 1, "namespace": "default"} or result["args"] == {"x": 1}
    # strict JSON out: no NaN, bytes as text or base64, keys as text
    assert result["nan"] is None and result["text"] == "hi"
    assert result["raw"] == {"base64": "/wA="} and result["keys"] == {"1": "one"}
    status, _, body = await request(d, "POST", "/api/call", api("boom"), auth)
    assert json.loads(body)["error"] == {"id": "test", "code": "not_found",
                                         "detail": "no such thing", "status": 404}
    bad = {"authorization": "Bearer other", **JSON}
    assert json.loads((await request(d, "POST", "/api/call", api("echo"), bad))[2]
                      )["error"]["status"] == 401
    # a stream: NDJSON, admitted like a call
    status, headers, body = await request(d, "POST", "/api/stream", api("ticks"), auth)
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    assert [json.loads(x) for x in body.split(b"\n") if x] == [
        {"ok": True}, {"event": {"tick": 0}}, {"event": {"tick": 1}}]
    for refused in (bad, JSON):
        status, headers, body = await request(d, "POST", "/api/stream", api("ticks"), refused)
        assert headers["x-meshd-status"] == "401"
        assert [json.loads(x)["error"]["status"] for x in body.split(b"\n") if x] == [401]


async def test_assets_carry_the_security_headers_and_revalidate():
    d = app(namespace="team-a")
    status, headers, body = await request(d, "GET", "/")
    assert status == 200 and b'data-namespace="team-a"' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == \
        "nosniff"
    again = await request(d, "GET", "/", headers={"if-none-match": headers["etag"]})
    assert again[0] == 304 and again[2] == b""
    status, headers, _ = await request(d, "GET", "/assets/app.js",
                                       headers={"accept-encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    for path in ("/assets/../app.py", "/assets/app.py", "/etc/passwd"):
        assert (await request(d, "GET", path))[0] == 404, path


@pytest.mark.parametrize(("value", "text"), [
    (float("inf"), "null"), (b"\xc3\xa9", '"é"'), ({2: [1.5, b"x"]}, '{"2":[1.5,"x"]}'),
    ((1, None), "[1,null]"), (object, "\"<class 'object'>\""),
])
def test_dumps_is_strict_json(value, text):
    assert dumps(value).decode() == text

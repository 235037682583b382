"""The API gateway with real daemons: services on node A reached through the gateway of node C
(RPC by both route forms, GET with a query, /rpc, versions), events reaching a subscriber,
an HTTP service and its WebSocket proxied across nodes, streams as SSE and WebSocket,
public vs token-only endpoints, CORS, 413, 429, and /openapi.json validated and current."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import trio
from openapi_spec_validator import validate

from meshd_sdk import Client

from .cluster import SERVICES, control, wait_for
from .test_broker import FAST, ready, sees, sock
from .test_tls import admin_token
from .test_tunnel import free_port


def gateway_pair(cluster, **api: str):
    """Node a (testsvc, websvc) and node c (the gateway); c sees both services."""
    port = free_port()
    a = cluster.add("a", env=FAST)
    c = cluster.add("c", join=[a.addr], env={**FAST, "MESHD_API_LISTEN": f"127.0.0.1:{port}",
                                              **api})
    ready(a, c)
    cluster.service(a)
    cluster.service(a, "websvc", script=SERVICES / "websvc.py")
    for name in ("testsvc", "websvc"):
        wait_for(lambda n=name: any(s["name"] == n for s in control(c.data_dir, "services")),
                 20, f"{name} seen from c")
    return a, c, f"http://127.0.0.1:{port}"


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_rpc_routes_through_a_gateway_on_another_node(cluster):
    a, c, url = gateway_pair(cluster)
    h = auth(admin_token(a))
    with httpx.Client(base_url=url, timeout=10) as http:
        # the exact form, Micro's derived forms, GET with a query, /rpc, a version prefix
        assert http.post("/testsvc/Test.Echo", json={"text": "x"}, headers=h).json() == \
            {"text": "x"}
        assert http.post("/testsvc/test/echo", json={"text": "y"}, headers=h).json() == \
            {"text": "y"}
        assert http.get("/testsvc/Test.Echo", params={"text": "q"}, headers=h).json() == \
            {"text": "q"}
        assert http.post("/testsvc/test/echo", data={"text": "form"}, headers=h).json() == \
            {"text": "form"}
        r = http.post("/rpc", json={"service": "testsvc", "endpoint": "Test.Echo",
                                    "request": {"text": "r"}, "timeout": 5}, headers=h)
        assert r.status_code == 200 and r.json() == {"text": "r"}
        # the call ran on a: the service saw the gateway's node as the caller's
        meta = http.post("/testsvc/Test.Meta", json={"text": "x-request-id"}, headers={
            **h, "x-request-id": "req-42"}).json()
        assert meta["caller"] == "c" and meta["user"] == "req-42"
        assert http.post("/v1/testsvc/test/echo", json={"text": "v"}, headers=h
                         ).status_code == 404  # testsvc is version "latest"
        # request ids and trace context in and out
        tp = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        r = http.post("/testsvc/Test.Echo", json={"text": "t"},
                      headers={**h, "traceparent": tp, "x-request-id": "mine-1"})
        assert r.headers["x-request-id"] == "mine-1"
        assert r.headers["traceparent"].startswith("00-" + "ab" * 16 + "-")
        assert r.headers["traceparent"] != tp
        # errors: the service's structured error and status, near matches, bad input
        r = http.post("/testsvc/Test.Boom", json={"text": "x"}, headers=h)
        assert r.status_code == 500 and r.json()["status"] == 500 and r.json()["detail"]
        r = http.post("/testsvc/Test.Echoo", json={"text": "x"}, headers=h)
        assert r.status_code == 404 and "Test.Echo" in r.json()["near"]
        r = http.post("/testsvx/Test.Echo", json={"text": "x"}, headers=h)
        assert r.status_code == 404 and "testsvc" in r.json()["near"]
        r = http.put("/testsvc/Test.Echo", json={"text": "x"}, headers=h)
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        r = http.post("/testsvc/Test.Echo", content=b"<x/>",
                      headers={**h, "content-type": "text/xml"})
        assert r.status_code == 415 and r.json()["status"] == 415
        r = http.post("/testsvc/Test.Echo", content=b'{"text": ', headers={
            **h, "content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["detail"]
        r = http.post("/testsvc/Test.Echo", json={"txt": "x"}, headers=h)
        assert r.status_code == 400  # the service's own check of its request format
        r = http.post("/testsvc/Test.Sleep", json={"seconds": 3}, headers={
            **h, "x-meshd-timeout": "0.5"})
        assert r.status_code == 408
        assert http.get("/health").json() == {"status": "ok", "node": "c"}
        assert http.get("/nowhere/at/all/x/y").status_code == 404
    # every request was logged on c, into its debug log buffer too (`meshd logs`)
    wait_for(lambda: "api POST /testsvc/Test.Echo status=200" in c.log.read_text(), 5,
             "the access log")
    records = control(a.data_dir, "debug.logs", node="c", limit=1000)["records"]
    assert any(r["message"].startswith("api POST /testsvc/Test.Echo status=200")
               and "request_id=mine-1" in r["message"] for r in records), records[-5:]


def test_public_endpoints_act_as_nobody_never_as_the_node(cluster):
    a, _c, url = gateway_pair(cluster)
    token = admin_token(a)
    with httpx.Client(base_url=url, timeout=10) as http:
        # without a token: the public scope, which no default rule grants (a node would be)
        r = http.post("/testsvc/Test.Echo", json={"text": "x"})
        assert r.status_code == 401 and r.json()["id"] == "meshd.auth"
        r = http.post("/events/gw.anon", json={"n": 1})
        assert r.status_code == 401
        control(a.data_dir, "auth.rules.create", id="public-echo",
                resource="service:testsvc:Test.Echo", scope="", access="granted",
                priority=5)
        wait_for(lambda: http.post("/testsvc/Test.Echo", json={"text": "x"}
                                   ).status_code == 200, 10, "the public rule on a")
        # the public caller is "anonymous" at the service, not node:c
        assert http.post("/testsvc/Test.Caller", json={"text": ""}).status_code == 401
        # a token in a cookie acts as its account; a malformed or bad token is a 401
        with httpx.Client(base_url=url, timeout=10, cookies={"meshd_token": token}) as jar:
            r = jar.post("/testsvc/Test.Caller", json={"text": ""})
        assert r.status_code == 200 and r.json()["text"] == "admin", r.text
        assert http.post("/testsvc/Test.Echo", json={"text": "x"},
                         headers={"authorization": "Basic abc"}).status_code == 401
        assert http.post("/testsvc/Test.Echo", json={"text": "x"},
                         headers={"authorization": "Bearer v4.public.nope"}
                         ).status_code == 401


def test_events_reach_a_subscriber_on_another_node(cluster):
    a, c, url = gateway_pair(cluster)
    token = admin_token(a)

    async def go() -> None:
        async with Client(sock(a)) as ca, Client(sock(c)) as cc, \
                ca.subscribe("gw.orders.*") as sub:
            await sees(cc, "a", "gw.orders.*")
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                r = await http.post("/events/gw/orders/created", json={"id": 7},
                                    headers=auth(token))
            assert r.status_code == 202, r.text
            with trio.fail_after(10):
                msg = await sub.__anext__()
            assert msg.topic == "gw.orders.created" and msg.body == {"id": 7}
            assert msg.id == r.json()["id"] and msg.publisher == "admin"

    trio.run(go)


def test_an_http_service_and_its_websocket_through_the_gateway(cluster):
    a, _c, url = gateway_pair(cluster)
    token = admin_token(a)
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.get("/websvc/echo", params={"q": "1"},
                     headers={**auth(token), "x-forwarded-for": "10.9.9.9"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["path"] == "/echo" and got["query"] == "q=1" and got["method"] == "GET"
        hdr = got["headers"]
        assert hdr["x-forwarded-prefix"] == "/websvc" and hdr["x-meshd-caller"] == "admin"
        assert hdr["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
        assert "authorization" not in hdr  # the caller's meshd token stays at the gateway
        assert r.headers["set-cookie"] == "web=1"
        # bodies stream both ways; the service's own statuses pass through
        r = http.post("/websvc/upload", content=b"x" * (1 << 20), headers=auth(token))
        assert r.json()["size"] == 1 << 20
        with http.stream("GET", "/websvc/stream", headers=auth(token)) as s:
            parts = [line for line in s.iter_lines() if line]
        assert parts == [f"part{i}" for i in range(5)]
        assert http.get("/websvc/teapot", headers=auth(token)).status_code == 418
        assert http.get("/websvc/a%2Fb", headers=auth(token)).json()["raw_path"] == "/a%2Fb"
        # the rules decide at a: no public rule for service:websvc:http
        assert http.get("/websvc/echo").status_code == 401

    async def ws() -> tuple[list[str], int]:
        import trio_websocket
        async with trio_websocket.open_websocket_url(
                url.replace("http", "ws") + "/websvc/ws",
                extra_headers=[(b"authorization", f"Bearer {token}".encode())]) as conn:
            out = []
            for word in ("hello", "mesh"):
                await conn.send_message(word)
                out.append(await conn.get_message())
            await conn.send_message("close")
            try:
                await conn.get_message()
            except trio_websocket.ConnectionClosed as exc:
                return out, exc.reason.code
        return out, 0

    assert trio.run(ws) == (["HELLO", "MESH"], 4001)
    assert control(a.data_dir, "status")["stats"]["api_http_served"] >= 1  # via a's daemon


def test_streams_as_sse_and_websocket(cluster):
    a, _c, url = gateway_pair(cluster)
    token = admin_token(a)
    with httpx.Client(base_url=url, timeout=10) as http, \
            http.stream("GET", "/testsvc/Test.Count", params={"n": "3"},
                        headers={**auth(token), "accept": "text/event-stream"}) as s:
        assert s.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events == [{"text": "0"}, {"text": "1"}, {"text": "2"}]

    async def ws() -> list[str]:
        import trio_websocket
        async with trio_websocket.open_websocket_url(
                url.replace("http", "ws") + "/testsvc/Test.Upper",
                extra_headers=[(b"authorization", f"Bearer {token}".encode())]) as conn:
            out = []
            for word in ("a", "b"):
                await conn.send_message(json.dumps({"text": word}))
                out.append(json.loads(await conn.get_message())["text"])
            return out

    assert trio.run(ws) == ["A", "B"]


def test_cors_body_size_and_rate_limits(cluster):
    a, _c, url = gateway_pair(cluster, MESHD_API_CORS_ORIGINS="https://app.example",
                             MESHD_API_MAX_BODY_BYTES="1000", MESHD_API_RATE_PER_ADDRESS="2")
    token = admin_token(a)
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.options("/testsvc/Test.Echo", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization"})
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "content-type, authorization"
        r = http.options("/testsvc/Test.Echo", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        time.sleep(2.5)  # the address's bucket refilled (burst 4)
        r = http.post("/testsvc/Test.Echo", json={"text": "x"},
                      headers={**auth(token), "origin": "https://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = http.post("/testsvc/Test.Echo", json={"text": "x" * 2000}, headers=auth(token))
        assert r.status_code == 413 and r.json()["status"] == 413
        statuses = [http.get("/health").status_code for _ in range(10)]
        assert 429 in statuses
        r = http.get("/health")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_openapi_is_valid_and_follows_the_registry(cluster):
    a, _c, url = gateway_pair(cluster)
    token = admin_token(a)
    with httpx.Client(base_url=url, timeout=10) as http:
        doc = http.get("/openapi.json", headers=auth(token)).json()
        validate(doc)
        assert "/testsvc/Test.Echo" in doc["paths"] and "/rpc" in doc["paths"]
        assert doc["paths"]["/testsvc/Test.Echo"]["post"]["requestBody"]["content"][
            "application/json"]["schema"]["properties"]["text"] == {"type": "string"}
        assert "/websvc/{path}" in doc["paths"]
        # public: only what the public scope may call (nothing, by the default rules)
        assert "/testsvc/Test.Echo" not in http.get("/openapi.json").json()["paths"]
        extra = cluster.service(a, "extrasvc")
        wait_for(lambda: "/extrasvc/Test.Echo" in http.get(
            "/openapi.json", headers=auth(token)).json()["paths"], 15, "extrasvc listed")
        extra.stop()
        wait_for(lambda: "/extrasvc/Test.Echo" not in http.get(
            "/openapi.json", headers=auth(token)).json()["paths"], 30, "extrasvc gone")


def test_schemathesis_against_the_live_gateway(cluster, tmp_path):
    """schemathesis generates requests from the live /openapi.json (greeter, orders with
    TypedDict formats, an HTTP service, the fixed routes) and checks every answer: a
    documented status, the documented content type and schema, and no 5xx."""
    port = free_port()
    a = cluster.add("a", env=FAST)
    c = cluster.add("c", join=[a.addr], env={**FAST, "MESHD_API_LISTEN": f"127.0.0.1:{port}",
                                              "MESHD_API_ACCESS_LOG": "false"})
    ready(a, c)
    cluster.service(a, "greeter", script=SERVICES.parent.parent.parent / "examples" /
                    "greeter" / "main.py")
    cluster.service(a, "orders", script=SERVICES / "typedsvc.py")
    for name in ("greeter", "orders"):
        wait_for(lambda n=name: any(s["name"] == n for s in control(c.data_dir, "services")),
                 20, f"{name} seen from c")
    token = admin_token(a)
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run",
         f"http://127.0.0.1:{port}/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--checks", "all", "--max-examples", "25", "--generation-deterministic",
         "--request-timeout", "10", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested: " in run.stdout and "passed" in run.stdout, run.stdout[-3000:]
    assert c.proc.poll() is None

"""Attacks on the API gateway (`meshd up --api-listen`): an outside client who can reach the
port, and HTTP services that answer with hostile bytes.

One mesh serves the module: node a (testsvc, HTTP services whose addresses are hostile
servers of this test) and node c, the gateway (its own services too, so both the local path
and the remote one, over link channels, are attacked), with api.read_timeout 2.5 s,
api.timeout 3 s and api.max_body_bytes 64 KiB. Every hostile server is a thread on
127.0.0.1 that counts the connections it got and sees them end.

What must hold (docs/gateway.md, ARCHITECTURE.md §9): a request without a token acts as
nobody, never as the node (calls, events, SSE, WebSocket, HTTP services, local or remote);
ambiguous framing is refused and whatever it smuggles never runs; a slow client, a huge head
or a hostile service costs one connection for a bounded time and the gateway serves on; an
HTTP service at an address that is not loopback is never connected to; a WebSocket message
over the limit ends that socket only.

Every wait is bounded (a hang fails), nothing asserts a duration. The review that wrote
these found 16 issues; each one fixed has its test here (request smuggling with both
framings, a head trickled byte by byte, a head over the limit in one read, a silent service
behind a WebSocket, refusals of WebSockets before the upgrade, a streamed answer left by its
client, a service's head trickled, cookie planting, forged identity headers with
underscores, conflicting framing from a service, 100 Continue, cross-site WebSockets and
forms with the cookie, endpoint names in 404s, forged access-log lines).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trio_websocket

from meshd_sdk import Client

from .attacks import HttpConn, HttpResponse, one, request, slow_send, upgrade_request
from .cluster import SERVICES, Cluster, Daemon, control, wait_for
from .test_broker import FAST, ready, sock
from .test_tls import admin_token
from .test_tunnel import free_port

READ_TIMEOUT = 2.5  # api.read_timeout of the gateway: not whole seconds on purpose
TIMEOUT = 3  # api.timeout: a service that says nothing for this long is a 504
MAX_BODY = 64 * 1024  # api.max_body_bytes, also the WebSocket message limit
BOUND = 20.0  # seconds any one exchange may take before it counts as a hang
HOSTILE = SERVICES / "hostile_http.py"


# --- hostile HTTP servers (threads on 127.0.0.1) ------------------------------------------


class Hostile:
    """A TCP server on 127.0.0.1 that answers HTTP requests as `mode` says:

    silent   reads the request and never answers
    endless  a status line, then one header line that never ends
    trickle  a status line, then a header one byte every 0.5 s, forever
    garbage  bytes that are not HTTP, then close
    stream   a chunked 200 whose body never ends (a chunk every 0.2 s)
    cookie   200 with Set-Cookie: meshd_token=planted
    clte     200 with both Content-Length: 3 and a chunked body of 5 bytes
    continue 100 Continue, then 200 "ok"
    record   a well-behaved HTTP/1.1 server that records every request it parses

    `connections` counts accepted connections, `ended` those that ended (the gateway closed
    them, or a write failed), `requests` the request heads (and bodies) parsed in mode
    record."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.ended = 0
        self.requests: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        try:
            if self.mode == "record":
                self._record(conn)
                return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            getattr(self, f"_{self.mode}")(conn)
        except OSError:
            pass
        finally:
            with self.lock:
                self.ended += 1
            conn.close()

    def _silent(self, conn: socket.socket) -> None:
        while not self.stop.is_set() and conn.recv(65536):
            pass

    def _endless(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while not self.stop.is_set():
            conn.sendall(b"a" * 4096)
            time.sleep(0.001)

    def _trickle(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not self.stop.is_set():
            conn.sendall(b"X")
            time.sleep(0.5)

    def _garbage(self, conn: socket.socket) -> None:
        conn.sendall(b"\x00\xffNOT HTTP\r\n\r\n" * 20)

    def _stream(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not self.stop.is_set():
            conn.sendall(b"5\r\nhello\r\n")
            time.sleep(0.2)

    def _cookie(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: meshd_token=planted; Path=/\r\n"
                     b"Content-Length: 2\r\n\r\nok")

    def _clte(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n5\r\nhello\r\n0\r\n\r\n")

    def _continue(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def _record(self, conn: socket.socket) -> None:
        parser = h11.Connection(h11.SERVER)
        current: dict[str, Any] = {}
        while not self.stop.is_set():
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                current["error"] = str(exc)
                return
            if event is h11.NEED_DATA:
                parser.receive_data(conn.recv(65536))
            elif isinstance(event, h11.Request):
                current = {"method": event.method.decode(), "target": event.target.decode(),
                           "headers": [(k.decode(), v.decode("latin-1"))
                                       for k, v in event.headers.raw_items()],
                           "body": b""}
                with self.lock:
                    self.requests.append(current)
            elif isinstance(event, h11.Data):
                current["body"] += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                conn.sendall(parser.send(h11.Response(status_code=200, headers=[
                    (b"content-type", b"text/plain"), (b"content-length", b"2")]))
                    + parser.send(h11.Data(data=b"ok")) + parser.send(h11.EndOfMessage()))
                parser.start_next_cycle()
            else:  # ConnectionClosed, PAUSED (an upgrade): done
                return

    def targets(self) -> list[str]:
        with self.lock:
            return [r["target"] for r in self.requests]


# --- the mesh ------------------------------------------------------------------------------


@dataclass
class Mesh:
    cluster: Cluster
    a: Daemon  # services, the auth root
    c: Daemon  # the gateway
    port: int
    token: str
    servers: dict[str, Hostile] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bearer(self) -> str:
        return f"Authorization: Bearer {self.token}\r\n"


# HTTP services: name -> (node, hostile mode). "l" names run on c (the gateway's node: the
# gateway connects itself), "r" names on a (reached over link channel api-http).
HTTP_SERVICES = {
    "lsilent": ("c", "silent"), "rsilent": ("a", "silent"),
    "rendless": ("a", "endless"), "rgarbage": ("a", "garbage"),
    "ltrickle": ("c", "trickle"),
    "lstream": ("c", "stream"), "rstream": ("a", "stream"),
    "lrecord": ("c", "record"), "rrecord": ("a", "record"),
    "lcookie": ("c", "cookie"), "lclte": ("c", "clte"), "lcontinue": ("c", "continue"),
    "pubweb": ("c", "record"),  # the one HTTP service the public scope may reach
    "lsink": ("c", "record"),  # listens where the non-loopback addresses below would land
}
# Registered addresses that are not loopback: 0.0.0.0:PORT would reach lsink's listener on
# this host if the gateway ever connected to it.
BAD_ADDRESSES = ("0.0.0.0:{sink}", "10.1.2.3:80", "169.254.169.254:80", "[::]:{sink}")
PUBLIC_RULES = {  # id -> resource granted to the public scope ("")
    "gwatk-public-caller": "service:pubsvc:Test.Caller",
    "gwatk-public-count": "service:pubsvc:Test.Count",
    "gwatk-public-upper": "service:pubsvc:Test.Upper",
    "gwatk-public-web": "service:pubweb:http",
    "gwatk-public-topic": "topic:gwatk.public:publish",
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    cluster = Cluster(tmp_path_factory.mktemp("gwattack"))
    servers = {name: Hostile(mode) for name, (_, mode) in HTTP_SERVICES.items()}
    try:
        port = free_port()
        a = cluster.add("a", env=FAST)
        c = cluster.add("c", join=[a.addr], env={
            **FAST, "MESHD_API_LISTEN": f"127.0.0.1:{port}",
            "MESHD_API_READ_TIMEOUT": str(READ_TIMEOUT), "MESHD_API_TIMEOUT": str(TIMEOUT),
            "MESHD_API_MAX_BODY_BYTES": str(MAX_BODY)})
        ready(a, c)
        nodes = {"a": a, "c": c}
        cluster.service(a)  # testsvc, remote from the gateway
        cluster.service(c, "localsvc")  # testsvc's endpoints on the gateway's node
        cluster.service(c, "pubsvc")  # the same, with public rules
        sink = servers["lsink"].port
        for where in ("a", "c"):
            pairs = [f"{name}={servers[name].address}" for name, (node, _) in
                     HTTP_SERVICES.items() if node == where]
            pairs += [f"{where}bad{i}={bad.format(sink=sink)}"
                      for i, bad in enumerate(BAD_ADDRESSES)]
            first, address = pairs[0].split("=", 1)
            cluster.service(nodes[where], first, script=HOSTILE, args=(address, *pairs[1:]))
        names = {"testsvc", "localsvc", "pubsvc", *HTTP_SERVICES,
                 *(f"{w}bad{i}" for w in "ac" for i in range(len(BAD_ADDRESSES)))}
        wait_for(lambda: names <= {s["name"] for s in control(c.data_dir, "services")}, 30,
                 "every service seen from the gateway's node")
        for rule_id, resource in PUBLIC_RULES.items():
            control(a.data_dir, "auth.rules.create", id=rule_id, resource=resource, scope="",
                    access="granted", priority=5)
        m = Mesh(cluster, a, c, port, admin_token(a), servers)
        wait_for(lambda: post(m, "/pubsvc/Test.Caller", {"text": ""})[0] == 200, 20,
                 "the public rules in force at the gateway")
        yield m
    finally:
        cluster.close()
        for server in servers.values():
            server.close()


# --- raw HTTP helpers ------------------------------------------------------------------------


async def exchange(port: int, data: bytes, *, half_close: bool = False,
                   bound: float = BOUND) -> tuple[list[HttpResponse], bool]:
    """Send `data` on a fresh connection; the responses that come back until the server
    closes, and whether it closed within `bound` (False: it kept the connection, or hung)."""
    responses: list[HttpResponse] = []
    conn = await HttpConn.open(port)
    closed = False
    try:
        await conn.send(data)
        if half_close:
            await conn.shut_write()
        with trio.move_on_after(bound):
            while (resp := await conn.response(allow_cut=True)) is not None:
                responses.append(resp)
                if resp.cut:
                    break
            closed = True
    finally:
        await conn.aclose()
    return responses, closed


def post(m: Mesh, path: str, payload: Any, headers: str = "") -> tuple[int, Any]:
    resp = trio.run(one, m.port, request("POST", path, json.dumps(payload).encode(), headers))
    assert resp is not None, f"no answer to POST {path}"
    return resp.status, json.loads(resp.body) if resp.body else None


def get(m: Mesh, path: str, headers: str = "") -> HttpResponse:
    resp = trio.run(one, m.port, request("GET", path, headers=headers))
    assert resp is not None, f"no answer to GET {path}"
    return resp


def assert_error(resp: HttpResponse, *statuses: int) -> dict[str, Any]:
    assert resp.status in statuses, (resp.status, resp.body[:300])
    body = json.loads(resp.body)
    assert body["status"] == resp.status and body["detail"], body
    return body


def assert_serves(m: Mesh) -> None:
    """The gateway still answers, as the node and for a token, on new connections."""
    m.c.assert_running()
    assert get(m, "/health").status == 200
    assert post(m, "/testsvc/Test.Echo", {"text": "still"}, m.bearer()) == (
        200, {"text": "still"})


async def ws_upgrade(port: int, path: str, headers: str = "", bound: float = BOUND
                     ) -> tuple[int | None, bytes, bool]:
    """A raw WebSocket upgrade: (status, body of a refusal, whether the server closed the
    connection within `bound` after answering). Status None: no answer within `bound` (or
    the connection closed without one)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = upgrade_request(port, path).replace(b"\r\n\r\n", b"\r\n" + headers.encode() + b"\r\n")
    buf = b""
    status: int | None = None
    body = b""
    closed = False
    try:
        await stream.send_all(data)
        with trio.move_on_after(bound):
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None, b"", True
                buf += chunk
            head, body = buf.split(b"\r\n\r\n", 1)
            status = int(head.split(b" ", 2)[1])
            if status == 101:
                return status, b"", False
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), None)
            while length is not None and len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return status, body, True
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return status, body, closed


def eventually(check, what: str, timeout: float = BOUND) -> None:
    wait_for(check, timeout, what)


# --- request smuggling ------------------------------------------------------------------------


def _smuggled(m: Mesh, topic: str) -> bytes:
    """A request that would publish to `topic` as the admin, if it ever ran."""
    return request("POST", f"/events/{topic}", b"{}", m.bearer())


def _smuggle_attack(m: Mesh, variant: str, front: str, topic: str) -> bytes:
    """The attack bytes of `variant`: a request to `front` whose framing hides `_smuggled`."""
    hidden = _smuggled(m, topic)
    head = f"POST {front} HTTP/1.1\r\nHost: 127.0.0.1\r\n{m.bearer()}" \
           "Content-Type: application/json\r\n"
    chunked_end = b"0\r\n\r\n" + hidden  # chunked: the body ends at 0; the rest is a request
    in_chunk = b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"  # chunked: all of it body
    if variant == "cl-te":
        return (head + f"Content-Length: {len(chunked_end)}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked_end
    if variant == "te-cl":
        return (head + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n").encode() \
            + in_chunk
    if variant == "cl-cl":
        return (head + f"Content-Length: 2\r\nContent-Length: {2 + len(hidden)}\r\n\r\n"
                ).encode() + b"{}" + hidden
    if variant == "te-xchunked":
        return (head + f"Content-Length: {len(chunked_end)}\r\n"
                "Transfer-Encoding: xchunked\r\n\r\n").encode() + chunked_end
    if variant == "te-gzip-chunked":
        return (head + f"Content-Length: {len(chunked_end)}\r\n"
                "Transfer-Encoding: gzip, chunked\r\n\r\n").encode() + chunked_end
    if variant == "te-trailing-space":
        return (head + f"Content-Length: {len(chunked_end)}\r\n"
                "Transfer-Encoding: chunked \r\n\r\n").encode() + chunked_end
    if variant == "te-obs-fold":
        return (head + f"Content-Length: {len(chunked_end)}\r\n"
                "Transfer-Encoding:\r\n chunked\r\n\r\n").encode() + chunked_end
    raise AssertionError(variant)


SMUGGLING = ["cl-te", "te-cl", "cl-cl", "te-xchunked", "te-gzip-chunked", "te-trailing-space",
             "te-obs-fold"]


@pytest.mark.parametrize("variant", SMUGGLING)
def test_ambiguous_framing_is_refused_and_what_it_hides_never_runs(mesh, variant):
    m = mesh
    marker = f"gwatk.smuggle.{variant}"
    done = f"gwatk.smuggle.done-{variant}"

    async def go() -> tuple[list[HttpResponse], list[str]]:
        async with Client(sock(m.c)) as client, client.subscribe("gwatk.smuggle.*") as sub:
            with trio.fail_after(BOUND * 2):
                responses, _ = await exchange(m.port, _smuggle_attack(
                    m, variant, "/events/gwatk.smuggle.front", marker), bound=BOUND)
                ok = await one(m.port, _smuggled(m, done))  # proves the subscriber live
                assert ok is not None and ok.status == 202, ok and ok.body
                topics = []
                while done not in topics:
                    topics.append((await sub.receive()).topic)
        return responses, topics

    responses, topics = trio.run(go)
    assert responses, "no answer at all"
    first = responses[0]
    assert 400 <= first.status < 500 or first.status == 501, (first.status, first.body)
    assert marker not in topics, f"the smuggled request ran: {topics}"
    assert len(responses) == 1, [r.status for r in responses]
    assert_serves(m)




@pytest.mark.parametrize("variant", ["cl-te", "te-cl"])
def test_smuggling_never_reaches_an_http_service_as_a_request(mesh, variant):
    """The gateway re-frames what it sends an HTTP service: a request hidden in the client's
    framing is body or refused, never a request of its own at the service."""
    m = mesh
    rec = m.servers["rrecord"]
    hidden = request("GET", f"/rrecord/smuggled-{variant}", headers=m.bearer())
    head = (f"POST /rrecord/front-{variant} HTTP/1.1\r\nHost: 127.0.0.1\r\n{m.bearer()}"
            "Content-Type: application/octet-stream\r\n")
    if variant == "cl-te":
        body = b"0\r\n\r\n" + hidden
        data = (head + f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
                ).encode() + body
    else:
        data = (head + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n").encode() + \
            b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
    responses, _ = trio.run(exchange, m.port, data)
    assert responses, "no answer"
    assert f"/smuggled-{variant}" not in rec.targets(), rec.targets()
    assert 400 <= responses[0].status < 500, (responses[0].status, responses[0].body)
    assert_serves(m)


# --- slow, huge and hostile clients -----------------------------------------------------------


def test_a_huge_header_block_is_refused_and_the_gateway_serves_on(mesh):
    m = mesh
    headers = "".join(f"X-Pad-{i}: {'v' * 400}\r\n" for i in range(500))  # 200 KB
    responses, closed = trio.run(exchange, m.port, request("GET", "/health", headers=headers))
    assert responses and responses[0].status in (400, 431), [r.status for r in responses]
    assert closed, "the connection stayed open after a refused head"
    resp = get(m, "/" + "a" * 200_000)
    assert resp.status in (400, 414, 431), resp.status
    assert_serves(m)


def test_a_head_over_max_header_bytes_is_refused_even_in_one_read(mesh):
    m = mesh
    headers = "".join(f"X-Pad-{i}: {'v' * 400}\r\n" for i in range(100))  # 40 KB > 16 KiB
    responses, _ = trio.run(exchange, m.port, request("GET", "/health", headers=headers))
    assert responses and responses[0].status in (400, 431), [r.status for r in responses]




def test_a_head_trickled_byte_by_byte_is_cut_off_and_others_are_served(mesh):
    """Slowloris: a head sent a byte every 0.25 s (never read_timeout apart) would take 20 s;
    the gateway must drop it before it completes, and serve others meanwhile."""
    m = mesh
    head = request("GET", "/health", headers="X-Slow: " + "s" * 30 + "\r\n")
    assert len(head) * 0.25 >= 18

    async def go() -> tuple[int, bytes, int]:
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            async def loris() -> None:
                result["sent"], result["got"] = await slow_send(m.port, head, 0.25)
            nursery.start_soon(loris)
            await trio.sleep(1)
            others = await one(m.port, request("GET", "/health"))
            result["other"] = others.status if others is not None else 0
        return result["sent"], result["got"], result["other"]

    sent, got, other = _run_bounded(go, 60)
    assert other == 200, "another client was not served during the slowloris"
    assert sent < len(head), f"the whole trickled head was taken ({sent} bytes): {got[:80]!r}"
    assert not got.startswith(b"HTTP/1.1 200"), got[:200]


def _run_bounded(fn, seconds: float) -> Any:
    async def bounded() -> Any:
        with trio.fail_after(seconds):
            return await fn()
    return trio.run(bounded)


def test_a_body_that_stops_arriving_is_a_408(mesh):
    """Head and part of a body, then nothing: 408 (structured) after api.read_timeout, not a
    dropped connection or a 400 "client went away" (hypercorn's own read timeout, whole
    seconds, used to fire first)."""
    m = mesh
    data = request("POST", "/testsvc/Test.Echo", b'{"text": "never finished"}', m.bearer())
    resp = trio.run(one, m.port, data[:-10])
    assert resp is not None, "no answer to a stalled body"
    assert_error(resp, 408)
    assert_serves(m)


def test_a_kept_alive_connection_serves_on_after_a_slow_answer(mesh):
    """A request that takes longer than api.read_timeout (a service silent until the 504)
    does not poison its connection: the next request on it is answered."""
    m = mesh

    async def go() -> tuple[int, HttpResponse | None]:
        conn = await HttpConn.open(m.port)
        try:
            with trio.fail_after(BOUND):
                await conn.send(request("GET", "/lsilent/slow", headers=m.bearer()))
                first = await conn.response()
                assert first is not None
            await conn.send(request("GET", "/health"))
            with trio.move_on_after(BOUND):
                return first.status, await conn.response(allow_cut=True)
            return first.status, None
        finally:
            await conn.aclose()

    first, second = trio.run(go)
    assert first == 504
    assert second is not None and second.status == 200, "the next request was never answered"


# --- hostile HTTP services ------------------------------------------------------------------


@pytest.mark.parametrize("name,status", [("rsilent", 504), ("lsilent", 504),
                                         ("rendless", 502), ("rgarbage", 502)])
def test_a_hostile_http_service_is_a_502_or_504_and_let_go(mesh, name, status):
    m = mesh
    server = m.servers[name]
    before = server.connections
    resp = trio.run(one, m.port, request("GET", f"/{name}/x", headers=m.bearer()))
    assert resp is not None, f"no answer within {BOUND} s"
    assert_error(resp, status)
    eventually(lambda: server.connections > before and server.ended >= server.connections,
               f"the gateway's connection to {name} closed")
    assert_serves(m)


def test_a_service_trickling_its_response_head_is_a_504(mesh):
    m = mesh
    resp = trio.run(one, m.port, request("GET", "/ltrickle/x", headers=m.bearer()), 5 * TIMEOUT)
    assert resp is not None, "no answer while the service trickles its head"
    assert_error(resp, 504)




@pytest.mark.parametrize("name", ["lstream", "rstream"])
def test_a_client_leaving_a_streamed_answer_lets_go_of_the_service(mesh, name):
    """An HTTP service streams a body that never ends; the client reads the head and goes.
    The connection to the service must end, not stream into the void forever."""
    m = mesh
    server = m.servers[name]
    before = server.connections

    async def go() -> bytes:
        conn = await HttpConn.open(m.port)
        try:
            await conn.send(request("GET", f"/{name}/events", headers=m.bearer()))
            with trio.fail_after(BOUND):
                while b"hello" not in conn.buf:
                    assert await conn._fill(), "closed before the body"
            return bytes(conn.buf[:12])
        finally:
            await conn.aclose()

    assert trio.run(go).startswith(b"HTTP/1.1 200")
    eventually(lambda: server.connections > before and server.ended >= server.connections,
               f"the connection to {name} closed after the client left")
    assert_serves(m)


def test_a_websocket_to_a_silent_http_service_is_answered(mesh):
    m = mesh
    server = m.servers["lsilent"]
    before = server.connections
    status, body, closed = trio.run(ws_upgrade, m.port, "/lsilent/ws", m.bearer(), 5 * TIMEOUT)
    assert status in (502, 504), (status, body, closed)
    eventually(lambda: server.ended >= server.connections > before,
               "the gateway let go of the silent service")


def test_an_http_service_cannot_set_the_meshd_token_cookie(mesh):
    m = mesh
    resp = get(m, "/lcookie/x", m.bearer())
    assert resp.status == 200
    assert b"meshd_token" not in resp.headers.get(b"set-cookie", b""), resp.headers


def test_identity_headers_cannot_be_forged_with_underscores(mesh):
    m = mesh
    rec = m.servers["lrecord"]
    forged = "X-Meshd_Caller: admin\r\nX_Forwarded_For: 203.0.113.9\r\nX-Request_Id: forged\r\n"
    assert get(m, "/lrecord/underscore", m.bearer() + forged).status == 200
    seen = next(r for r in reversed(rec.requests) if r["target"] == "/underscore")
    names = [k.lower() for k, _ in seen["headers"]]
    assert names.count("x-meshd-caller") == 1
    assert not [n for n in names if "_" in n and n.replace("_", "-") in
                ("x-meshd-caller", "x-forwarded-for", "x-request-id")], names


def test_a_service_answer_with_conflicting_framing_is_a_502_or_reframed(mesh):
    m = mesh
    resp = trio.run(one, m.port, request("GET", "/lclte/x", headers=m.bearer()))
    assert resp is not None and not resp.cut, "no answer, or a cut one"
    assert resp.status == 502 or (resp.status == 200 and resp.body == b"hello"), (
        resp.status, resp.body)


def test_a_service_answering_100_continue_first_is_proxied(mesh):
    m = mesh
    resp = trio.run(one, m.port, request("POST", "/lcontinue/upload", b"x" * 2000,
                                         m.bearer() + "Expect: 100-continue\r\n",
                                         "application/octet-stream"))
    assert resp is not None and (resp.status, resp.body) == (200, b"ok"), (
        resp and (resp.status, resp.body))


def test_the_callers_token_never_reaches_an_http_service(mesh):
    m = mesh
    rec = m.servers["rrecord"]
    jar = f"Cookie: a=1; meshd_token={m.token}; b=2\r\n"
    assert get(m, "/rrecord/token-bearer", m.bearer() + jar).status == 200
    resp = trio.run(one, m.port, request("GET", "/rrecord/token-cookie",
                                         headers=f"Cookie: meshd_token={m.token}\r\n"))
    assert resp is not None and resp.status == 200
    for target in ("/token-bearer", "/token-cookie"):
        seen = next(r for r in reversed(rec.requests) if r["target"] == target)
        text = json.dumps(seen["headers"])
        assert m.token not in text and "meshd_token" not in text, seen["headers"]
        assert ("x-meshd-caller", "admin") in [(k.lower(), v) for k, v in seen["headers"]]


@pytest.mark.parametrize("node", ["c", "a"])
def test_an_http_service_off_loopback_is_never_connected_to(mesh, node):
    """Addresses that are not loopback are refused (403) where the service runs, for calls
    and WebSocket upgrades; 0.0.0.0 (which Linux connects to this host) included."""
    m = mesh
    sink = m.servers["lsink"]
    before = sink.connections
    for i, bad in enumerate(BAD_ADDRESSES):
        resp = get(m, f"/{node}bad{i}/latest/meta-data/", m.bearer())
        assert_error(resp, 403)
        assert "loopback" in json.loads(resp.body)["detail"], (bad, resp.body)
        if i == 0:
            status, _, _ = trio.run(ws_upgrade, m.port, f"/{node}bad{i}/ws", m.bearer(), 10)
            assert status != 101, bad
    assert sink.connections == before, "the gateway connected to a non-loopback address"


# --- acting as nobody -----------------------------------------------------------------------


@pytest.mark.parametrize("svc", ["localsvc", "testsvc"])
def test_anonymous_requests_are_refused_where_the_node_would_be_allowed(mesh, svc):
    """No public rule covers these; the node itself may do all of them (default-nodes).
    Without a token each is a 401, however it arrives: a call, /rpc, SSE, a WebSocket
    stream, an event, an HTTP service (local and remote)."""
    m = mesh
    assert post(m, f"/{svc}/Test.Caller", {"text": ""}, m.bearer()) == (200, {"text": "admin"})
    status, body = post(m, f"/{svc}/Test.Caller", {"text": ""})
    assert status == 401 and body["id"] == "meshd.auth", body
    status, body = post(m, "/rpc", {"service": svc, "endpoint": "Test.Echo",
                                    "request": {"text": "x"}})
    assert status == 401, body
    sse = get(m, f"/{svc}/Test.Count?n=2", "Accept: text/event-stream\r\n")
    assert_error(sse, 401)
    status, body, _ = trio.run(ws_upgrade, m.port, f"/{svc}/Test.Upper")
    assert status == 401, (status, body)
    status, body = post(m, "/events/gwatk.anon", {"n": 1})
    assert status == 401, body
    assert_error(get(m, f"/{svc}/Test.Caller?text=", "Cookie: meshd_token=\r\n"), 401)
    for name in ("lrecord", "rrecord"):
        rec = m.servers[name]
        before = rec.connections
        assert_error(get(m, f"/{name}/anon"), 401)
        assert rec.connections == before, f"{name} was reached without a token"
    doc = json.loads(get(m, "/openapi.json").body)
    assert not [p for p in doc["paths"] if p.startswith((f"/{svc}/", "/lrecord/"))]
    assert "/pubsvc/Test.Caller" in doc["paths"] and "/pubweb/{path}" in doc["paths"]


def test_public_requests_act_as_anonymous_never_as_the_node(mesh):
    """Where a public rule grants it, a request without a token runs as "anonymous": the
    service sees that caller, an event carries that publisher, streams work."""
    m = mesh
    assert post(m, "/pubsvc/Test.Caller", {"text": ""}) == (200, {"text": "anonymous"})
    sse = get(m, "/pubsvc/Test.Count?n=2", "Accept: text/event-stream\r\n")
    assert sse.status == 200 and sse.headers[b"content-type"] == b"text/event-stream"
    events = [json.loads(line[6:]) for line in sse.body.decode().splitlines()
              if line.startswith("data: ")]
    assert events == [{"text": "0"}, {"text": "1"}]
    rec = m.servers["pubweb"]
    assert get(m, "/pubweb/who").status == 200
    seen = next(r for r in reversed(rec.requests) if r["target"] == "/who")
    assert ("x-meshd-caller", "anonymous") in [(k.lower(), v) for k, v in seen["headers"]]

    async def go() -> tuple[list[str], str]:
        async with trio_websocket.open_websocket_url(
                m.url.replace("http", "ws") + "/pubsvc/Test.Upper") as ws:
            await ws.send_message(json.dumps({"text": "pub"}))
            upper = json.loads(await ws.get_message())["text"]
        async with Client(sock(m.c)) as client, client.subscribe("gwatk.public") as sub:
            resp = await one(m.port, request("POST", "/events/gwatk.public", b'{"n": 1}'))
            assert resp is not None and resp.status == 202, resp and resp.body
            with trio.fail_after(BOUND):
                msg = await sub.receive()
        return [upper], msg.publisher

    with_ws, publisher = trio.run(go)
    assert with_ws == ["PUB"]
    assert publisher == "anonymous", publisher


def test_an_anonymous_websocket_to_an_http_service_is_a_401(mesh):
    m = mesh
    status, body, _ = trio.run(ws_upgrade, m.port, "/lrecord/ws", "", 10)
    assert status == 401, (status, body)


def test_an_anonymous_websocket_never_reaches_an_http_service(mesh):
    m = mesh
    for name in ("lrecord", "rrecord"):
        rec = m.servers[name]
        before = rec.connections
        status, _, _ = trio.run(ws_upgrade, m.port, f"/{name}/ws", "", 10)
        assert status != 101
        assert rec.connections == before, f"{name} was reached by an anonymous WebSocket"


def test_a_404_names_no_endpoints_to_a_caller_who_may_not_list_services(mesh):
    m = mesh
    for path in ("/localsvc", "/localsvc/nope", "/localsvc/Test.Nope"):
        body = assert_error(get(m, path), 404)
        # the detail may echo the name asked for, never the service's own endpoints
        assert body.get("near", []) == [] and "Test.Echo" not in body["detail"], body


# --- browsers: CORS, cookies, WebSocket origins ---------------------------------------------


def test_a_cross_site_websocket_with_the_cookie_is_refused(mesh):
    m = mesh
    headers = f"Origin: https://evil.example\r\nCookie: meshd_token={m.token}\r\n"
    status, body, _ = trio.run(ws_upgrade, m.port, "/localsvc/Test.Upper", headers)
    assert status == 403, (status, body)


def test_a_cross_site_form_post_with_the_cookie_is_refused(mesh):
    m = mesh
    headers = f"Origin: https://evil.example\r\nCookie: meshd_token={m.token}\r\n"
    resp = trio.run(one, m.port, request("POST", "/localsvc/Test.Caller", b"text=x", headers,
                                         "application/x-www-form-urlencoded"))
    assert resp is not None
    assert_error(resp, 403)


def test_cors_never_reflects_an_unlisted_origin(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        port = free_port()
        d = cluster.add("g", env={"MESHD_API_LISTEN": f"127.0.0.1:{port}",
                                  "MESHD_API_CORS_ORIGINS": "https://app.example"})
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 10,
                 "the gateway listening")

        def cors(origin: str, preflight: bool) -> HttpResponse:
            extra = f"Origin: {origin}\r\n"
            method = "GET"
            if preflight:
                method = "OPTIONS"
                extra += "Access-Control-Request-Method: POST\r\n"
            resp = trio.run(one, port, request(method, "/health", headers=extra))
            assert resp is not None
            return resp

        for origin in ("https://evil.example", "https://app.example.evil.example",
                       "https://evil.app.example", "http://app.example", "null",
                       "https://app.example:443", "HTTPS://APP.EXAMPLE", "https://app.exampl",
                       "https://app.example\tx"):
            for preflight in (False, True):
                resp = cors(origin, preflight)
                assert b"access-control-allow-origin" not in resp.headers, (origin, resp.headers)
                assert b"access-control-allow-credentials" not in resp.headers
                if preflight:
                    assert_error(resp, 403)
        resp = cors("https://app.example", False)
        assert resp.headers[b"access-control-allow-origin"] == b"https://app.example"
        assert resp.headers[b"vary"] == b"Origin"
        status, _, _ = trio.run(ws_upgrade, port, "/health",
                                "Origin: https://evil.example\r\n", 10)
        assert status == 403
        d.assert_running()
    finally:
        cluster.close()


# --- WebSocket abuse --------------------------------------------------------------------------


def test_a_websocket_message_over_the_limit_ends_that_socket_only(mesh):
    m = mesh
    auth = [(b"authorization", f"Bearer {m.token}".encode())]
    url = m.url.replace("http", "ws")

    async def go() -> tuple[int | None, int | None, list[str]]:
        async with trio_websocket.open_websocket_url(url + "/localsvc/Test.Upper",
                                                     extra_headers=auth) as calm:
            await calm.send_message(json.dumps({"text": "before"}))
            got = [json.loads(await calm.get_message())["text"]]
            codes: list[int | None] = []
            for payload in (json.dumps({"text": "x" * (MAX_BODY + 1)}), b"\x00binary"):
                async with trio_websocket.open_websocket_url(
                        url + "/localsvc/Test.Upper", extra_headers=auth) as hostile:
                    await hostile.send_message(payload)
                    with trio.fail_after(BOUND):
                        try:
                            while True:
                                await hostile.get_message()
                        except trio_websocket.ConnectionClosed as exc:
                            codes.append(exc.reason.code)
            await calm.send_message(json.dumps({"text": "after"}))
            got.append(json.loads(await calm.get_message())["text"])
        return codes[0], codes[1], got

    too_big, binary, got = trio.run(go)
    assert too_big == 1009, too_big
    assert binary == 1003, binary
    assert got == ["BEFORE", "AFTER"]
    assert_serves(m)


# --- paths, namespaces, logs ---------------------------------------------------------------


def test_path_tricks_never_reach_another_service(mesh):
    """Only pubweb is public. Encoded slashes, dot segments, empty segments, control
    characters and version prefixes never carry an anonymous request to lrecord (no public
    rule) and never crash the gateway."""
    m = mesh
    rec, pub = m.servers["lrecord"], m.servers["pubweb"]
    before = rec.connections
    paths = ["/pubweb/..%2Flrecord%2Fx", "/pubweb%2F..%2Flrecord/x", "/pubweb/../lrecord/x",
             "//pubweb//..//lrecord/x", "/./lrecord/x", "/pubweb/%2e%2e/%2e%2e/lrecord/x",
             "/v1/pubweb/../../lrecord/x", "/lrecord%00/x", "/pubweb/%0d%0aX-Injected:%201",
             "/pubweb/x%20HTTP/1.1%0d%0aHost:%20evil", "/" + "/".join(["a"] * 17),
             "/lrecord%2Fx", "/%6crecord/x", "/events/../lrecord/x", "/rpc/../lrecord/x"]
    for path in paths:
        resp = get(m, path)
        assert resp.status in (200, 400, 401, 404, 405), (path, resp.status, resp.body[:200])
        if resp.status >= 400:
            assert json.loads(resp.body)["status"] == resp.status
    assert rec.connections == before, "an anonymous path trick reached lrecord"
    for r in pub.requests:  # what pubweb got is still percent-encoded, one request a line
        assert "\r" not in r["target"] and "\n" not in r["target"], r
        assert not [k for k, _ in r["headers"] if k.lower() == "x-injected"], r
    assert_serves(m)


def test_namespace_headers_are_checked(mesh):
    m = mesh
    for bad in ("../default", "DEFAULT", "a" * 64, "x y", "default/x", "*"):
        resp = get(m, "/localsvc/Test.Echo?text=x", f"X-Meshd-Namespace: {bad}\r\n"
                   + m.bearer())
        assert_error(resp, 400)
        status, _, _ = trio.run(ws_upgrade, m.port, "/localsvc/Test.Upper",
                                f"X-Meshd-Namespace: {bad}\r\n" + m.bearer())
        assert status == 400, (bad, status)
    # another namespace: nothing of default's is there, for nobody or the admin alike
    assert_error(get(m, "/localsvc/Test.Echo?text=x", "X-Meshd-Namespace: other\r\n"), 404)
    doc = json.loads(get(m, "/openapi.json", "X-Meshd-Namespace: other\r\n").body)
    assert not [p for p in doc["paths"] if p.startswith(("/localsvc", "/pubsvc", "/testsvc"))]


def test_the_access_log_cannot_be_forged_through_the_path(mesh):
    m = mesh
    assert get(m, "/gwatk%0Aapi%20POST%20/forged%20status=200").status == 404
    wait_for(lambda: "gwatk" in m.c.log.read_text(), 10, "the access log line")
    forged = [line for line in m.c.log.read_text().splitlines()
              if line.startswith("api POST /forged")]
    assert not forged, forged

"""Issue 11, the listener part of the attack suite, against a real node (loopback): reset
WebSocket upgrades, hostile first messages, slow clients, idle-connection floods under
`ulimit -n 256`. After each attack the node still answers `status`, serves a call through
its proxy endpoint and admits new members (over TCP and over its WebSocket listener), and
its log holds no traceback.

The attacked node runs with limits.handshake_timeout = 2 s: links must finish their
handshake within 2 s and proxy clients send their first message within 4 s (the pending
deadline), so the slow clients are cut off quickly. The rogue-member attacks (items 7 and 8)
live elsewhere.

The default suite runs the counts the issue names (200 resets per WebSocket listener, 400
idle connections per listener); `-m soak` runs ten times more, several flood rounds, and
waits out the longer guards (a reply nobody reads, a silent control connection).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
import trio

from meshd.control import FIRST_REQUEST, ControlClient
from meshd.identity import Identity
from meshd.proxy.edge import MAX_MESSAGE
from meshd.secure.handshake import Initiator
from meshd.secure.keyring import Keyring, parse_secret
from meshd.transport.links import _plain

from .attacks import (
    CLOSE,
    Raw,
    cbor_map,
    nested_cbor,
    nested_token,
    open_idle,
    parse_server_frames,
    raw_ws,
    reset,
    reset_upgrades,
    silent_client,
    slow_send,
    upgrade_request,
    ws_exchange,
    ws_raw_frame,
)
from .cluster import Cluster, Daemon, control, wait_for
from .test_fuzz_proxy import (
    admin_token,
    check_ws_reply,
    http_post,
    proxy_call,
    traceback_lines,
)
from .test_tunnel import free_port

LIMITED = ["bash", "-c", 'ulimit -n 256 && exec "$@"', "limited"]
HANDSHAKE = 2  # limits.handshake_timeout of the attacked node (the proxy's deadline: 4 s)
RESETS = 200  # reset upgrades per WebSocket listener
IDLE = 400  # idle connections per listener
SLOW = 0.5  # seconds between two bytes of a slow client
GUARD = 30.0  # seconds any one attack may take before it counts as a hang


@dataclass
class Target:
    node: Daemon
    proxy_port: int
    ws_port: int
    link_port: int
    token: str

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"


def start_target(cluster: Cluster, limited: bool = False, api_port: int = 0) -> Target:
    proxy_port, ws_port = free_port(), free_port()
    api = ("--api-listen", f"127.0.0.1:{api_port}") if api_port else ()
    a = cluster.add("a", prefix=LIMITED if limited else None,
                    extra=("--proxy-listen", f"127.0.0.1:{proxy_port}",
                           "--ws-listen", f"127.0.0.1:{ws_port}", *api),
                    env={"MESHD_LIMITS_HANDSHAKE_TIMEOUT": str(HANDSHAKE)})
    cluster.service(a)
    wait_for(lambda: len(control(a.data_dir, "services")) >= 1, 10, "the test service")
    return Target(a, proxy_port, ws_port, int(a.addr.rsplit(":", 1)[1]), admin_token(a))


def admit(cluster: Cluster, t: Target, name: str) -> None:
    """A new member joins over TCP (`name`) and another over the WebSocket listener
    (`name`-ws); both show alive on the attacked node."""
    cluster.add(name, join=[t.node.addr])
    cluster.add(f"{name}-ws", join=[t.ws_url])
    wait_for(lambda: t.node.status_of(name) == "alive"
             and t.node.status_of(f"{name}-ws") == "alive", 20, f"{name} admitted")


def still_serves(cluster: Cluster, t: Target, member: str) -> None:
    assert t.node.proc.poll() is None, "the node died"
    assert control(t.node.data_dir, "status")["name"] == "a"
    assert trio.run(proxy_call, t.proxy_port, t.token, member) == [
        {"ok": True, "body": {"text": member}}]
    admit(cluster, t, member)


def traceback_blocks(log: str) -> list[list[str]]:
    """Each traceback in a log: its lines, from "Traceback" to the exception line."""
    blocks, current = [], []
    for line in log.splitlines():
        if line.startswith("Traceback") or current:
            current.append(line)
            if not line.startswith((" ", "Traceback")):
                blocks.append(current)
                current = []
    return blocks


def reset_before_101(block: list[str]) -> bool:
    """The traceback the node logs when a client resets its connection before the
    WebSocket upgrade is answered (a finding: see test_reset_before_the_101_is_not_logged_
    as_a_handler_failure)."""
    return block[-1].startswith("trio_websocket._impl.ConnectionClosed") and any(
        "ws = await request.accept()" in line for line in block)


def log_is_clean(d: Daemon, resets: bool = False) -> None:
    """No traceback in the node's log; with `resets`, but for the known one above."""
    log = d.log.read_text()
    blocks = traceback_blocks(log)
    if resets:
        blocks = [b for b in blocks if not reset_before_101(b)]
    assert blocks == [] and (resets or traceback_lines(log) == []), log[-4000:]


def request(t: Target, text: str = "x", **extra: Any) -> dict[str, Any]:
    return {"op": "call", "token": t.token, "service": "testsvc", "endpoint": "Test.Echo",
            "body": {"text": text}, **extra}


# --- (a) reset upgrades --------------------------------------------------------------------


def reset_mid_message(port: int, count: int, message: bytes) -> None:
    """Upgrade, send part of a first message, reset the connection."""
    for i in range(count):
        s = raw_ws(port)
        try:
            frame = ws_raw_frame(2, message)
            s.sendall(frame[:1 + i % (len(frame) - 1)])
        finally:
            reset(s)


def run_resets(cluster: Cluster, count: int) -> None:
    t = start_target(cluster)
    hello = link_hello(cluster)
    for port, first in ((t.proxy_port, cbor2.dumps(request(t))), (t.ws_port, hello)):
        reset_upgrades(port, count)
        reset_mid_message(port, count // 2, first)
    assert t.node.proc.poll() is None
    stats = control(t.node.data_dir, "status")["stats"]
    assert stats["proxy_accepted"] >= count + count // 2
    assert stats["link_ws_accepted"] >= count + count // 2
    still_serves(cluster, t, "b")
    log_is_clean(t.node, resets=True)


def test_reset_upgrades_on_each_websocket_listener(cluster):
    run_resets(cluster, RESETS)


def test_reset_before_the_101_is_not_logged_as_a_handler_failure(cluster):
    t = start_target(cluster)
    for port in (t.proxy_port, t.ws_port):
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(upgrade_request(port))
            reset(s)
    time.sleep(0.5)
    assert control(t.node.data_dir, "status")["name"] == "a"
    log = t.node.log.read_text()
    assert "connection handler failed" not in log, log[-3000:]
    assert traceback_lines(log) == []


# --- (b) hostile first messages ------------------------------------------------------------


def error_status(out) -> int | None:
    replies = out.replies()
    assert len(replies) <= 1, replies
    if not replies:
        return None
    check_ws_reply(replies[0])
    return replies[0]["error"]["status"] if replies[0]["ok"] is False else 200


async def hostile_first_messages(t: Target) -> dict[str, Any]:
    """Each hostile first message, alone on its connection; what came back, by name."""
    bad = Raw(nested_cbor(10_000, "array"))
    req = request(t)
    cases: dict[str, list[bytes]] = {
        "nested-array-10000": [ws_raw_frame(2, nested_cbor(10_000, "array"))],
        "nested-map-10000": [ws_raw_frame(2, nested_cbor(10_000, "map"))],
        "nested-tags-10000": [ws_raw_frame(2, nested_cbor(10_000, "tag"))],
        "nested-body-10000": [ws_raw_frame(2, cbor_map(
            [(k, v) for k, v in req.items() if k != "body"] + [("body", bad)]))],
        "nested-meta-10000": [ws_raw_frame(2, cbor_map([*req.items(), ("meta", bad)]))],
        "nested-json-footer": [ws_raw_frame(2, cbor2.dumps(
            {**req, "token": nested_token(100_000)}))],
        "nested-json-footer-objects": [ws_raw_frame(2, cbor2.dumps(
            {**req, "token": "v4.public.A." + _b64(b'{"a":' * 50_000)}))],
        "length-2^63": [ws_raw_frame(2, b"\x00" * 16, length=(1 << 63) + 16, encoding=64)],
        "text-json": [ws_raw_frame(1, b'{"op": "call", "token": "x"}')],
        "text-cbor-as-utf8": [ws_raw_frame(1, cbor2.dumps(req).decode("latin-1").encode())],
        "over-2MiB": [ws_raw_frame(2, cbor2.dumps({**req, "pad": b"x" * MAX_MESSAGE}))],
        "exactly-2MiB": [ws_raw_frame(2, _padded(req, MAX_MESSAGE))],
    }
    wrong: list[tuple[str, Any]] = [
        ("op", 5), ("op", None), ("op", ["call"]), ("op", "CALL"), ("token", 5),
        ("token", b"bytes"), ("token", ["x"]), ("token", {"t": 1}), ("token", ""),
        ("service", 5), ("service", None), ("endpoint", ["Test.Echo"]), ("endpoint", 1.5),
        ("timeout", "10"), ("timeout", float("nan")), ("timeout", float("inf")),
        ("timeout", -1), ("timeout", 10**30), ("timeout", [1]), ("timeout", 3601),
        ("body", cbor2.CBORTag(36, "text/plain\n\nhi")), ("body", cbor2.CBORTag(258, [1])),
        ("body", cbor2.CBORTag(55799, {"text": "x"})), ("meta", [1, 2]), ("meta", "m"),
        ("meta", {"trace-id": ["x"]}), ("name", 5),
    ]
    for key, value in wrong:
        base = {"op": "tunnel", "token": t.token} if key == "name" else req
        cases[f"wrong-{key}-{value!r:.30}"] = [ws_raw_frame(2, cbor2.dumps({**base, key: value}))]
    for top in ([req], 5, "call", None, b"\xa1"):
        cases[f"top-{top!r:.20}"] = [ws_raw_frame(2, cbor2.dumps(top))]
    results: dict[str, Any] = {}

    async def one(name: str, sends: list[bytes]) -> None:
        results[name] = await ws_exchange(t.proxy_port, sends, timeout=GUARD)

    async def held_2gb() -> None:
        # a frame header claiming 2 GB, a few bytes of it, then nothing: the node answers
        # 408 at the pending deadline, serving others meanwhile
        frame = ws_raw_frame(2, b"\x00" * 32, length=2**31, encoding=64)
        results["length-2GB"] = await ws_exchange(t.proxy_port, [frame], timeout=GUARD)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(held_2gb)
        await trio.sleep(0.5)
        for name, sends in cases.items():  # one after the other, while the 2 GB one waits
            await one(name, sends)
        results["meanwhile"] = await proxy_call(t.proxy_port, t.token, "meanwhile")
    return results


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _padded(req: dict[str, Any], size: int) -> bytes:
    """`req` with padding in its body making its encoding exactly `size` bytes."""

    def encode(n: int) -> bytes:
        return cbor2.dumps({**req, "body": {"text": "x", "pad": b"x" * n}})

    n = size - len(encode(0)) - 8
    data = encode(n + size - len(encode(n)))
    assert len(data) == size
    return data


def test_hostile_first_messages_on_the_proxy(cluster):
    t = start_target(cluster)
    out = trio.run(hostile_first_messages, t)
    assert out.pop("meanwhile") == [{"ok": True, "body": {"text": "meanwhile"}}]
    status = {name: error_status(o) for name, o in out.items()}
    expected = {
        "nested-array-10000": 400, "nested-map-10000": 400, "nested-tags-10000": 400,
        "nested-body-10000": 400, "nested-meta-10000": 400,
        "nested-json-footer": 401, "nested-json-footer-objects": 401,
        "length-2^63": None,  # a protocol error: closed without a reply
        "length-2GB": 408,
        "text-json": 400, "text-cbor-as-utf8": 400,
        "over-2MiB": None,  # over the message limit: closed (1009) without a reply
        "exactly-2MiB": 400,  # decoded, then refused: over rpc.max_body_bytes
    }
    for name, want in expected.items():
        assert status[name] == want, (name, status[name], out[name].replies())
    assert out["over-2MiB"].close_code == 1009
    for name, got in status.items():
        if name.startswith("wrong-meta"):
            assert got == 200, (name, out[name].replies())  # meta that is not a map: ignored
        elif name.startswith("wrong-token"):
            assert got == 401, (name, out[name].replies())
        elif name.startswith(("wrong-", "top-")):
            assert got == 400, (name, out[name].replies())
    still_serves(cluster, t, "b")
    log_is_clean(t.node)


# --- (c) slow clients ----------------------------------------------------------------------


def link_hello(cluster: Cluster) -> bytes:
    """A link handshake's first message, as a member dialing the node would send it."""
    init = Initiator(Identity.generate(), Keyring([parse_secret(cluster.secret)]),
                     "127.0.0.1:9")
    return _plain(init.hello())


async def slow_clients(cluster: Cluster, t: Target, unread_hold: float) -> dict[str, Any]:
    """Slow clients on every listener at once, and the node's service meanwhile."""
    hello = link_hello(cluster)
    upgrade_proxy, upgrade_ws = upgrade_request(t.proxy_port), upgrade_request(t.ws_port)
    out: dict[str, Any] = {}

    async def guarded(name: str, fn: Any, *args: Any) -> None:
        with trio.fail_after(GUARD + unread_hold):
            out[name] = await fn(*args)

    async def never_reads() -> tuple[bytes, bool]:
        """Ask for a 1 MB echo through a socket with a tiny receive buffer, then do not
        read: the node must keep serving others. Read it all in the end."""
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", t.proxy_port))
        stream = trio.SocketStream(sock)
        try:
            await stream.send_all(upgrade_proxy)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(1)
            await stream.send_all(ws_raw_frame(2, cbor2.dumps(request(t, "y" * 1_000_000))))
            await trio.sleep(unread_hold)
            data, closed = b"", False
            while True:
                try:
                    chunk = await stream.receive_some(1 << 20)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                data += chunk
                frames, _ = parse_server_frames(data)
                if frames and frames[0][0] == 2:
                    break
            return data, closed
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def meanwhile() -> None:
        await trio.sleep(HANDSHAKE / 2)  # every slow client is connected and pending
        client = ControlClient(t.node.data_dir / "meshd.sock")
        try:
            out["status"] = (await client.call("status"))["name"]
        finally:
            await client.aclose()
        out["call"] = await proxy_call(t.proxy_port, t.token, "meanwhile")
        await trio.to_thread.run_sync(admit, cluster, t, "b")
        out["admitted"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded, "proxy-slow-upgrade", slow_send, t.proxy_port,
                           upgrade_proxy, SLOW)
        nursery.start_soon(guarded, "ws-slow-upgrade", slow_send, t.ws_port, upgrade_ws, SLOW)
        nursery.start_soon(guarded, "proxy-silent", silent_client, t.proxy_port, upgrade_proxy)
        nursery.start_soon(guarded, "proxy-slow-message", slow_send, t.proxy_port,
                           ws_raw_frame(2, cbor2.dumps(request(t))), SLOW, upgrade_proxy)
        # silent after the upgrade, but answers the close frame (one that does not: see
        # test_silent_websocket_link_clients_do_not_lock_out_the_listener)
        nursery.start_soon(guarded, "ws-silent", ws_exchange, t.ws_port, [], GUARD)
        nursery.start_soon(guarded, "link-silent", silent_client, t.link_port)
        nursery.start_soon(guarded, "link-half-hello", silent_client, t.link_port,
                           hello[:len(hello) // 2])
        nursery.start_soon(guarded, "link-slow-hello", slow_send, t.link_port, hello, SLOW)
        nursery.start_soon(guarded, "link-hello-no-confirm", silent_client, t.link_port, hello)
        nursery.start_soon(guarded, "proxy-never-reads", never_reads)
        nursery.start_soon(meanwhile)
    return out


def _ws_messages(data: bytes) -> list[tuple[int, bytes]]:
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), data[:200]
    frames, _ = parse_server_frames(rest)
    return [(op, payload) for op, _, payload in frames]


def run_slow_clients(cluster: Cluster, unread_hold: float) -> dict[str, Any]:
    t = start_target(cluster)
    out = trio.run(slow_clients, cluster, t, unread_hold)
    assert out["status"] == "a" and out["admitted"]
    assert out["call"] == [{"ok": True, "body": {"text": "meanwhile"}}]
    # the slow senders were cut off long before they were done
    for name, data in (("proxy-slow-upgrade", upgrade_request(t.proxy_port)),
                       ("ws-slow-upgrade", upgrade_request(t.ws_port))):
        sent, got = out[name]
        assert sent < len(data), (name, sent)
        assert b" 101 " not in got.split(b"\r\n", 1)[0], (name, got[:200])
    sent, got = out["proxy-slow-message"]
    assert sent < len(ws_raw_frame(2, cbor2.dumps(request(t)))), sent
    assert [cbor2.loads(p)["error"]["status"] for op, p in _ws_messages(got) if op == 2] == [408]
    # the silent proxy client is told why (408) before the node closes
    messages = _ws_messages(out["proxy-silent"])
    assert messages and messages[0][0] == 2, messages
    assert cbor2.loads(messages[0][1])["error"]["status"] == 408
    assert all(op == CLOSE for op, _ in messages[1:]), messages
    # the WebSocket link listener closes a silent upgraded client (no link handshake)
    assert out["ws-silent"].messages == [] and out["ws-silent"].close_code is not None
    # the link port closes a silent client and a half handshake without a word
    assert out["link-silent"] == b""
    assert out["link-half-hello"] == b""
    sent, got = out["link-slow-hello"]
    assert sent < len(link_hello(cluster)) and got == b""
    # a full hello gets the welcome; with no confirm after it, the node closes
    welcome = out["link-hello-no-confirm"]
    (n,) = struct.unpack(">I", welcome[:4])
    assert len(welcome) == 4 + n, welcome[:64]
    still_serves(cluster, t, "c")
    log_is_clean(t.node)
    return out


def test_slow_clients_are_cut_off_by_the_pending_deadline(cluster):
    out = run_slow_clients(cluster, unread_hold=HANDSHAKE * 2)
    # the reply nobody read while the rest went on arrives whole once it is read
    data, _ = out["proxy-never-reads"]
    (opcode, _, payload), *_ = parse_server_frames(data)[0]
    assert opcode == 2 and cbor2.loads(payload) == {"ok": True,
                                                    "body": {"text": "y" * 1_000_000}}


def test_silent_websocket_link_clients_do_not_lock_out_the_listener(cluster):
    t = start_target(cluster, limited=True)
    held = []
    try:
        for _ in range(3):  # batches under the pending cap (32): none is evicted
            for _ in range(30):
                with contextlib.suppress(OSError):
                    held.append(raw_ws(t.ws_port))
            time.sleep(HANDSHAKE + 1)  # every one of them is past its deadline
        # AssertionError: b cannot join (its join gives up after 1 s instead of 5)
        cluster.add("b", join=[t.ws_url], env={"MESHD_LIMITS_JOIN_TIMEOUT": "1"})
        wait_for(lambda: t.node.status_of("b") == "alive", 20, "b admitted over WebSocket")
    finally:
        for s in held:
            s.close()


# --- (d) idle connections under ulimit -n 256 ----------------------------------------------


def fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


@contextlib.contextmanager
def enough_descriptors(needed: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the test needs {needed} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def http_proxy_serves(port: int, token: str) -> bool:
    """The node's API gateway answers a call."""
    try:
        return trio.run(http_post, port, "/testsvc/Test.Echo", b'{"text": "h"}', token,
                        10.0) == (200, {"text": "h"})
    except (trio.TooSlowError, AssertionError):
        return False


def run_floods(cluster: Cluster, count: int, rounds: int) -> None:
    api_port = free_port()
    t = start_target(cluster, limited=True, api_port=api_port)
    node_fds = fds(t.node)
    try:
        for r in range(rounds):
            held: list[socket.socket] = []
            try:
                opened = {}
                for name, target in (("link", t.link_port), ("proxy", t.proxy_port),
                                     ("ws", t.ws_port),
                                     ("control", str(t.node.data_dir / "meshd.sock")),
                                     ("api", api_port)):
                    socks, _ = open_idle(target, count, give_up_after=5)
                    held += socks
                    opened[name] = len(socks)
                # the node's own listeners took every connection (and shed the idle ones)
                assert all(opened[n] == count for n in ("link", "proxy", "ws", "control",
                                                        "api")), opened
                # while they are held
                assert t.node.proc.poll() is None and fds(t.node) < 256
                assert control(t.node.data_dir, "status")["name"] == "a"
                assert trio.run(proxy_call, t.proxy_port, t.token, f"held {r}") == [
                    {"ok": True, "body": {"text": f"held {r}"}}]
                admit(cluster, t, f"b{r}")
                # the gateway sheds idle connections after its keep-alive timeout
                wait_for(lambda: http_proxy_serves(api_port, t.token), 30,
                         "the API gateway serving while flooded")
            finally:
                for s in held:
                    s.close()
            # after: the descriptors come back (but for the links to the new members),
            # and everything works again
            limit = node_fds + 3 * (4 * r + 2) + 8  # 4 members a round, 2 so far in this one
            wait_for(lambda: fds(t.node) <= limit, 20,  # noqa: B023 - used at once
                     "the node's descriptors back")
            assert control(t.node.data_dir, "status")["name"] == "a"
            assert http_proxy_serves(api_port, t.token)
            still_serves(cluster, t, f"c{r}")
        stats = control(t.node.data_dir, "status")["stats"]
        for listener in ("link_tcp", "proxy", "link_ws", "control", "api"):
            shed = stats[f"{listener}_evicted"] + stats[f"{listener}_refused_cap"] + \
                stats[f"{listener}_refused_source"]
            assert shed >= (count - 85) * rounds, (listener, stats)
    finally:
        log_is_clean(t.node)


def test_idle_connection_floods_under_ulimit_256(cluster):
    with enough_descriptors(6 * IDLE + 200):
        run_floods(cluster, IDLE, rounds=1)


# --- soak: ten times the counts, repeated floods, the longer guards waited out -------------


@pytest.mark.soak
def test_soak_reset_upgrades(cluster):
    run_resets(cluster, RESETS * 10)


@pytest.mark.soak
def test_soak_idle_connection_floods(cluster):
    with enough_descriptors(6 * IDLE * 5 + 200):
        run_floods(cluster, IDLE * 5, rounds=3)


@pytest.mark.soak
def test_soak_slow_clients_and_a_reply_nobody_reads(cluster):
    """The reply nobody reads is dropped by the proxy's send guard (30 s) while the node
    keeps serving everyone else."""
    out = run_slow_clients(cluster, unread_hold=40)
    data, closed = out["proxy-never-reads"]
    assert closed, "the node still holds a reply nobody reads"
    frames, rest = parse_server_frames(data)
    assert not any(op == 2 for op, _, _ in frames) and rest, "the reply was not cut"


@pytest.mark.soak
def test_soak_silent_control_connections_are_closed(cluster):
    """Idle control connections are closed after FIRST_REQUEST seconds; the operator's
    requests go through meanwhile."""
    t = start_target(cluster)
    path = str(t.node.data_dir / "meshd.sock")
    socks, failed = open_idle(path, 50)
    try:
        assert failed == 0
        assert control(t.node.data_dir, "status")["name"] == "a"
        time.sleep(FIRST_REQUEST + 2)
        for s in socks:
            s.settimeout(5)
            assert s.recv(1) == b"", "an idle control connection was left open"
    finally:
        for s in socks:
            s.close()
    still_serves(cluster, t, "b")
    log_is_clean(t.node)

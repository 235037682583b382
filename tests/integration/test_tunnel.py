"""Tunnels: expose a TCP server on one node, reach it from another, checked by the rules."""

from __future__ import annotations

import calendar
import errno
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from meshd.errors import MeshError

from .cluster import Lines, LoopbackServer, control, wait_for


class EchoServer(LoopbackServer):
    """A loopback TCP server that echoes until EOF, then closes; counts what it echoed."""

    def __init__(self) -> None:
        self.echoed = 0
        self._lock = threading.Lock()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                with self._lock:
                    self.echoed += len(data)


class DigestServer(LoopbackServer):
    """Reads until EOF, then answers "<bytes> <sha256>" and closes: the bytes each way differ,
    so an audit record's in and out counts can be told apart."""

    def handle(self, conn: socket.socket) -> None:
        with conn:
            digest, n = hashlib.sha256(), 0
            while data := conn.recv(65536):
                digest.update(data)
                n += len(data)
            conn.sendall(f"{n} {digest.hexdigest()}".encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through(port: int, payload: bytes, timeout: float = 60, *, refused: bool = False) -> bytes:
    """Send `payload` into the tunnel listening on `port`, half-close, and return everything
    that comes back until the far end closes. Any socket error fails the test, unless the
    test expects a refusal (`refused=True`, or `refused(port)`): then a connection closed
    (EOF, or a reset while our bytes were unread) with nothing back returns b"", and
    anything that did come back is returned for the test to see."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got = bytearray()
        errors: list[OSError] = []

        def reader() -> None:
            try:
                while chunk := s.recv(65536):
                    got.extend(chunk)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)
        t.join(timeout)
        if t.is_alive():
            raise AssertionError(f"no end of data within {timeout} s ({len(got)} bytes back)")
    if errors and not (refused and all(_closed_on_us(e) for e in errors)):
        raise errors[0]
    return bytes(got)


def _closed_on_us(exc: OSError) -> bool:
    """The far end closed (a reset while our bytes were unread, so sending or shutting
    down our side fails too)."""
    return isinstance(exc, BrokenPipeError | ConnectionResetError) or \
        exc.errno == errno.ENOTCONN


def refused(port: int, payload: bytes = b"hello") -> None:
    """Connect to the tunnel listening on `port` expecting a refusal: the connection must
    close without a byte coming back. (Check the reason where the refusal is reported.)"""
    back = through(port, payload, timeout=20, refused=True)
    assert back == b"", f"the tunnel was to refuse, yet answered {back!r}"


def start_connect(daemon, name, port, token=None):
    cmd = [sys.executable, "-m", "meshd_cli"]
    if token:
        cmd += ["--token", token]
    cmd += ["tunnel", "connect", name, "--listen", f"127.0.0.1:{port}", "--data-dir",
            str(daemon.data_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line
    return proc


SESSION = re.compile(r"tunnel session name=(\S+) caller=(\S+) from_node=(\S+) started=(\S+) "
                     r"bytes_in=(\d+) bytes_out=(\d+) seconds=([\d.]+)")


def sessions(daemon, name: str) -> list[dict[str, str]]:
    """The audit records of tunnel `name` in the daemon's log."""
    keys = ("name", "caller", "from_node", "started", "bytes_in", "bytes_out", "seconds")
    return [dict(zip(keys, m, strict=True)) for m in SESSION.findall(daemon.log.read_text())
            if m[0] == name]


def in_threads(*calls):
    """Run the calls at once, each on a thread; their results in order (a failure in any
    is raised here, not lost on its thread)."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True)
               for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a call did not finish within 120 s"
    return results


def test_tunnel_carries_a_checksummed_stream_and_obeys_the_rules(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    echo = EchoServer()
    control(a.data_dir, "tunnel.expose", name="echo", to=f"127.0.0.1:{echo.port}")
    wait_for(lambda: control(b.data_dir, "tunnel.list") != [], 10, "tunnel visible on b")
    assert control(b.data_dir, "tunnel.list") == [
        {"name": "echo", "node": "a", "target": f"127.0.0.1:{echo.port}"}]
    port = free_port()
    proc = start_connect(b, "echo", port)
    stderr = Lines(proc.stderr)
    try:
        payload = os.urandom(20 * 1024 * 1024)
        start = time.monotonic()
        back = through(port, payload)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert time.monotonic() - start < 30
        # several sessions at once
        outs = in_threads(*[lambda: through(port, b"x" * 100_000)] * 4)
        assert outs == [b"x" * 100_000] * 4
        # each session is in the audit log at a, with what it carried each way
        wait_for(lambda: len(sessions(a, "echo")) == 5, 10, "5 audit records on a")
        assert sorted((r["caller"], r["from_node"], int(r["bytes_in"]), int(r["bytes_out"]))
                      for r in sessions(a, "echo")) == \
            [("node:b", "b", 100_000, 100_000)] * 4 + [("node:b", "b", len(payload),
                                                        len(payload))]
        # the operator forbids tunnels to in-cluster callers without a token
        control(a.data_dir, "auth.rules.create", id="no-node-tunnels", resource="tunnel:*:*",
                scope="node", access="denied", priority=10)
        refused(port)
        line = stderr.wait(lambda x: x.startswith("connection refused"), 10, "the refusal")
        assert line.startswith("connection refused: 401 unauthorized: ")
        assert line.endswith("(rule 'no-node-tunnels' denies it)"), line
        assert "refused tunnel echo to no token from node b" in a.log.read_text()
        assert len(sessions(a, "echo")) == 5, "a refused session is not a session"
    finally:
        proc.terminate()
        proc.wait(5)
    # with a token whose account may use it, the tunnel works again
    control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1",
            scopes=["ops"])
    control(a.data_dir, "auth.rules.create", id="ops-tunnels", resource="tunnel:echo:*",
            scope="ops", access="granted", priority=20)
    wait_for(lambda: any(x["id"] == "ops" for x in control(b.data_dir, "auth.accounts.list")),
             10, "account on b")
    token = control(a.data_dir, "auth.token.create", account="ops", ttl=600)["token"]
    port2 = free_port()
    proc2 = start_connect(b, "echo", port2, token=token)
    try:
        assert through(port2, b"with a token") == b"with a token"
        wait_for(lambda: any(r["caller"] == "ops" for r in sessions(a, "echo")), 10,
                 "the token's session audited as ops")
    finally:
        proc2.terminate()
        proc2.wait(5)


def test_session_audit_record_has_the_start_time_and_the_bytes_each_way(cluster):
    """README: the exposing node logs who, from which node, when and how many bytes."""
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    server = DigestServer()
    control(a.data_dir, "tunnel.expose", name="digest", to=f"127.0.0.1:{server.port}")
    wait_for(lambda: control(b.data_dir, "tunnel.list") != [], 10, "tunnel visible on b")
    port = free_port()
    proc = start_connect(b, "digest", port)
    try:
        payload = os.urandom(3 * 1024 * 1024 + 7)
        before = time.time()
        back = through(port, payload)
        assert back == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
        wait_for(lambda: sessions(a, "digest"), 10, "the session's audit record on a")
        logged_by = time.time()
    finally:
        proc.terminate()
        proc.wait(5)
    [rec] = sessions(a, "digest")
    assert (rec["caller"], rec["from_node"]) == ("node:b", "b")
    assert int(rec["bytes_in"]) == len(payload)  # caller -> target
    assert int(rec["bytes_out"]) == len(back)  # target -> caller
    started = calendar.timegm(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%S"))  # UTC
    assert int(before) <= started <= logged_by, (before, rec["started"], logged_by)
    assert 0 <= float(rec["seconds"]) <= logged_by - before + 0.05  # printed to 0.1 s


def test_tokens_without_access_get_403_naming_the_rule_that_decided(cluster):
    """README: denials are 403 (valid token, no access) naming the rule that decided."""
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    echo = EchoServer()
    control(a.data_dir, "tunnel.expose", name="echo", to=f"127.0.0.1:{echo.port}")
    control(a.data_dir, "auth.accounts.create", id="guest", secret="guest-secret-1",
            scopes=["guest"])
    wait_for(lambda: control(b.data_dir, "tunnel.list") != []
             and any(x["id"] == "guest" for x in control(b.data_dir, "auth.accounts.list")),
             10, "tunnel and account on b")
    token = control(a.data_dir, "auth.token.create", account="guest", ttl=600)["token"]
    port = free_port()
    proc = start_connect(b, "echo", port, token=token)
    stderr = Lines(proc.stderr)
    try:
        refused(port)  # no rule mentions the guest scope
        line = stderr.wait(lambda x: x.startswith("connection refused"), 10, "a refusal")
        assert line == ("connection refused: 403 forbidden: guest may not access tunnel:echo:: "
                        "no rule grants it")
        control(a.data_dir, "auth.rules.create", id="guest-tunnels", resource="tunnel:*:*",
                scope="guest", access="granted")
        assert through(port, b"granted") == b"granted"
        wait_for(lambda: len(sessions(a, "echo")) == 1, 10, "the granted session audited")
        control(a.data_dir, "auth.rules.create", id="no-guest-echo", resource="tunnel:echo:*",
                scope="guest", access="denied", priority=10)
        refused(port)
        line = stderr.wait(lambda x: "no-guest-echo" in x, 10, "a refusal naming the rule")
        assert line == ("connection refused: 403 forbidden: guest may not access tunnel:echo:: "
                        "rule 'no-guest-echo' denies it")
    finally:
        proc.terminate()
        proc.wait(5)
    assert [r["caller"] for r in sessions(a, "echo")] == ["guest"]  # the granted one only


def test_tunnel_errors(cluster):
    a = cluster.add("a")
    control(a.data_dir, "tunnel.expose", name="x", to="127.0.0.1:1")
    with pytest.raises(MeshError) as info:
        control(a.data_dir, "tunnel.expose", name="x", to="127.0.0.1:1")
    assert (info.value.status, info.value.detail) == (
        409, "tunnel 'x' is already exposed here; close it first")
    bad = subprocess.run([sys.executable, "-m", "meshd_cli", "tunnel", "expose", "y", "--to",
                          "nope",
                          "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=10)
    assert bad.returncode == 1 and bad.stderr.startswith("400 bad request: --to: ")
    port = free_port()
    proc = start_connect(a, "x", port)  # target 127.0.0.1:1 refuses
    stderr = Lines(proc.stderr)
    try:
        refused(port, b"hi")
        line = stderr.wait(lambda x: x.startswith("connection refused"), 10, "the refusal")
        assert line.startswith("connection refused: 503 unavailable: tunnel 'x': cannot "
                               "connect to 127.0.0.1:1"), line
    finally:
        proc.terminate()
        proc.wait(5)


def test_a_busy_tunnel_does_not_starve_another_on_the_same_link(cluster):
    """Both sessions share the a<->b link: while one moves bulk data, small round trips on
    the other keep completing (per-channel flow control; frames interleave). The bulk
    sender goes on until the chat is done (so no host is too slow for the chat to finish
    first), then half-closes; every byte must come back. Only a stall fails on time: each
    1 MiB send and each read waits at most STALL seconds."""
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    echo = EchoServer()
    control(a.data_dir, "tunnel.expose", name="bulk", to=f"127.0.0.1:{echo.port}")
    control(a.data_dir, "tunnel.expose", name="chat", to=f"127.0.0.1:{echo.port}")
    wait_for(lambda: len(control(b.data_dir, "tunnel.list")) == 2, 10, "tunnels on b")
    bulk_port, chat_port = free_port(), free_port()
    procs = [start_connect(b, "bulk", bulk_port), start_connect(b, "chat", chat_port)]
    chunk = b"B" * (1024 * 1024)
    cap = 2048  # chunks: the loop ends even if the chat never does
    stall = 60.0
    try:
        chat_done = threading.Event()
        sent, back = [0], [0]
        errors: list[BaseException] = []

        def bulk() -> None:
            try:
                with socket.create_connection(("127.0.0.1", bulk_port), timeout=stall) as s:
                    def reader() -> None:
                        try:
                            while data := s.recv(1 << 20):
                                back[0] += len(data)
                        except BaseException as exc:  # handed to the test below
                            errors.append(exc)

                    r = threading.Thread(target=reader, daemon=True)
                    r.start()
                    while (sent[0] < 8 or not chat_done.is_set()) and sent[0] < cap:
                        s.sendall(chunk)
                        sent[0] += 1
                    s.shutdown(socket.SHUT_WR)
                    r.join(stall * 2)
                    if r.is_alive():
                        errors.append(AssertionError(
                            f"no end of the echo: {back[0]} of {sent[0] << 20} bytes back"))
            except BaseException as exc:  # handed to the test below
                errors.append(exc)

        t = threading.Thread(target=bulk, daemon=True)
        t.start()
        wait_for(lambda: echo.echoed >= 8 * 1024 * 1024, 30, "the bulk transfer under way")
        rounds = 0
        with socket.create_connection(("127.0.0.1", chat_port), timeout=20) as s:
            for i in range(20):
                msg = f"ping {i}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    part = s.recv(64)
                    assert part, f"the chat tunnel closed after {got!r}"
                    got += part
                assert got == msg
                rounds += 1
        still_sending = t.is_alive() and not errors
        chat_done.set()
        t.join(stall * 4)
        assert rounds == 20
        assert not t.is_alive(), "the bulk transfer did not finish"
        if errors:
            raise errors[0]
        assert still_sending, "the bulk transfer ended before the chat did"
        assert sent[0] < cap, "the chat never finished while the bulk ran"
        assert back[0] == sent[0] * len(chunk)
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)

"""Tunnels: expose a TCP server on one node, reach it from another, checked by the rules."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from .cluster import LoopbackServer, control, wait_for


class EchoServer(LoopbackServer):
    """A loopback TCP server that echoes until EOF, then closes."""

    def handle(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        got = bytearray()

        def reader() -> None:
            try:
                while chunk := s.recv(65536):
                    got.extend(chunk)
            except OSError:
                pass

        t = threading.Thread(target=reader)
        t.start()
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the tunnel refused and closed the connection: nothing comes back
        t.join(30)
        return bytes(got)


def start_connect(daemon, name, port, token=None):
    cmd = [sys.executable, "-m", "cli"]
    if token:
        cmd += ["--token", token]
    cmd += ["tunnel", "connect", name, "--listen", f"127.0.0.1:{port}", "--data-dir",
            str(daemon.data_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line
    return proc


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
    try:
        payload = os.urandom(20 * 1024 * 1024)
        start = time.monotonic()
        back = through(port, payload)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert time.monotonic() - start < 30
        # several sessions at once
        outs = []
        threads = [threading.Thread(target=lambda: outs.append(through(port, b"x" * 100_000)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outs == [b"x" * 100_000] * 4
        # the operator forbids tunnels to in-cluster callers without a token
        control(a.data_dir, "auth.rules.create", id="no-node-tunnels", resource="tunnel:*:*",
                scope="node", access="denied", priority=10)
        wait_for(lambda: any(r["id"] == "no-node-tunnels"
                             for r in control(b.data_dir, "auth.rules.list")), 10, "rule on b")
        assert through(port, b"hello") == b""
        time.sleep(0.5)  # let the client print the refusal before we stop it
    finally:
        proc.terminate()
        proc.wait(5)
    assert "connection refused: 401" in proc.stderr.read()
    log = a.log.read_text()
    assert "tunnel session name=echo caller=node:b from_node=b" in log
    assert "refused tunnel echo" in log
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
    finally:
        proc2.terminate()
        proc2.wait(5)


def test_tunnel_errors(cluster):
    a = cluster.add("a")
    with pytest.raises(Exception, match="409"):
        control(a.data_dir, "tunnel.expose", name="x", to="127.0.0.1:1")
        control(a.data_dir, "tunnel.expose", name="x", to="127.0.0.1:1")
    bad = subprocess.run([sys.executable, "-m", "cli", "tunnel", "expose", "y", "--to", "nope",
                          "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=10)
    assert bad.returncode == 1 and bad.stderr.startswith("400")
    port = free_port()
    proc = start_connect(a, "x", port)  # target 127.0.0.1:1 refuses
    try:
        assert through(port, b"hi") == b""
    finally:
        proc.terminate()
        proc.wait(5)


def test_a_busy_tunnel_does_not_starve_another_on_the_same_link(cluster):
    """Both sessions share the a<->b link: while one moves bulk data, small round trips on
    the other keep completing (per-channel flow control; frames interleave)."""
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    echo = EchoServer()
    control(a.data_dir, "tunnel.expose", name="bulk", to=f"127.0.0.1:{echo.port}")
    control(a.data_dir, "tunnel.expose", name="chat", to=f"127.0.0.1:{echo.port}")
    wait_for(lambda: len(control(b.data_dir, "tunnel.list")) == 2, 10, "tunnels on b")
    bulk_port, chat_port = free_port(), free_port()
    procs = [start_connect(b, "bulk", bulk_port), start_connect(b, "chat", chat_port)]
    try:
        bulk_done = threading.Event()
        bulk_result: list[bytes] = []

        def bulk() -> None:
            bulk_result.append(through(bulk_port, b"B" * (400 * 1024 * 1024)))
            bulk_done.set()

        t = threading.Thread(target=bulk)
        t.start()
        time.sleep(0.5)  # the bulk transfer is under way
        rounds = 0
        with socket.create_connection(("127.0.0.1", chat_port), timeout=20) as s:
            for i in range(20):
                msg = f"ping {i}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += s.recv(64)
                assert got == msg
                rounds += 1
        finished_during_bulk = not bulk_done.is_set()
        t.join(120)
        assert rounds == 20
        assert finished_during_bulk, "the bulk transfer ended first: nothing was shown"
        assert len(bulk_result[0]) == 400 * 1024 * 1024
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)

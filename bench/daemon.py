"""Daemon targets on loopback: `python bench/daemon.py`.

1. Five local daemons (profile `local`): seconds from the last join until all five see five
   alive members.
2. An idle node: RSS and CPU over a 20 s window (from /proc).
3. Secure link throughput with 64 KiB messages, against plain trio TCP measured in the same
   run on the same loopback: MB/s each and the ratio. Sender and receiver are separate
   processes, as two nodes are.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.identity import Identity  # noqa: E402
from meshd.secure.keyring import Keyring, new_secret  # noqa: E402
from meshd.transport.links import Channel, LinkManager  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402

MESSAGE = 64 * 1024
TOTAL = 512 * 1024 * 1024


def converge() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp))
        try:
            seed = c.add("n1")
            others = [c.add(f"n{i}", join=[seed.addr]) for i in range(2, 6)]
            start = time.monotonic()
            everyone = [seed, *others]
            while time.monotonic() - start < 30:
                if all(sum(m["status"] == "alive" for m in d.members().values()) == 5
                       for d in everyone):
                    return time.monotonic() - start
                time.sleep(0.02)
            return float("inf")
        finally:
            c.close()


def idle() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp))
        try:
            d = c.add("idle", profile="lan")
            peer = c.add("peer", join=[d.addr], profile="lan")
            del peer
            time.sleep(5)
            pid = d.proc.pid
            ticks = os.sysconf("SC_CLK_TCK")

            def cpu() -> float:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / ticks

            c0, t0 = cpu(), time.monotonic()
            time.sleep(20)
            c1, t1 = cpu(), time.monotonic()
            rss_kb = next(int(line.split()[1]) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS"))
            return rss_kb / 1024, 100 * (c1 - c0) / (t1 - t0)
        finally:
            c.close()


def _serve_plain(port_q: Any, done_q: Any) -> None:
    async def run() -> None:
        done = trio.Event()
        received = 0

        async def server(stream: trio.SocketStream) -> None:
            nonlocal received
            while received < TOTAL:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                received += len(data)
            done.set()

        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, server, listeners)
            port_q.put(listeners[0].socket.getsockname()[1])
            await done.wait()
            done_q.put(time.perf_counter())
            nursery.cancel_scope.cancel()

    trio.run(run)


def _serve_secure(secret: bytes, port_q: Any, done_q: Any) -> None:
    async def run() -> None:
        b = LinkManager(Identity.generate(), Keyring([secret]), "127.0.0.1:0")
        done = trio.Event()

        async def sink(ch: Channel) -> None:
            got = 0
            while got < TOTAL:
                got += len(await ch.receive())
            done.set()

        b.handlers["sink"] = sink
        async with trio.open_nursery() as nursery:
            port = await nursery.start(b.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
            port_q.put(port)
            await done.wait()
            done_q.put(time.perf_counter())
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(run)


def _throughput(secure: bool) -> float:
    """Sender here, receiver in another process (its own core), as between two nodes.
    Both report time.perf_counter (CLOCK_MONOTONIC, shared by processes on Linux)."""
    ctx = multiprocessing.get_context("fork")
    port_q, done_q = ctx.Queue(), ctx.Queue()
    secret = new_secret()
    if secure:
        proc = ctx.Process(target=_serve_secure, args=(secret, port_q, done_q))
    else:
        proc = ctx.Process(target=_serve_plain, args=(port_q, done_q))
    proc.start()
    port = port_q.get(timeout=10)
    payload = os.urandom(MESSAGE)

    async def send() -> tuple[float, float]:
        if secure:
            a = LinkManager(Identity.generate(), Keyring([secret]), "127.0.0.1:0")
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run, await trio.open_tcp_listeners(0, host="127.0.0.1"))
                ch = await a.open_channel(f"127.0.0.1:{port}", "sink")
                start = time.perf_counter()
                for _ in range(TOTAL // MESSAGE):
                    await ch.send(payload)
                end = await trio.to_thread.run_sync(done_q.get)
                nursery.cancel_scope.cancel()
            return start, end
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = time.perf_counter()
        for _ in range(TOTAL // MESSAGE):
            await stream.send_all(payload)
        end = await trio.to_thread.run_sync(done_q.get)
        await stream.aclose()
        return start, end

    start, end = trio.run(send)
    proc.join(10)
    return TOTAL / (end - start) / 1e6


def main() -> int:
    conv = converge()
    print(f"5 local daemons converge after the last join: {conv:.2f} s (goal <= 2 s)",
          flush=True)
    rss, cpu = idle()
    print(f"idle node (2-node cluster, lan profile): RSS {rss:.1f} MB (goal < 60), "
          f"CPU {cpu:.2f}% of one core (goal < 2%)", flush=True)
    plain = _throughput(secure=False)
    secure = _throughput(secure=True)
    print(f"64 KiB messages over loopback: plain trio TCP {plain:.0f} MB/s, secure link "
          f"{secure:.0f} MB/s, ratio {secure / plain:.2f} (goal >= 0.5)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

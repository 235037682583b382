"""RPC latency and throughput on loopback, side by side: `python bench/rpc.py [--seconds S]`.

1 KiB JSON request and response, echoed:
  (a) plain trio TCP echo (length-prefixed), client and server in two processes;
  (b) grpcio (async API) unary call, client -> server directly, two processes;
  (c) meshd: SDK -> daemon A -> daemon B -> service process (four processes);
  (d) meshd local fast path: SDK -> daemon -> service on one host;
  (e) meshd through a remote environment: SDK Client(env=) -> proxy of daemon A (ws:// on
      loopback, the caller's token checked per request) -> daemon B -> service.
For each: p50/p99 latency with 1 caller, calls/s with 1 and 32 concurrent callers.
Goals: (c) >= 0.5x the calls/s of (b) at 32 callers, (c) p50 <= 2x (b) at 1 caller,
(d) >= (b) at 32 callers.
`--observability` runs bench/observability.py instead (what metrics and tracing cost, issue
15's target). Also CPU milliseconds per call of each meshd process in (c) at 32 callers (from
/proc/PID/stat): on a shared machine calls/s swing by 10% between runs, CPU per call much
less, so it is the figure to compare before and after a change on the hot path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from tests.integration.cluster import Cluster, wait_for  # noqa: E402

PAYLOAD = {"text": "x" * 1000}
RAW = json.dumps(PAYLOAD).encode()


async def _measure(call: Callable[[], Awaitable[Any]], callers: int,
                   seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    count = 0
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal count
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)
            count += 1

    for _ in range(20):  # warm-up
        await call()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(worker)
    return count / (time.perf_counter() - start), latencies


def _row(name: str, one: tuple[float, list[float]], many: tuple[float, list[float]]
         ) -> dict[str, Any]:
    lat = sorted(one[1])
    return {"name": name, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000, "cps_1": one[0], "cps_32": many[0]}


# --- (a) plain trio TCP echo --------------------------------------------------------------

def _tcp_server(port_q: Any) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while len(buf) < 4:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                (n,) = struct.unpack(">I", buf[:4])
                while len(buf) < 4 + n:
                    buf += await stream.receive_some(65536)
                msg, buf = buf[4:4 + n], buf[4 + n:]
                await stream.send_all(struct.pack(">I", len(msg)) + msg)
        except trio.BrokenResourceError:
            return

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port_q.put(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


async def _tcp_client(port: int, callers: int, seconds: float) -> tuple[float, list[float]]:
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(callers)]
    free = list(streams)

    async def call() -> None:
        s = free.pop()
        try:
            await s.send_all(struct.pack(">I", len(RAW)) + RAW)
            buf = b""
            while len(buf) < 4 + len(RAW):
                buf += await s.receive_some(65536)
            json.loads(buf[4:])
        finally:
            free.append(s)

    return await _measure(call, callers, seconds)


# --- (b) grpcio ------------------------------------------------------------------------------

def _grpc_server(port_q: Any) -> None:
    import asyncio

    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return json.dumps(json.loads(request)).encode()

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _grpc_client(port: int, callers: int, seconds: float) -> tuple[float, list[float]]:
    import asyncio

    import grpc

    async def main() -> tuple[float, list[float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary("/bench.Echo/Call")
            for _ in range(20):
                await method(RAW)
            latencies: list[float] = []
            count = 0
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal count
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    json.loads(await method(RAW))
                    latencies.append(time.perf_counter() - t0)
                    count += 1

            start = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(callers)])
            return count / (time.perf_counter() - start), latencies

    return asyncio.run(main())


def _in_server(target: Callable[[Any], None]) -> tuple[Any, int]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(q,), daemon=True)
    proc.start()
    return proc, q.get(timeout=30)


# --- (c), (d) meshd ----------------------------------------------------------------------------

async def _meshd_client(sock: Path, callers: int, seconds: float,
                        env: tuple[str, str] | None = None) -> tuple[float, list[float]]:
    """Calls through the daemon at `sock`, or through environment `env` (name, token)."""
    from meshd_sdk import Client

    client = Client(sock, pool=callers + 4) if env is None else \
        Client(env=env[0], token=env[1], pool=callers + 4)

    async def call() -> None:
        await client.call("benchecho", "Bench.Echo", PAYLOAD)

    async with client:
        return await _measure(call, callers, seconds)


ECHO_SERVICE = '''
import trio
from meshd_sdk import Service
from typing import Any
service = Service("benchecho")

@service.handler("Bench.Echo")
async def echo(req: dict[str, Any]) -> dict[str, Any]:
    return req

trio.run(service.run)
'''


def echo_pair(c: Cluster, root: Path, env: dict[str, str] | None = None,
              a_extra: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """Daemons a and b (joined) with the echo service on b, once both see it."""
    from tests.integration.cluster import control

    script = root / "echo.py"
    script.write_text(ECHO_SERVICE)
    a = c.add("a", extra=a_extra, env=env or {})
    b = c.add("b", join=[a.addr], env=env or {})
    c.service(b, "benchecho", script=script)

    def ready(d: Any) -> bool:
        try:
            return len(control(d.data_dir, "describe", service="benchecho")["instances"]) == 1
        except Exception:
            return False

    wait_for(lambda: ready(a) and ready(b), 20, "echo service everywhere")
    return a, b


def host_baseline(callers: int = 32, seconds: float = 3.0) -> tuple[float, float]:
    """(calls/s of the trio TCP echo at `callers`, the load average before it), printed as
    the host baseline every bench reports with its figures."""
    load = os.getloadavg()[0]
    proc, port = _in_server(_tcp_server)
    try:
        rate = trio.run(_tcp_client, port, callers, seconds)[0]
    finally:
        proc.terminate()
        proc.join(5)
    print(f"host baseline: trio TCP echo, {callers} callers: {rate:,.0f} calls/s "
          f"(load average {load:.2f})")
    return rate, load


def baseline_footer(rate: float, load_before: float, took: float | None = None,
                    callers: int = 32) -> str:
    """The closing line of a bench: the host baseline, the load average before and now, and
    how long the bench took."""
    text = (f"host baseline: trio TCP echo {callers} callers {rate:,.0f} calls/s; load "
            f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return text if took is None else f"{text}; bench took {took:.0f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--observability", action="store_true",
                    help="instead: (c) and (d) with metrics and tracing on (default sampling "
                    "and 1.0) against off, side by side (bench/observability.py)")
    opts, rest = ap.parse_known_args()
    if opts.observability:
        import observability

        sys.argv = [sys.argv[0], *rest]
        return observability.main()
    secs = opts.seconds
    rows = []

    proc, port = _in_server(_tcp_server)
    rows.append(_row("(a) trio TCP echo", trio.run(_tcp_client, port, 1, secs),
                     trio.run(_tcp_client, port, 32, secs)))
    proc.terminate()
    proc, port = _in_server(_grpc_server)
    rows.append(_row("(b) grpcio unary", _grpc_client(port, 1, secs),
                     _grpc_client(port, 32, secs)))
    proc.terminate()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        c = Cluster(root)
        proxy_port = _free_port()
        os.environ["MESHD_ENV_FILE"] = str(root / "environments.json")
        try:
            a, b = echo_pair(c, root, a_extra=("--proxy-listen", f"127.0.0.1:{proxy_port}"))
            sock_a, sock_b = a.data_dir / "meshd.sock", b.data_dir / "meshd.sock"
            one = trio.run(_meshd_client, sock_a, 1, secs)
            pids = {"daemon A": a.proc.pid, "daemon B": b.proc.pid,
                    "service": c.services[0].proc.pid}
            before = {k: _cpu_seconds(p) for k, p in pids.items()}
            many = trio.run(_meshd_client, sock_a, 32, secs)
            calls = many[0] * secs
            cpu = {k: (_cpu_seconds(p) - before[k]) * 1000 / calls for k, p in pids.items()}
            rows.append(_row("(c) meshd SDK->A->B->service", one, many))
            rows.append(_row("(d) meshd local SDK->B->service",
                             trio.run(_meshd_client, sock_b, 1, secs),
                             trio.run(_meshd_client, sock_b, 32, secs)))
            from meshd.envs import Environments

            envs = Environments()
            envs.add("bench", f"ws://127.0.0.1:{proxy_port}")
            envs.save()
            env = ("bench", (a.data_dir / "admin.token").read_text().strip())
            rows.append(_row("(e) meshd env SDK->proxy A->B->svc",
                             trio.run(_meshd_client, sock_a, 1, secs, env),
                             trio.run(_meshd_client, sock_a, 32, secs, env)))
        finally:
            c.close()

    print(f"{'':34}{'p50 ms':>9}{'p99 ms':>9}{'calls/s 1':>11}{'calls/s 32':>12}")
    for r in rows:
        print(f"{r['name']:34}{r['p50_ms']:9.3f}{r['p99_ms']:9.3f}{r['cps_1']:11.0f}"
              f"{r['cps_32']:12.0f}")
    grpc_row, remote, local, through_env = rows[1], rows[2], rows[3], rows[4]
    print(f"\n(c)/(b) calls/s at 32: {remote['cps_32'] / grpc_row['cps_32']:.2f} (goal >= 0.5)")
    print(f"(c)/(b) p50 at 1: {remote['p50_ms'] / grpc_row['p50_ms']:.2f} (goal <= 2)")
    print(f"(d)/(b) calls/s at 32: {local['cps_32'] / grpc_row['cps_32']:.2f} (goal >= 1)")
    print(f"(e)/(b) calls/s at 32: {through_env['cps_32'] / grpc_row['cps_32']:.2f}; "
          f"(e)/(c): {through_env['cps_32'] / remote['cps_32']:.2f}")
    print("(c) CPU ms per call at 32 callers: " + ", ".join(
        f"{k} {v:.3f}" for k, v in cpu.items()))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

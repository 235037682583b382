"""Broker (issue 14) against NATS on loopback: `python bench/broker.py [--seconds S] [--quick]`.

1 KiB messages; meshd and NATS measured side by side in the same run, every client in its
own process as in bench/rpc.py:
  (a) delivered msgs/s publisher -> subscriber: meshd publisher SDK (client.publisher(),
      pipelined) on daemon A, subscriber SDK on daemon B, vs NATS core through one
      nats-server (nats-py publisher and subscriber processes). The publisher runs flat
      out; the subscriber counts what it received over a fixed window (after a warm-up).
      Goal >= 0.25x.
  (b) RPC round trips/s, 32 concurrent callers: meshd SDK -> daemon -> service on one node
      (bench/rpc.py (d), its echo service) vs NATS request/reply (nats-py requester, 32
      concurrent requests, responder process). Goal >= 1x.
  (c) durable acked publishes/s, 32 concurrent publishers: meshd `client.publish()` to a
      durable topic (new, empty) vs JetStream file storage R1 (`js.publish`). Goal >= 0.5x.
      Also the rate of the first and of the last second (a log that slows as it grows
      shows there). NATS 2.9 acknowledges once the write reached the OS (no per-write
      fsync option before 2.10); meshd once SQLite (WAL, synchronous=FULL) committed.
  (c') the same with `broker.fsync = false` (SQLite synchronous=NORMAL: acknowledged once
      in the OS, as JetStream 2.9: survives the daemon being killed, not a power loss).
  (d) copies on the wire per published message at 10 daemons with 1 interested node
      (sum of `broker_copies_out` over every daemon / messages published). Goal: 1.
  (e) durable topics on NATS JetStream (issue 21): acked publishes/s, 32 concurrent
      publishers, meshd `client.publish()` to a topic created with `--backend nats` (the
      daemon publishes to JetStream and answers after the PubAck) vs nats-py's own
      `js.publish` to the same server, file storage R1, in the same run. Goal >= 0.5x.
      `--jetstream-only` runs the host baseline and (e) alone.
Host baseline: trio TCP echo at 32 callers (bench/rpc.py (a)) and the load average, so slow
days are visible. Also CPU microseconds per message of each process in (a), (b) and (c),
read from /proc: rates swing between runs on a shared machine, CPU per message much less.
nats-server (Debian package) is installed when missing and running as root; everything
listens on 127.0.0.1 only and is stopped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402  (bench/rpc.py: echo service, callers, baseline)
import trio  # noqa: E402

from tests.integration.cluster import Cluster, Daemon, control, wait_for  # noqa: E402

BODY = b"x" * 1024
CORE_TOPIC = "bench.core"
DURABLE_TOPIC = "bench.durable"
CALLERS = 32
WARMUP = 1.0
CTX = multiprocessing.get_context("spawn")


def _cpu(pid: int) -> float:
    try:
        return rpcbench._cpu_seconds(pid)
    except (OSError, IndexError):
        return 0.0


# --- (a) publisher and subscriber processes ------------------------------------------------

def _meshd_sub(sock: str, buffer: int, policy: str, seconds: float, q: Any) -> None:
    async def main() -> None:
        from meshd_sdk import Client

        client = Client(sock)
        n = 0
        first = trio.Event()

        async def local_row(sub_id: str) -> dict[str, Any]:
            rows = (await client.topics())["local"]
            return next((r for r in rows if r["id"] == sub_id), {})

        async with client.subscribe(CORE_TOPIC, buffer=buffer, policy=policy) as sub:
            q.put(("ready", sub.id))

            async def count() -> None:
                nonlocal n
                async for _ in sub:
                    n += 1
                    if n == 1:
                        first.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(count)
                with trio.fail_after(30):
                    await first.wait()
                await trio.sleep(WARMUP)
                row0, n0, t0 = await local_row(sub.id), n, time.perf_counter()
                q.put(("start", t0))
                await trio.sleep(seconds)
                n1, t1 = n, time.perf_counter()
                row1 = await local_row(sub.id)
                q.put(("end", t1))
                q.put(("result", {"rate": (n1 - n0) / (t1 - t0), "received": n1 - n0,
                                  "dropped": row1.get("dropped", 0) - row0.get("dropped", 0)}))
                nursery.cancel_scope.cancel()

    trio.run(main)


def _meshd_pub(sock: str, stop: Any, q: Any) -> None:
    async def main() -> None:
        from meshd_sdk import Client

        n = 0
        t0 = time.perf_counter()
        async with Client(sock).publisher() as pub:
            q.put(("ready", None))
            while not stop.is_set():
                for _ in range(256):
                    await pub.publish(CORE_TOPIC, BODY)
                n += 256
            t1 = time.perf_counter()
        q.put(("result", {"rate": n / (t1 - t0), "published": n}))

    trio.run(main)


def _nats_sub(url: str, seconds: float, q: Any) -> None:
    import nats
    from nats.errors import SlowConsumerError

    async def main() -> None:
        n = dropped = 0
        first = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            nonlocal dropped
            if isinstance(exc, SlowConsumerError):
                dropped += 1

        async def cb(msg: Any) -> None:
            nonlocal n
            n += 1
            if n == 1:
                first.set()

        nc = await nats.connect(url, error_cb=on_error)
        await nc.subscribe(CORE_TOPIC, cb=cb)
        await nc.flush()
        q.put(("ready", None))
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.sleep(WARMUP)
        n0, d0, t0 = n, dropped, time.perf_counter()
        q.put(("start", t0))
        await asyncio.sleep(seconds)
        n1, d1, t1 = n, dropped, time.perf_counter()
        q.put(("end", t1))
        q.put(("result", {"rate": (n1 - n0) / (t1 - t0), "received": n1 - n0,
                          "dropped": d1 - d0}))
        await nc.close()

    asyncio.run(main())


def _nats_pub(url: str, stop: Any, q: Any) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(url)
        q.put(("ready", None))
        n = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            for _ in range(256):
                await nc.publish(CORE_TOPIC, BODY)
            n += 256
        await nc.flush()
        t1 = time.perf_counter()
        q.put(("result", {"rate": n / (t1 - t0), "published": n}))
        await nc.close()

    asyncio.run(main())


def _expect(q: Any, kind: str, timeout: float = 60) -> Any:
    got, value = q.get(timeout=timeout)
    if got != kind:
        raise AssertionError(f"expected {kind!r} from a bench process, got {got!r}: {value}")
    return value


def _pubsub(sub_target: Any, sub_args: tuple[Any, ...], pub_target: Any,
            pub_args: tuple[Any, ...], others: dict[str, int],
            wait_interest: Callable[[], None] | None = None) -> dict[str, Any]:
    """Subscriber process, then publisher process (flat out); the subscriber's window
    decides; CPU of every process over the window, per message received."""
    sub_q, pub_q, stop = CTX.Queue(), CTX.Queue(), CTX.Event()
    sub = CTX.Process(target=sub_target, args=(*sub_args, sub_q), daemon=True)
    pub = CTX.Process(target=pub_target, args=(*pub_args, stop, pub_q), daemon=True)
    try:
        sub.start()
        _expect(sub_q, "ready")
        if wait_interest is not None:
            wait_interest()
        pub.start()
        _expect(pub_q, "ready")
        pids = {**others, "publisher": pub.pid, "subscriber": sub.pid}
        _expect(sub_q, "start")
        before = {k: _cpu(p) for k, p in pids.items()}
        _expect(sub_q, "end")
        after = {k: _cpu(p) for k, p in pids.items()}
        result = _expect(sub_q, "result")
        stop.set()
        result["published_rate"] = _expect(pub_q, "result")["rate"]
        got = max(result["received"], 1)
        result["cpu_us"] = {k: (after[k] - before[k]) * 1e6 / got for k in pids}
        return result
    finally:
        stop.set()
        for p in (pub, sub):
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


# --- (b) NATS request/reply --------------------------------------------------------------------

def _nats_responder(url: str, q: Any) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(url)

        async def echo(msg: Any) -> None:
            await msg.respond(json.dumps(json.loads(msg.data)).encode())

        await nc.subscribe("bench.echo", cb=echo)
        await nc.flush()
        q.put(("ready", os.getpid()))
        await asyncio.Event().wait()

    asyncio.run(main())


def _nats_requests(url: str, callers: int, seconds: float) -> float:
    import nats

    async def main() -> float:
        nc = await nats.connect(url)
        for _ in range(20):
            await nc.request("bench.echo", rpcbench.RAW, timeout=5)
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                json.loads((await nc.request("bench.echo", rpcbench.RAW, timeout=5)).data)
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(callers)])
        rate = count / (time.perf_counter() - start)
        await nc.close()
        return rate

    return asyncio.run(main())


# --- (c) durable publishes -----------------------------------------------------------------------

async def _paced(call: Callable[[], Any], callers: int, seconds: float) -> dict[str, Any]:
    """`callers` workers calling `call` for `seconds`: the rate, and the rate of the first
    and of the last second (a store that slows as it grows shows here)."""
    count = 0
    marks: list[tuple[float, int]] = []
    for _ in range(20):  # warm-up
        await call()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await call()
            count += 1

    async def ticker() -> None:
        while time.perf_counter() < deadline:
            marks.append((time.perf_counter(), count))
            await trio.sleep(min(1.0, max(deadline - time.perf_counter(), 0)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for _ in range(callers):
            nursery.start_soon(worker)
    end = time.perf_counter()
    marks.append((end, count))
    (t0, c0), (t1, c1) = marks[0], marks[min(1, len(marks) - 1)]
    (t2, c2), (t3, c3) = marks[max(len(marks) - 2, 0)], marks[-1]
    return {"rate": count / (end - start), "first": (c1 - c0) / max(t1 - t0, 1e-9),
            "last": (c3 - c2) / max(t3 - t2, 1e-9), "count": count}


async def _meshd_durable(sock: Path, callers: int, seconds: float,
                         topic: str = DURABLE_TOPIC) -> dict[str, Any]:
    from meshd_sdk import Client

    client = Client(sock, pool=callers + 4)

    async def call() -> None:
        await client.publish(topic, BODY)

    async with client:
        return await _paced(call, callers, seconds)


def _jetstream(url: str, callers: int, seconds: float, stream: str = "BENCH"
               ) -> dict[str, Any]:
    """nats-py on asyncio, measured as `_paced` measures meshd."""
    import nats
    from nats.js.api import StorageType

    subject = f"bench.js.{stream.lower()}"

    async def main() -> dict[str, Any]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE,
                            num_replicas=1)
        for _ in range(20):
            await js.publish(subject, BODY)
        count = 0
        marks: list[tuple[float, int]] = []
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await js.publish(subject, BODY)
                count += 1

        async def ticker() -> None:
            while time.perf_counter() < deadline:
                marks.append((time.perf_counter(), count))
                await asyncio.sleep(min(1.0, max(deadline - time.perf_counter(), 0)))

        await asyncio.gather(ticker(), *[worker() for _ in range(callers)])
        end = time.perf_counter()
        marks.append((end, count))
        await nc.close()
        (t0, c0), (t1, c1) = marks[0], marks[min(1, len(marks) - 1)]
        (t2, c2), (t3, c3) = marks[max(len(marks) - 2, 0)], marks[-1]
        return {"rate": count / (end - start), "first": (c1 - c0) / max(t1 - t0, 1e-9),
                "last": (c3 - c2) / max(t3 - t2, 1e-9), "count": count}

    return asyncio.run(main())


# --- (d) copies at 10 daemons ---------------------------------------------------------------

async def _fanout(pub_sock: Path, sub_sock: Path, n: int,
                  interest_at: Callable[[], bool]) -> int:
    """Subscribe at one daemon, publish `n` from another; how many arrived."""
    from meshd_sdk import Client

    got = 0
    async with Client(sub_sock).subscribe(CORE_TOPIC, buffer=n, policy="block") as sub:
        while not await trio.to_thread.run_sync(interest_at):
            await trio.sleep(0.1)
        async with Client(pub_sock).publisher() as pub:
            for _ in range(n):
                await pub.publish(CORE_TOPIC, BODY)
        with trio.move_on_after(20):
            async for _ in sub:
                got += 1
                if got == n:
                    break
    return got


def _stats(d: Daemon) -> dict[str, int]:
    return control(d.data_dir, "broker.topics")["stats"]


def _interest_seen(at: Daemon, node: str) -> bool:
    rows = control(at.data_dir, "broker.topics")["interest"]
    return any(r["node"] == node and r["pattern"] == CORE_TOPIC for r in rows)


def _auth_replicated(*daemons: Daemon) -> None:
    wait_for(lambda: all(len(control(d.data_dir, "auth.rules.list")) == 3 for d in daemons),
             30, "auth rules on every daemon")


def wire_copies(root: Path, nodes: int, n: int) -> dict[str, float]:
    c = Cluster(root)
    try:
        seed = c.add("n0")
        daemons = [seed] + [c.add(f"n{i}", join=[seed.addr]) for i in range(1, nodes)]
        wait_for(lambda: all(sum(m["status"] == "alive" for m in d.members().values()) == nodes
                             for d in daemons), 30, f"{nodes} daemons alive everywhere")
        _auth_replicated(*daemons[1:])
        sub_d, pub_d = daemons[3], daemons[7]
        before = [_stats(d) for d in daemons]
        got = trio.run(_fanout, pub_d.data_dir / "meshd.sock", sub_d.data_dir / "meshd.sock", n,
                       lambda: _interest_seen(pub_d, sub_d.name))
        after = [_stats(d) for d in daemons]

        def total(key: str) -> int:
            return sum(a.get(key, 0) - b.get(key, 0) for a, b in zip(after, before, strict=True))

        return {"received": got, "copies": total("broker_copies_out") / n,
                "batches": total("broker_batches_out") / n,
                "copies_in": total("broker_copies_in") / n}
    finally:
        c.close()


# --- nats-server ----------------------------------------------------------------------------------

def _nats_binary() -> str:
    path = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/sbin")
    if path is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nats-server"], check=False,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("nats-server", path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise SystemExit("nats-server is needed (Debian: apt-get install nats-server)")
    return path


@contextlib.contextmanager
def nats_server(root: Path, jetstream: bool = False) -> Iterator[tuple[str, int]]:
    """A nats-server on a free loopback port (JetStream file storage under `root` if
    asked); yields (url, pid); stopped on the way out."""
    port = rpcbench._free_port()
    cmd = [_nats_binary(), "-a", "127.0.0.1", "-p", str(port)]
    if jetstream:
        cmd += ["-js", "-sd", str(root / "jetstream")]
    log = open(root / f"nats-{port}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nats-server did not start: "
                                         f"{(root / f'nats-{port}.log').read_text()}") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# --- main ----------------------------------------------------------------------------------------

class CpuMeter:
    """CPU microseconds per unit of work of each named process, from /proc."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {k: _cpu(p) for k, p in pids.items()}

    def per(self, n: float) -> dict[str, float]:
        return {k: (_cpu(p) - self.start[k]) * 1e6 / max(n, 1) for k, p in self.pids.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--quick", action="store_true", help="1 s windows, 300 messages in (d)")
    ap.add_argument("--policy", default="drop-oldest", choices=["drop-oldest", "block"],
                    help="the meshd subscriber's policy in (a)")
    ap.add_argument("--buffer", type=int, default=100_000,
                    help="the meshd subscriber's buffer in (a), messages")
    ap.add_argument("--nodes", type=int, default=10, help="daemons in (d)")
    ap.add_argument("--jetstream-only", action="store_true",
                    help="the host baseline and (e) only")
    opts = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("nats") is None:
        raise SystemExit("nats-py is needed: pip install nats-py (or -e '.[bench]')")
    _nats_binary()
    secs = 1.0 if opts.quick else opts.seconds
    n_wire = 300 if opts.quick else 2000
    started = time.monotonic()
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    me = os.getpid()

    out["baseline"] = rpcbench.host_baseline(CALLERS, min(secs, 3.0))[0]

    if opts.jetstream_only:
        with tempfile.TemporaryDirectory() as tmp:
            out["e"] = nats_backed(Path(tmp), secs)
        out["load_after"] = os.getloadavg()[0]
        report_e(out, time.monotonic() - started)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with nats_server(root) as (url, npid):
            out["a_nats"] = _pubsub(_nats_sub, (url, secs), _nats_pub, (url,),
                                    {"nats-server": npid})
            print(f"(a) NATS core: {out['a_nats']['rate']:,.0f} msgs/s delivered")
            resp, rpid = _start(_nats_responder, url)
            try:
                cpu = CpuMeter({"nats-server": npid, "responder": rpid, "requester": me})
                out["b_nats"] = _nats_requests(url, CALLERS, secs)
                out["b_nats_cpu"] = cpu.per(out["b_nats"] * secs)
            finally:
                resp.kill()
            print(f"(b) NATS request/reply: {out['b_nats']:,.0f} round trips/s")
        with nats_server(root, jetstream=True) as (url, npid):
            cpu = CpuMeter({"nats-server": npid, "publisher": me})
            out["c_nats"] = _jetstream(url, CALLERS, secs)
            out["c_nats_cpu"] = cpu.per(out["c_nats"]["count"])
            print(f"(c) JetStream file R1: {out['c_nats']['rate']:,.0f} acked publishes/s")

        (root / "echo.py").write_text(rpcbench.ECHO_SERVICE)
        (root / "meshd").mkdir()
        c = Cluster(root / "meshd")
        try:
            a = c.add("a")
            b = c.add("b", join=[a.addr])
            _auth_replicated(b)
            sock_a, sock_b = a.data_dir / "meshd.sock", b.data_dir / "meshd.sock"
            out["a_meshd"] = _pubsub(
                _meshd_sub, (str(sock_b), opts.buffer, opts.policy, secs), _meshd_pub,
                (str(sock_a),), {"daemon A": a.proc.pid, "daemon B": b.proc.pid},
                wait_interest=lambda: wait_for(lambda: _interest_seen(a, "b"), 20,
                                               "b's interest at a"))
            out["a_batch"] = _stats(a)
            print(f"(a) meshd A->B: {out['a_meshd']['rate']:,.0f} msgs/s delivered")

            svc = c.service(b, "benchecho", script=root / "echo.py")
            wait_for(lambda: len(control(b.data_dir, "describe",
                                         service="benchecho")["instances"]) == 1,
                     20, "echo service")
            cpu = CpuMeter({"daemon": b.proc.pid, "service": svc.proc.pid, "caller": me})
            out["b_meshd"] = trio.run(rpcbench._meshd_client, sock_b, CALLERS, secs)[0]
            out["b_meshd_cpu"] = cpu.per(out["b_meshd"] * secs)
            print(f"(b) meshd RPC: {out['b_meshd']:,.0f} round trips/s")

            control(a.data_dir, "broker.topics.create", topic=DURABLE_TOPIC, durable=True)
            cpu = CpuMeter({"daemon": a.proc.pid, "publisher": me})
            out["c_meshd"] = trio.run(_meshd_durable, sock_a, CALLERS, secs)
            out["c_meshd_cpu"] = cpu.per(out["c_meshd"]["count"])
            out["c_commits"] = _stats(a).get("broker_commits", 0)
            print(f"(c) meshd durable: {out['c_meshd']['rate']:,.0f} acked publishes/s")
            # (c') the same with broker.fsync = false: acknowledged once in the OS, as
            # JetStream 2.9 does (survives the daemon being killed, not a power loss)
            n = c.add("n", env={"MESHD_BROKER_FSYNC": "false"})
            control(n.data_dir, "broker.topics.create", topic=DURABLE_TOPIC, durable=True)
            cpu = CpuMeter({"daemon": n.proc.pid, "publisher": me})
            out["c2_meshd"] = trio.run(_meshd_durable, n.data_dir / "meshd.sock", CALLERS,
                                       secs)
            out["c2_meshd_cpu"] = cpu.per(out["c2_meshd"]["count"])
            print(f"(c') meshd durable, fsync false: {out['c2_meshd']['rate']:,.0f} acked "
                  "publishes/s")
        finally:
            c.close()

        (root / "wire").mkdir()
        out["d"] = wire_copies(root / "wire", opts.nodes, n_wire)
        print(f"(d) {opts.nodes} daemons: {out['d']['copies']:.3f} copies per message")
        (root / "e").mkdir()
        out["e"] = nats_backed(root / "e", secs)

    out["load_after"] = os.getloadavg()[0]
    report(out, opts, secs, n_wire, time.monotonic() - started)
    return 0


def _start(target: Any, *args: Any) -> tuple[Any, int]:
    q = CTX.Queue()
    proc = CTX.Process(target=target, args=(*args, q), daemon=True)
    proc.start()
    return proc, _expect(q, "ready")


def _cpus(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())


def report(out: dict[str, Any], opts: Any, secs: float, n_wire: int, took: float) -> None:
    am, an, cm, cn = out["a_meshd"], out["a_nats"], out["c_meshd"], out["c_nats"]
    rows = [
        ("(a) delivered msgs/s, pub -> sub", am["rate"], an["rate"], 0.25),
        (f"(b) RPC round trips/s, {CALLERS} callers", out["b_meshd"], out["b_nats"], 1.0),
        (f"(c) durable acked publishes/s, {CALLERS}", cm["rate"], cn["rate"], 0.5),
        ("(c') the same, broker.fsync false", out["c2_meshd"]["rate"], cn["rate"], 0.5),
    ]
    print(f"\n{'':40}{'meshd':>10}{'NATS':>10}{'ratio':>8}{'goal':>9}  holds")
    for name, m, n, goal in rows:
        ratio = m / n if n else float("inf")
        print(f"{name:40}{m:10,.0f}{n:10,.0f}{ratio:8.2f}{'>= ' + str(goal):>9}  "
              f"{'yes' if ratio >= goal else 'NO'}")
    d = out["d"]
    print(f"{'(d) copies per message, ' + str(opts.nodes) + ' daemons':40}{d['copies']:10.3f}"
          f"{'':18}{'1':>9}  {'yes' if abs(d['copies'] - 1) < 1e-9 else 'NO'}")
    st = out["a_batch"]
    print(f"\n(a) meshd subscriber: policy {opts.policy}, buffer {opts.buffer:,}; received "
          f"{am['received']:,} in {secs:g} s, dropped {am['dropped']:,} in the daemon; "
          f"publisher ran at {am['published_rate']:,.0f} msgs/s; "
          f"{st['broker_copies_out'] / max(st['broker_batches_out'], 1):.1f} copies per "
          f"link batch A->B")
    print(f"(a) NATS subscriber: received {an['received']:,} in {secs:g} s, dropped "
          f"{an['dropped']:,} (nats-py slow consumer); publisher ran at "
          f"{an['published_rate']:,.0f} msgs/s")
    print(f"(a) CPU us per delivered message: meshd {_cpus(am['cpu_us'])}; "
          f"NATS {_cpus(an['cpu_us'])}")
    print(f"(b) CPU us per call: meshd {_cpus(out['b_meshd_cpu'])}; "
          f"NATS {_cpus(out['b_nats_cpu'])}")
    print(f"(c) CPU us per publish: meshd {_cpus(out['c_meshd_cpu'])}; "
          f"JetStream {_cpus(out['c_nats_cpu'])}")
    print(f"(c') CPU us per publish: meshd {_cpus(out['c2_meshd_cpu'])}")
    print(f"(c) first / last second: meshd {cm['first']:,.0f} / {cm['last']:,.0f} per s "
          f"({cm['count']:,} published); JetStream {cn['first']:,.0f} / {cn['last']:,.0f} "
          f"per s ({cn['count']:,}); meshd group commits {out['c_commits']:,} "
          f"(~{cm['count'] / max(out['c_commits'], 1):.1f} publishes each)")
    print(f"(d) {n_wire} published, {d['received']} received; per message: copies out "
          f"{d['copies']:.3f}, copies in {d['copies_in']:.3f}, link batches "
          f"{d['batches']:.3f}")
    print(rpcbench.baseline_footer(out["baseline"], out["load_before"], took, CALLERS))
    report_e(out, None)


# --- (e) durable topics on NATS JetStream ---------------------------------------------------------

NATS_TOPIC = "bench.nats"


def nats_backed(root: Path, secs: float) -> dict[str, Any]:
    """(e): js.publish straight to a JetStream server, then meshd publishing to a topic on
    that same server (one daemon), in turn; CPU per publish of each process."""
    out: dict[str, Any] = {}
    with nats_server(root, jetstream=True) as (url, npid):
        cpu = CpuMeter({"nats-server": npid, "publisher": os.getpid()})
        out["nats"] = _jetstream(url, CALLERS, secs, stream="BENCHE")
        out["nats_cpu"] = cpu.per(out["nats"]["count"])
        print(f"(e) JetStream js.publish: {out['nats']['rate']:,.0f} acked publishes/s")
        (root / "meshd").mkdir()
        c = Cluster(root / "meshd")
        try:
            a = c.add("a")
            (root / "url").write_text(url)
            control(a.data_dir, "broker.topics.create", topic=NATS_TOPIC, durable=True,
                    backend="nats", url=url)
            cpu = CpuMeter({"daemon": a.proc.pid, "nats-server": npid,
                            "publisher": os.getpid()})
            out["meshd"] = trio.run(_meshd_durable, a.data_dir / "meshd.sock", CALLERS, secs,
                                    NATS_TOPIC)
            out["meshd_cpu"] = cpu.per(out["meshd"]["count"])
            stats = _stats(a)
            out["fast"] = stats.get("broker_nats_fast", 0)
            print(f"(e) meshd -> JetStream: {out['meshd']['rate']:,.0f} acked publishes/s")
        finally:
            c.close()
    return out


def report_e(out: dict[str, Any], took: float | None) -> None:
    e = out["e"]
    m, n = e["meshd"]["rate"], e["nats"]["rate"]
    ratio = m / n if n else float("inf")
    print(f"\n{'':40}{'meshd':>10}{'NATS':>10}{'ratio':>8}{'goal':>9}  holds")
    print(f"{'(e) acked publishes/s, NATS-backed topic':40}{m:10,.0f}{n:10,.0f}{ratio:8.2f}"
          f"{'>= 0.5':>9}  {'yes' if ratio >= 0.5 else 'NO'}")
    print(f"(e) CPU us per publish: meshd {_cpus(e['meshd_cpu'])}; "
          f"js.publish {_cpus(e['nats_cpu'])}; {e['meshd']['count']:,} published through "
          f"meshd ({e['fast']:,} on the fast path), {e['nats']['count']:,} by js.publish")
    if took is not None:
        print(rpcbench.baseline_footer(out["baseline"], out["load_before"], took, CALLERS))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

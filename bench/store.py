"""Store targets: `python bench/store.py [--seconds S] [--clients N]`.

1. Gossip Glomers 3d as a simulator workload (sim/scenarios/store-3d.toml: 25 nodes,
   100 ms links, 100 writes/s for 20 s): msgs_per_op, latency_p50_ms, latency_max_ms, with
   a 100 ms batch (3d) and a 500 ms batch (3e).
2. Anti-entropy: bytes exchanged to repair 100 differing keys out of 100,000, against the
   bytes of transferring the whole table.
3. Real servers started here on loopback (Debian's etcd-server and redis-server; installed
   with apt-get when missing and running as root), stopped after: write and read ops/s with
   the same harness (N concurrent clients, each looping for S seconds, 100-byte values)
   through the meshd SDK on one node, etcd's v3 JSON gateway over HTTP, and redis-py.
   Goals: meshd writes >= 1x etcd, meshd reads >= 0.5x Redis.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402
import trio  # noqa: E402

from meshd.hlc import HLC  # noqa: E402
from meshd.store import crdt  # noqa: E402
from meshd.store.replication import StoreReplicator  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402

VALUE = b"v" * 100


def sim(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "meshd_sim", "run", "store-3d", "--json", *args],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["metrics"]


def anti_entropy(total: int = 100_000, differing: int = 100) -> tuple[int, int]:
    clock = {"ms": 1000}
    names = ["a", "b"]
    reps = {n: StoreReplicator(n, HLC(n, lambda: clock["ms"]),
                               lambda n=n: [x for x in names if x != n], random.Random(n),
                               0.0) for n in names}
    for i in range(total):
        delta = {"lww": crdt.lww(reps["a"].hlc.now(), VALUE)}
        for r in reps.values():
            r.state.apply("db", "t", f"key-{i:06d}", delta)
    for i in random.Random(1).sample(range(total), differing):
        reps["a"].state.apply("db", "t", f"key-{i:06d}",
                              {"lww": crdt.lww(reps["a"].hlc.now(), b"new" + VALUE)})
    full = len(cbor2.dumps({"t": "fill", "e": [["db", "t", k, s] for k, s in
                                               reps["a"].state.tables[("db", "t")]
                                               .records.items()]}))
    sent = 0
    queue = [("a", "b", {"t": "roots", "roots": reps["a"].state.roots()})]
    while queue:
        src, dst, msg = queue.pop(0)
        sent += len(cbor2.dumps(msg))
        queue += [(dst, x, m) for x, m in reps[dst].receive(src, msg, 0.0)]
    assert reps["a"].state.roots() == reps["b"].state.roots()
    return sent, full


# --- the harness: N concurrent tasks in one client process, each looping for S seconds ------
# Every client runs in its natural event loop (the meshd SDK on trio, redis-py's asyncio
# client and a keep-alive HTTP/1.1 client for etcd on asyncio): same concurrency, same keys,
# same values, same clock.

def trio_harness(op_factory: Callable[[], Any], clients: int, seconds: float) -> float:
    async def main() -> float:
        op, close = await op_factory()
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal count
            n = 0
            while time.perf_counter() < deadline:
                await op(i * 1_000_000 + n)
                n += 1
                count += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(worker, i)
        rate = count / (time.perf_counter() - t0)
        await close()
        return rate
    return trio.run(main)


def asyncio_harness(op_factory: Callable[[], Any], clients: int, seconds: float) -> float:
    import asyncio

    async def main() -> float:
        ops = [await op_factory() for _ in range(clients)]
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal count
            n = 0
            op = ops[i][0]
            while time.perf_counter() < deadline:
                await op(i * 1_000_000 + n)
                n += 1
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(i) for i in range(clients)])
        rate = count / (time.perf_counter() - t0)
        for _, close in ops:
            await close()
        return rate
    return asyncio.run(main())


def meshd_ops(sock: Path, write: bool) -> Callable[[], Any]:
    async def factory() -> Any:
        from meshd_sdk import Store

        store = Store(addr=sock)

        async def op(n: int) -> None:
            key = f"k{n % 1000}"
            if write:
                await store.write(key, VALUE)
            else:
                await store.get(key)
        return op, store.aclose
    return factory


def etcd_ops(port: int, write: bool) -> Callable[[], Any]:
    async def factory() -> Any:
        import asyncio

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        value = base64.b64encode(VALUE).decode()

        async def op(n: int) -> None:
            key = base64.b64encode(f"k{n % 1000}".encode()).decode()
            body = json.dumps({"key": key, "value": value} if write else {"key": key}).encode()
            path = "/v3/kv/put" if write else "/v3/kv/range"
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"etcd answered {status!r}")

        async def close() -> None:
            writer.close()
        return op, close
    return factory


def redis_ops(port: int, write: bool) -> Callable[[], Any]:
    async def factory() -> Any:
        import redis.asyncio as aredis

        r = aredis.Redis(host="127.0.0.1", port=port)

        async def op(n: int) -> None:
            key = f"k{n % 1000}"
            if write:
                await r.set(key, VALUE)
            else:
                await r.get(key)
        return op, r.aclose
    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def ensure_servers() -> bool:
    if shutil.which("etcd") and shutil.which("redis-server"):
        return True
    if os.geteuid() != 0:
        print("etcd-server and redis-server are not installed (apt-get install etcd-server "
              "redis-server); skipping the comparison")
        return False
    subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server", "redis-server"],
                   check=False, capture_output=True)
    return bool(shutil.which("etcd") and shutil.which("redis-server"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    opts = ap.parse_args()

    d3 = sim("--set", "store_batch_interval=0.1")
    d3e = sim("--set", "store_batch_interval=0.5")
    print(f"3d (100 ms batches): {d3['msgs_per_op']} msgs/op, p50 {d3['latency_p50_ms']} ms, "
          f"max {d3['latency_max_ms']} ms  (goals < 30, < 400 ms, < 600 ms)")
    print(f"3e (500 ms batches): {d3e['msgs_per_op']} msgs/op, p50 {d3e['latency_p50_ms']} ms, "
          f"max {d3e['latency_max_ms']} ms  (goals < 20, < 1000 ms, < 2000 ms)", flush=True)
    sent, full = anti_entropy()
    print(f"anti-entropy, 100 of 100,000 keys differ: {sent} bytes vs {full} for the whole "
          f"table = {100 * sent / full:.2f}% (goal < 2%)", flush=True)

    if not ensure_servers():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        etcd_port, redis_port = free_port(), free_port()
        peer_port = free_port()
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", str(root / "etcd"), "--listen-client-urls",
             f"http://127.0.0.1:{etcd_port}", "--advertise-client-urls",
             f"http://127.0.0.1:{etcd_port}", "--listen-peer-urls",
             f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer_port}", "--initial-cluster",
             f"default=http://127.0.0.1:{peer_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster = Cluster(root)
        try:
            wait_port(etcd_port)
            wait_port(redis_port)
            node = cluster.add("bench", profile="lan")
            sock = node.data_dir / "meshd.sock"
            c, s = opts.clients, opts.seconds
            results = {
                "meshd write": trio_harness(meshd_ops(sock, True), c, s),
                "etcd write": asyncio_harness(etcd_ops(etcd_port, True), c, s),
                "redis write": asyncio_harness(redis_ops(redis_port, True), c, s),
                "meshd read": trio_harness(meshd_ops(sock, False), c, s),
                "etcd read": asyncio_harness(etcd_ops(etcd_port, False), c, s),
                "redis read": asyncio_harness(redis_ops(redis_port, False), c, s),
            }
        finally:
            cluster.close()
            etcd.terminate()
            redis_proc.terminate()
            etcd.wait(10)
            redis_proc.wait(10)
    print(f"\n{opts.clients} concurrent clients, {opts.seconds:g} s each, 100-byte values, "
          "1,000 keys")
    for name, ops in results.items():
        print(f"  {name:12} {ops:9.0f} ops/s")
    print(f"meshd writes / etcd writes: {results['meshd write'] / results['etcd write']:.2f} "
          "(goal >= 1)")
    print(f"meshd reads / redis reads:  {results['meshd read'] / results['redis read']:.2f} "
          "(goal >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Store targets: `python bench/store.py [--seconds S] [--clients N] [--quick] [--json]`.

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
4. Store databases on engines (issue 21): a real PostgreSQL and a real Redis started as the
   tests start them (tests/integration/engine_servers.py), one meshd daemon with database
   `bench_pg` bound to PostgreSQL and `bench_redis` to Redis (`store.databases.create`).
   For each engine, in the same run and in turn (meshd, then direct, per operation):
   writes/s and reads/s of 100-byte values over 1,000 keys (all written before any
   measurement, so every read finds its key), 32 concurrent callers for S seconds, through
   the meshd SDK vs the engine's own Python client doing the equivalent operation directly.
   Goals: PostgreSQL writes and reads >= 0.5x, Redis writes and reads >= 0.5x.
   - meshd: `meshd_sdk.Store(database, table, addr=socket)`, 32 trio tasks sharing one
     Store (the SDK pipelines every caller over one multiplexed control connection);
     `store.write(key, value)` and `store.read(key)`. The daemon runs the engine's blocking
     client (psycopg / redis-py) in worker threads, 16 connections (store.engine_pool).
   - direct, the fairest counterpart: the engine's asyncio client, 32 asyncio tasks sharing
     one pool of 16 connections (as many as meshd's engine pool): psycopg's
     AsyncConnectionPool (autocommit; psycopg prepares repeated statements on both sides)
     and redis.asyncio with a BlockingConnectionPool. asyncio rather than blocking clients in
     32 threads because meshd's SDK also serves its 32 callers from one event loop; the
     equivalent operation is what an application using the engine itself would send:
       PostgreSQL write: INSERT ... ON CONFLICT (db, tbl, key) DO UPDATE of the value,
         metadata, expiry, version and writer into `bench_direct`, a table with the columns,
         collation and primary key of meshd's `meshd_kv` (without its NOTIFY trigger, which
         meshd's watches need: part of what meshd costs); read: SELECT those columns by
         primary key.
       Redis write: HSET of a hash with the fields meshd keeps (v, m, w, c, b); read:
         HGETALL. (meshd's write is one Lua script that also keeps the table index and
         publishes the change; its read is a MULTI of HGETALL, HGET, SMEMBERS.)
   Also CPU microseconds per operation of each process (/proc, over the window): the
   daemon, the engine server (every PostgreSQL process; redis-server) and the client (this
   process): rates swing between runs on a shared machine, CPU per operation much less.
5. `--keys N` (alone: only the host baseline and this): the embedded store holding N keys
   (issue 22; goals at N = 1,000,000: the daemon's RSS < 300 MB, reads >= 0.5x Redis). One
   daemon on loopback (lan profile, default store.cache_bytes); its RSS (VmRSS) before,
   after writing N keys of 100-byte values (LOAD_CALLERS concurrent store.write calls
   through one SDK connection: group commit makes that the fastest path), and after a
   restart (digests rebuilt from store.db); store.db's size. Then reads of random keys
   against a redis-server on loopback holding the same N keys (redis-py's asyncio client),
   same harness as 3: "hot" (1,000 keys, which the cache holds) and "cold" (uniform over
   all N keys: almost every read misses the cache and asks SQLite); ROUNDS alternating
   windows of each (meshd, redis, meshd, ...: a shared host's load swings within minutes),
   the median of the per-round ratios, and the daemon's CPU microseconds per read.
   `--prefill`: write store.db directly (StoreDB.save, in batches, before the daemon
   starts) instead of through the daemon, to measure the reads without the long load.
Host baseline: trio TCP echo at 32 callers (bench/rpc.py) and the load average, printed
first and again at the end, so slow days are visible.
Flags: --keys N (5 only), --seconds S (default 5) per measurement, --quick (1 s windows),
--engines-only (the host baseline and 4 only), --json (the results as one JSON document on
stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import cbor2  # noqa: E402
import rpc as rpcbench  # noqa: E402  (bench/rpc.py: the host baseline)
import trio  # noqa: E402

from meshd.hlc import HLC  # noqa: E402
from meshd.store import crdt  # noqa: E402
from meshd.store.engines.postgres import TABLE_SQL  # noqa: E402
from meshd.store.replication import StoreReplicator  # noqa: E402
from tests.integration.cluster import Cluster, Daemon, control  # noqa: E402
from tests.integration.engine_servers import postgres as postgres_server  # noqa: E402
from tests.integration.engine_servers import redis as redis_server  # noqa: E402
from tests.integration.engine_servers import why_no_postgres, why_no_redis  # noqa: E402

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


def etcd_redis(clients: int, seconds: float) -> dict[str, float] | None:
    """3: meshd (embedded store) against etcd and Redis; None when they are not installed."""
    if not ensure_servers():
        return None
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
        redis_proc = start_redis(redis_port, root)
        cluster = Cluster(root)
        try:
            wait_port(etcd_port)
            wait_port(redis_port)
            node = cluster.add("bench", profile="lan")
            sock = node.data_dir / "meshd.sock"
            c, s = clients, seconds
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
    print(f"\n{clients} concurrent clients, {seconds:g} s each, 100-byte values, 1,000 keys")
    for name, ops in results.items():
        print(f"  {name:12} {ops:9.0f} ops/s")
    print(f"meshd writes / etcd writes: {results['meshd write'] / results['etcd write']:.2f} "
          "(goal >= 1)")
    print(f"meshd reads / redis reads:  {results['meshd read'] / results['redis read']:.2f} "
          "(goal >= 0.5)", flush=True)
    return results


# --- 5. the embedded store holding many keys (issue 22) -----------------------------------------

LOAD_CALLERS = 256
HOT_KEYS = 1000
ROUNDS = 3
RSS_GOAL_MB = 300


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def big_key(i: int) -> str:
    return f"key-{i:07d}"


def load_meshd(sock: Path, keys: int) -> float:
    """Write `keys` keys through the SDK (LOAD_CALLERS concurrent writes); seconds."""
    async def main() -> float:
        from meshd_sdk import Store

        store = Store(addr=sock)
        nxt = 0
        t0 = time.perf_counter()
        last = t0

        async def worker() -> None:
            nonlocal nxt, last
            while nxt < keys:
                i = nxt
                nxt += 1
                await store.write(big_key(i), VALUE)
                if i % 100_000 == 0 and i and time.perf_counter() - last > 1:
                    last = time.perf_counter()
                    print(f"  {i:,} keys written, {i / (last - t0):,.0f}/s", flush=True)

        async with trio.open_nursery() as nursery:
            for _ in range(LOAD_CALLERS):
                nursery.start_soon(worker)
        took = time.perf_counter() - t0
        await store.aclose()
        return took
    return trio.run(main)


def prefill(data_dir: Path, keys: int) -> float:
    """Write `keys` keys into data_dir/store.db as a daemon would have; seconds."""
    from meshd.store.persist import FILE, StoreDB
    from meshd.store.records import key_hash

    t0 = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    db = StoreDB(data_dir / FILE)
    try:
        wall = int(time.time() * 1000)
        for start in range(0, keys, 20_000):
            rows = []
            for i in range(start, min(keys, start + 20_000)):
                state = {"lww": crdt.lww((wall, i, "bench"), VALUE)}
                rows.append(("default", "store", big_key(i), state, key_hash(big_key(i), state)))
            db.save(rows)
    finally:
        db.close()
    return time.perf_counter() - t0


def load_redis(port: int, keys: int) -> None:
    import redis as redis_py

    r = redis_py.Redis(host="127.0.0.1", port=port)
    try:
        for start in range(0, keys, 10_000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(keys, start + 10_000)):
                pipe.set(big_key(i), VALUE)
            pipe.execute()
    finally:
        r.close()


def pick(keys: int, hot: bool) -> Callable[[int], str]:
    """The key of a caller's n-th read: random over HOT_KEYS or over all `keys`."""
    rng = random.Random(7)
    span = min(HOT_KEYS, keys) if hot else keys
    table = [rng.randrange(span) for _ in range(1 << 16)]
    return lambda n: big_key(table[(n * 7919) % len(table)])


def meshd_reads(sock: Path, key_of: Callable[[int], str]) -> Callable[[], Any]:
    async def factory() -> Any:
        from meshd_sdk import Store

        store = Store(addr=sock)

        async def op(n: int) -> None:
            if await store.get(key_of(n)) != VALUE:
                raise AssertionError(f"meshd read of {key_of(n)}")
        return op, store.aclose
    return factory


def redis_reads(port: int, key_of: Callable[[int], str]) -> Callable[[], Any]:
    async def factory() -> Any:
        import redis.asyncio as aredis

        r = aredis.Redis(host="127.0.0.1", port=port)

        async def op(n: int) -> None:
            if await r.get(key_of(n)) != VALUE:
                raise AssertionError(f"redis read of {key_of(n)}")
        return op, r.aclose
    return factory


def many_keys(keys: int, clients: int, seconds: float, direct: bool = False
              ) -> dict[str, Any] | None:
    """5: one daemon holding `keys` keys: RSS, and reads against Redis (see the docstring)."""
    if not shutil.which("redis-server"):
        print("5. skipped: redis-server is not installed (apt-get install redis-server)")
        return None
    out: dict[str, Any] = {"keys": keys, "load_callers": LOAD_CALLERS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis_port = free_port()
        redis_proc = start_redis(redis_port, root)
        cluster = Cluster(root)
        try:
            wait_port(redis_port)
            node = Daemon(root, "bench", cluster.secret, profile="lan")
            cluster.daemons["bench"] = node
            out["prefilled"] = direct
            if direct:
                out["prefill_seconds"] = prefill(node.data_dir, keys)
                print(f"5. store.db prefilled with {keys:,} keys in "
                      f"{out['prefill_seconds']:.0f} s", flush=True)
            node.start()
            assert node.proc is not None
            sock = node.data_dir / "meshd.sock"
            time.sleep(2)  # let the daemon settle (its components start)
            out["rss_before_kib"] = rss_kib(node.proc.pid)
            if not direct:
                print(f"5. daemon RSS before: {out['rss_before_kib'] / 1024:.1f} MB; writing "
                      f"{keys:,} keys of {len(VALUE)} bytes", flush=True)
                out["load_seconds"] = load_meshd(sock, keys)
            time.sleep(2)
            out["rss_loaded_kib"] = rss_kib(node.proc.pid)
            out["store_db_bytes"] = sum(p.stat().st_size for p in node.data_dir.glob("store.db*"))
            if not direct:
                took = out["load_seconds"]
                print(f"   {keys:,} keys in {took:.0f} s ({keys / took:,.0f}/s); RSS "
                      f"{out['rss_loaded_kib'] / 1024:.1f} MB; store.db "
                      f"{out['store_db_bytes'] / 1e6:.0f} MB", flush=True)
            node.stop()  # SIGKILL: what was acknowledged is on disk
            t0 = time.perf_counter()
            node.start()
            out["restart_seconds"] = time.perf_counter() - t0
            time.sleep(2)
            out["rss_restarted_kib"] = rss_kib(node.proc.pid)
            print(f"   restarted in {out['restart_seconds']:.1f} s; RSS "
                  f"{out['rss_restarted_kib'] / 1024:.1f} MB", flush=True)
            load_redis(redis_port, keys)
            for kind in ("hot", "cold"):
                key_of = pick(keys, kind == "hot")
                rounds = []
                for _ in range(ROUNDS):
                    cpu0 = _cpu_seconds(node.proc.pid)
                    t0 = time.perf_counter()
                    m = trio_harness(meshd_reads(sock, key_of), clients, seconds)
                    cpu_us = (_cpu_seconds(node.proc.pid) - cpu0) * 1e6 / (
                        m * (time.perf_counter() - t0))
                    r = asyncio_harness(redis_reads(redis_port, key_of), clients, seconds)
                    rounds.append({"meshd": m, "redis": r, "ratio": m / r,
                                   "daemon_cpu_us": cpu_us})
                    print(f"   {kind} reads: meshd {m:,.0f}/s ({cpu_us:.0f} us daemon CPU "
                          f"per read), redis {r:,.0f}/s: {m / r:.2f}x", flush=True)
                ratios = sorted(x["ratio"] for x in rounds)
                out[f"{kind} reads"] = {"rounds": rounds, "ratio": ratios[len(ratios) // 2]}
            out["rss_after_reads_kib"] = rss_kib(node.proc.pid)
            out["redis_rss_kib"] = rss_kib(redis_proc.pid)
        finally:
            cluster.close()
            redis_proc.terminate()
            redis_proc.wait(10)
    return out


def report_many_keys(res: dict[str, Any] | None, clients: int, seconds: float) -> None:
    if res is None:
        return
    n = res["keys"]
    grown = res["rss_loaded_kib"] - res["rss_before_kib"]
    peak_mb = max(res["rss_loaded_kib"], res["rss_restarted_kib"],
                  res["rss_after_reads_kib"]) / 1024
    print(f"\n5. the embedded store with {n:,} keys of {len(VALUE)}-byte values, one daemon")
    if res["prefilled"]:
        print(f"  store.db prefilled directly ({res['prefill_seconds']:.0f} s); RSS at start / "
              f"after a restart / after the reads: {res['rss_before_kib'] / 1024:.1f} / "
              f"{res['rss_restarted_kib'] / 1024:.1f} / "
              f"{res['rss_after_reads_kib'] / 1024:.1f} MB")
    else:
        print(f"  RSS before / after writing / after a restart / after the reads: "
              f"{res['rss_before_kib'] / 1024:.1f} / {res['rss_loaded_kib'] / 1024:.1f} / "
              f"{res['rss_restarted_kib'] / 1024:.1f} / "
              f"{res['rss_after_reads_kib'] / 1024:.1f} MB ({grown * 1024 / n:.1f} bytes "
              f"per key written); written in {res['load_seconds']:.0f} s "
              f"({n / res['load_seconds']:,.0f} writes/s, {LOAD_CALLERS} concurrent)")
    print(f"  goal RSS < {RSS_GOAL_MB} MB: {'yes' if peak_mb < RSS_GOAL_MB else 'NO'} "
          f"(peak {peak_mb:.0f} MB); store.db {res['store_db_bytes'] / n:.0f} bytes per key; "
          f"restart {res['restart_seconds']:.1f} s; redis-server RSS "
          f"{res['redis_rss_kib'] / 1024:.0f} MB")
    for kind in ("hot", "cold"):
        r = res[f"{kind} reads"]
        rounds = ", ".join(f"{x['meshd']:,.0f}/{x['redis']:,.0f} ({x['daemon_cpu_us']:.0f} us)"
                           for x in r["rounds"])
        print(f"  {kind} reads ({clients} clients, {ROUNDS} x {seconds:g} s each), meshd/redis "
              f"per s (daemon CPU per read): {rounds}; median ratio {r['ratio']:.2f}x "
              f"(goal >= 0.5: {'yes' if r['ratio'] >= 0.5 else 'NO'})")


# --- 4. store databases on engines (issue 21) ---------------------------------------------------

CALLERS = 32
KEYS = 1000
POOL = 16  # connections: meshd's engine pool (store.engine_pool) and the direct clients'
TABLE = "bench"
GOAL = 0.5
ENGINE_DBS = {"postgres": "bench_pg", "redis": "bench_redis"}
ENGINE_NAMES = {"postgres": "PostgreSQL", "redis": "Redis"}
OPS = ("write", "read")

# meshd_kv's columns, collation and primary key (the engine's own table definition),
# without its NOTIFY trigger
PG_DIRECT_SCHEMA = TABLE_SQL.replace("meshd_kv", "bench_direct")
PG_DIRECT_WRITE = (
    "INSERT INTO bench_direct (db, tbl, key, value, metadata, expiry, ver_wall, ver_count, "
    "written_by) VALUES (%(db)s, %(tbl)s, %(key)s, %(value)s, %(meta)s, %(expiry)s, "
    "%(wall)s, %(count)s, %(by)s) ON CONFLICT (db, tbl, key) DO UPDATE SET "
    "value = excluded.value, metadata = excluded.metadata, expiry = excluded.expiry, "
    "ver_wall = excluded.ver_wall, ver_count = excluded.ver_count, "
    "written_by = excluded.written_by")
PG_DIRECT_READ = (
    "SELECT key, value, metadata, expiry, ver_wall, ver_count, written_by, counter, members "
    "FROM bench_direct WHERE db = %(db)s AND tbl = %(tbl)s AND key = %(key)s")

Op = Callable[[str], Awaitable[Any]]
RunAll = Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]]


def _key(i: int, n: int, callers: int) -> str:
    """Caller i's n-th key: the callers interleave over the keys, so two of them rarely ask
    for one key at once (no row-lock waits in PostgreSQL), and every key is visited."""
    return f"k{(n * callers + i) % KEYS}"


def _cpu_seconds(pid: int) -> float:
    try:
        return rpcbench._cpu_seconds(pid)
    except (OSError, IndexError):
        return 0.0


def _children(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """CPU microseconds per operation of named groups of processes over a window, from
    /proc (a group's processes are listed at both ends: PostgreSQL's backends come and go)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}

    def _snap(self) -> dict[str, dict[int, float]]:
        return {name: {pid: _cpu_seconds(pid) for pid in pids()}
                for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._snap()

    def per_op(self, ops: int) -> dict[str, float]:
        end = self._snap()
        return {name: sum(t - self._start[name].get(pid, 0.0) for pid, t in now.items())
                * 1e6 / max(ops, 1) for name, now in end.items()}


async def _trio_all(fns: list[Callable[[], Awaitable[None]]]) -> None:
    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(fn)


async def _asyncio_all(fns: list[Callable[[], Awaitable[None]]]) -> None:
    await asyncio.gather(*(fn() for fn in fns))


async def _window(op: Op, fill: Op | None, callers: int, seconds: float, meter: CpuMeter,
                  run_all: RunAll) -> dict[str, Any]:
    """Write every key once with `fill` (when given), warm up, then `callers` workers
    calling `op` for `seconds`: ops/s, count, CPU microseconds per op of each process."""
    if fill is not None:
        async def filler(i: int) -> None:
            for k in range(i, KEYS, callers):
                await fill(f"k{k}")
        await run_all([lambda i=i: filler(i) for i in range(callers)])

    async def warm(i: int) -> None:
        for n in range(8):
            await op(_key(i, n, callers))
    await run_all([lambda i=i: warm(i) for i in range(callers)])

    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal count
        n = 0
        while time.perf_counter() < deadline:
            await op(_key(i, n, callers))
            n += 1
            count += 1

    meter.start()
    start = time.perf_counter()
    await run_all([lambda i=i: worker(i) for i in range(callers)])
    took = time.perf_counter() - start
    return {"rate": count / took, "count": count, "seconds": took,
            "cpu_us": meter.per_op(count)}


async def _meshd_phase(sock: Path, db: str, which: str, callers: int, seconds: float,
                       meter: CpuMeter) -> dict[str, Any]:
    from meshd_sdk import Store

    store = Store(database=db, table=TABLE, addr=sock)

    async def write(key: str) -> None:
        await store.write(key, VALUE)

    async def read(key: str) -> None:
        rows = await store.read(key)
        if not rows or rows[0].get("value") != VALUE:
            raise AssertionError(f"meshd read of {key} in {db}: {rows!r}")

    try:
        return await _window(write if which == "write" else read,
                             write if which == "write" else None, callers, seconds, meter,
                             _trio_all)
    finally:
        await store.aclose()


async def _postgres_phase(url: str, which: str, callers: int, seconds: float,
                          meter: CpuMeter) -> dict[str, Any]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=POOL, max_size=POOL, open=False,
                               kwargs={"autocommit": True})
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await conn.execute(PG_DIRECT_SCHEMA)

        async def write(key: str) -> None:
            async with pool.connection() as conn:
                await conn.execute(PG_DIRECT_WRITE, {
                    "db": "bench_direct", "tbl": TABLE, "key": key, "value": VALUE,
                    "meta": "{}", "expiry": None, "wall": int(time.time() * 1000),
                    "count": 0, "by": "bench"})

        async def read(key: str) -> None:
            async with pool.connection() as conn:
                cur = await conn.execute(PG_DIRECT_READ, {"db": "bench_direct", "tbl": TABLE,
                                                          "key": key})
                row = await cur.fetchone()
            if row is None or bytes(row[1]) != VALUE:
                raise AssertionError(f"psycopg read of {key}: {row!r}")

        return await _window(write if which == "write" else read,
                             write if which == "write" else None, callers, seconds, meter,
                             _asyncio_all)
    finally:
        await pool.close()


async def _redis_phase(url: str, which: str, callers: int, seconds: float,
                       meter: CpuMeter) -> dict[str, Any]:
    import redis.asyncio as aredis

    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=POOL)
    r = aredis.Redis(connection_pool=pool)
    try:
        async def write(key: str) -> None:
            await r.hset(f"bench:{key}", mapping={
                "v": VALUE, "m": b"{}", "w": int(time.time() * 1000), "c": 0, "b": b"bench"})

        async def read(key: str) -> None:
            got = await r.hgetall(f"bench:{key}")
            if got.get(b"v") != VALUE:
                raise AssertionError(f"redis-py read of {key}: {got!r}")

        return await _window(write if which == "write" else read,
                             write if which == "write" else None, callers, seconds, meter,
                             _asyncio_all)
    finally:
        await r.aclose()
        await pool.aclose()


def _postgres_pids(url: str) -> Callable[[], list[int]]:
    """Every process of the PostgreSQL server at `url` (the postmaster and its children)."""
    import psycopg

    with psycopg.connect(url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    stat = Path(f"/proc/{backend}/stat").read_text()
    postmaster = int(stat.rsplit(")", 1)[1].split()[1])
    return lambda: [postmaster, *_children(postmaster)]


def _redis_pids(url: str) -> Callable[[], list[int]]:
    import redis as redis_py

    r = redis_py.Redis.from_url(url)
    try:
        pid = int(r.info("server")["process_id"])
    finally:
        r.close()
    return lambda: [pid]


def engines(root: Path, callers: int, seconds: float) -> dict[str, Any]:
    """4: per engine and operation, meshd then direct, in one run (see the docstring)."""
    why = why_no_postgres() or why_no_redis()
    if why is not None:
        print(f"4. skipped: {why}")
        return {"skipped": why}
    out: dict[str, Any] = {}
    with postgres_server(root / "postgres") as pg, redis_server(root / "redis") as rd:
        (root / "meshd").mkdir()
        cluster = Cluster(root / "meshd")
        try:
            node = cluster.add("bench")
            assert node.proc is not None
            daemon = node.proc.pid
            sock = node.data_dir / "meshd.sock"
            urls = {"postgres": pg.url, "redis": rd.url}
            for backend, db in ENGINE_DBS.items():
                control(node.data_dir, "store.databases.create", database=db,
                        backend=backend, dsn=urls[backend])
            server_pids = {"postgres": _postgres_pids(pg.url), "redis": _redis_pids(rd.url)}
            direct = {"postgres": _postgres_phase, "redis": _redis_phase}
            me = os.getpid()
            for backend in ENGINE_DBS:
                meter = CpuMeter({"daemon": lambda: [daemon], backend: server_pids[backend],
                                  "client": lambda: [me]})
                for which in OPS:
                    m = trio.run(_meshd_phase, sock, ENGINE_DBS[backend], which, callers,
                                 seconds, meter)
                    d = asyncio.run(direct[backend](urls[backend], which, callers, seconds,
                                                    meter))
                    out[f"{backend} {which}"] = {"meshd": m, "direct": d,
                                                 "ratio": m["rate"] / max(d["rate"], 1e-9)}
                    print(f"4. {ENGINE_NAMES[backend]} {which}s: meshd {m['rate']:,.0f}/s, "
                          f"direct {d['rate']:,.0f}/s", flush=True)
            out["daemon_pid"] = daemon
        finally:
            cluster.close()
    return out


def _cpus(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())


def report_engines(res: dict[str, Any], callers: int, seconds: float) -> None:
    if "skipped" in res:
        return
    print(f"\n4. store databases on engines: {callers} concurrent callers, {seconds:g} s "
          f"each, 100-byte values, {KEYS:,} keys; meshd SDK vs the engine's own asyncio "
          f"client ({POOL} connections)")
    print(f"{'':22}{'meshd/s':>10}{'direct/s':>10}{'ratio':>8}{'goal':>9}  holds")
    for backend in ENGINE_DBS:
        for which in OPS:
            r = res[f"{backend} {which}"]
            print(f"{ENGINE_NAMES[backend] + ' ' + which + 's':22}{r['meshd']['rate']:10,.0f}"
                  f"{r['direct']['rate']:10,.0f}{r['ratio']:8.2f}{'>= ' + str(GOAL):>9}  "
                  f"{'yes' if r['ratio'] >= GOAL else 'NO'}")
    print("CPU us per operation (daemon, engine server, client process):")
    for backend in ENGINE_DBS:
        for which in OPS:
            r = res[f"{backend} {which}"]
            print(f"  {ENGINE_NAMES[backend] + ' ' + which + 's':20} meshd: "
                  f"{_cpus(r['meshd']['cpu_us'])}; direct: {_cpus(r['direct']['cpu_us'])}")


def start_redis(port: int, root: Path) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:port with no persistence, its files under root."""
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients in 3")
    ap.add_argument("--callers", type=int, default=CALLERS, help="concurrent callers in 4")
    ap.add_argument("--quick", action="store_true", help="1 s windows (a smoke run)")
    ap.add_argument("--keys", type=int, default=0,
                    help="5 only: the embedded store holding this many keys (1000000)")
    ap.add_argument("--prefill", action="store_true",
                    help="with --keys: write store.db directly, not through the daemon")
    ap.add_argument("--engines-only", action="store_true",
                    help="the host baseline and 4 (PostgreSQL and Redis engines) only")
    ap.add_argument("--json", action="store_true",
                    help="the results as JSON on stdout (the human output goes to stderr)")
    opts = ap.parse_args()
    secs = 1.0 if opts.quick else opts.seconds
    stdout = sys.stdout
    human = contextlib.redirect_stdout(sys.stderr) if opts.json else contextlib.nullcontext()
    started = time.monotonic()
    out: dict[str, Any] = {"seconds": secs, "callers": opts.callers,
                           "load_before": os.getloadavg()[0]}
    with human:
        out["baseline"] = rpcbench.host_baseline(CALLERS, min(secs, 3.0))[0]
        if opts.keys:
            out["many_keys"] = many_keys(opts.keys, opts.clients, secs, opts.prefill)
            out["took"] = time.monotonic() - started
            report_many_keys(out["many_keys"], opts.clients, secs)
            print(rpcbench.baseline_footer(out["baseline"], out["load_before"], out["took"],
                                           CALLERS))
        elif not opts.engines_only:
            d3 = sim("--set", "store_batch_interval=0.1")
            d3e = sim("--set", "store_batch_interval=0.5")
            print(f"3d (100 ms batches): {d3['msgs_per_op']} msgs/op, p50 "
                  f"{d3['latency_p50_ms']} ms, max {d3['latency_max_ms']} ms  (goals < 30, "
                  "< 400 ms, < 600 ms)")
            print(f"3e (500 ms batches): {d3e['msgs_per_op']} msgs/op, p50 "
                  f"{d3e['latency_p50_ms']} ms, max {d3e['latency_max_ms']} ms  (goals < 20, "
                  "< 1000 ms, < 2000 ms)", flush=True)
            sent, full = anti_entropy()
            print(f"anti-entropy, 100 of 100,000 keys differ: {sent} bytes vs {full} for the "
                  f"whole table = {100 * sent / full:.2f}% (goal < 2%)", flush=True)
            out["sim_3d"], out["sim_3e"] = d3, d3e
            out["anti_entropy"] = {"sent": sent, "full": full}
            out["etcd_redis"] = etcd_redis(opts.clients, secs)
        if not opts.keys:
            with tempfile.TemporaryDirectory() as tmp:
                out["engines"] = engines(Path(tmp), opts.callers, secs)
            took = time.monotonic() - started
            out["took"] = took
            report_engines(out["engines"], opts.callers, secs)
            print(rpcbench.baseline_footer(out["baseline"], out["load_before"], took, CALLERS))
        out["load_after"] = os.getloadavg()[0]
    if opts.json:
        print(json.dumps(out, indent=2, default=str), file=stdout)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

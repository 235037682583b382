"""Added latency of one relay hop: `python bench/relay.py` (root: uses network namespaces).

Three hosts in namespaces on one bridge; iptables blocks h0 <-> h2, so h0 reaches h2 through
h1. The same echo service runs on h1 and h2; the p50 of calls h0 -> h1 (direct) and
h0 -> h2 (through h1, end-to-end encrypted) differ by what the relay hop adds.
Goal: the p50 added by one relay hop <= 25% of the direct call's p50 (a ratio, so it holds
on slow and fast hosts alike; the absolute goal was < 0.5 ms). `--rounds N` alternates the
two measurements N times (direct, relayed, direct, ...) and reports the median of each, so
a burst of load on a shared host hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from tests.integration.cluster import Cluster, Daemon, control, wait_for  # noqa: E402
from tests.integration.netns import Hosts, why_not_available  # noqa: E402

CALLS = 2000
GOAL = 0.25  # the relay hop's p50 over the direct call's p50, at most


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate direct and relayed measurements this many times")
    ap.add_argument("--calls", type=int, default=CALLS, help="calls per measurement")
    opts = ap.parse_args()
    reason = why_not_available()
    if reason:
        print(f"not measured: {reason}")
        return 0
    from meshd_sdk import Client

    hosts = Hosts(3, net=202)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            env = {"MESHD_MEMBERSHIP_PROBE_INTERVAL": "0.3"}
            d: dict[int, Daemon] = {}
            for i in (1, 0, 2):
                d[i] = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i),
                              env=env)
                cluster.daemons[d[i].name] = d[i]
                d[i].start(join=[f"{hosts.ips[1]}:7946"] if i != 1 else None,
                           bind=f"{hosts.ips[i]}:7946")
            hosts.block(0, 2)
            for i in (1, 2):
                cluster.service(d[i], f"echo{i}")

            def routed() -> bool:
                routes = {r["destination"]: r for r in control(d[0].data_dir, "routes")}
                return routes.get("h2", {}).get("path") == ["h0", "h1", "h2"]

            wait_for(routed, 60, "route through h1")
            wait_for(lambda: len(control(d[0].data_dir, "services")) == 2, 20, "services")

            async def p50(service: str) -> float:
                lat = []
                async with Client(d[0].data_dir / "meshd.sock") as client:
                    for _ in range(100):
                        await client.call(service, "Test.Echo", {"text": "x"})
                    for _ in range(opts.calls):
                        t0 = time.perf_counter()
                        await client.call(service, "Test.Echo", {"text": "x"})
                        lat.append(time.perf_counter() - t0)
                return statistics.median(lat) * 1000

            directs, relayeds = [], []
            cpu: dict[str, list[float]] = {"echo1": [], "echo2": []}

            def measure(service: str) -> float:
                before = [_cpu_seconds(d[i].proc.pid) for i in (0, 1, 2)]
                p = trio.run(p50, service)
                cpu[service].append(sum(_cpu_seconds(d[i].proc.pid) - before[n]
                                        for n, i in enumerate((0, 1, 2))))
                return p

            for _ in range(max(1, opts.rounds)):
                directs.append(measure("echo1"))
                relayeds.append(measure("echo2"))
            fast = {i: control(d[i].data_dir, "status")["stats"] for i in (0, 2)}
        finally:
            cluster.close()
            hosts.close()
    direct, relayed = statistics.median(directs), statistics.median(relayeds)
    if len(directs) > 1:
        print("rounds (direct / relayed ms): " + ", ".join(
            f"{d:.3f} / {r:.3f}" for d, r in zip(directs, relayeds, strict=True)))
    print(f"RPC p50 from h0: to h1 (direct) {direct:.3f} ms, to h2 (through h1) "
          f"{relayed:.3f} ms")
    calls = opts.calls + 100
    print("CPU ms per call, the three daemons together: direct "
          f"{statistics.median(cpu['echo1']) * 1000 / calls:.3f}, relayed "
          f"{statistics.median(cpu['echo2']) * 1000 / calls:.3f}; calls taken by the fast "
          f"paths: h0 {fast[0].get('rpc_fast_calls', 0)} of {fast[0].get('rpc_calls', 0)}")
    added = relayed - direct
    ratio = added / direct
    print(f"added by one relay hop: {added:.3f} ms = {ratio:.0%} of the direct call "
          f"(goal <= {GOAL:.0%}: {'yes' if ratio <= GOAL else 'no'})")
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())

"""Added latency of one relay hop: `python bench/relay.py` (root: uses network namespaces).

Three hosts in namespaces on one bridge; iptables blocks h0 <-> h2, so h0 reaches h2 through
h1. The same echo service runs on h1 and h2; the p50 of calls h0 -> h1 (direct) and
h0 -> h2 (through h1, end-to-end encrypted) differ by what the relay hop adds.
Goal: p50 added per relay hop < 0.5 ms.
"""

from __future__ import annotations

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


def main() -> int:
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
                    for _ in range(CALLS):
                        t0 = time.perf_counter()
                        await client.call(service, "Test.Echo", {"text": "x"})
                        lat.append(time.perf_counter() - t0)
                return statistics.median(lat) * 1000

            direct = trio.run(p50, "echo1")
            relayed = trio.run(p50, "echo2")
        finally:
            cluster.close()
            hosts.close()
    print(f"RPC p50 from h0: to h1 (direct) {direct:.3f} ms, to h2 (through h1) "
          f"{relayed:.3f} ms")
    print(f"added by one relay hop: {relayed - direct:.3f} ms (goal < 0.5 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

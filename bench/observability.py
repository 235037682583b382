"""What observability costs: `python bench/observability.py [--seconds S] [--rounds R]`.

Issue 15's targets, measured side by side in one run:
  calls/s with metrics and tracing on, at the default sampling (debug.trace_sample 0.1) and
  at 1.0, within 5% of calls/s with both off (debug.tracing false, no metrics listener;
  calls are counted for `meshd stats` in every configuration: that is not optional), for
  (c) SDK -> daemon A -> daemon B -> service and (d) SDK -> daemon -> service, 32 callers
  (bench/rpc.py's cases and echo service). With metrics on, /metrics of both daemons is
  scraped every SCRAPE_EVERY seconds while the calls run.
  RSS: a daemon's idle RSS, and what its debug buffers hold at their default sizes when
  full (log records, one in ten 2 KB long, and spans of typical size), measured in a fresh
  process.
For (d) it also prints the CPU of the daemon, the service and the caller per call (steadier
than calls/s on a shared host), and for (c) each process's: daemon A, daemon B, the service
and the caller (which also runs the scraper). The three configurations run side by side
(three pairs of daemons) and are loaded in turn, S seconds each, R rounds: a host that slows
down mid-run slows all of them; each ratio is the median over rounds of the configuration's
figure over off's in the same round. The host baseline (trio TCP echo at 32) is printed
first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402
import trio  # noqa: E402

from tests.integration.cluster import Cluster, control  # noqa: E402

SCRAPE_EVERY = 2.0  # seconds between scrapes (Prometheus scrapes every 15 s to 1 min; this
# is several times more often, and the scraper runs in the caller's process, so its own cost
# counts against the configurations with metrics on)
CONFIGS = {
    "off": {"MESHD_DEBUG_TRACING": "false"},
    "default": {"MESHD_DEBUG_METRICS_LISTEN": "127.0.0.1:0"},
    "sample 1.0": {"MESHD_DEBUG_METRICS_LISTEN": "127.0.0.1:0",
                   "MESHD_DEBUG_TRACE_SAMPLE": "1.0"},
}

FILL = r'''
import os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from meshd.debug.logs import LogBuffer
from meshd.debug.traces import Span, SpanBuffer
from meshd.settings import DebugSettings

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

s = DebugSettings()
before = rss()
logs, spans = LogBuffer(s.log_buffer, s.log_buffer_bytes), SpanBuffer(s.span_buffer)
for i in range(s.log_buffer * 2):  # twice over: the buffers are full and have turned over
    long = "x" * 2000 if i % 10 == 0 else ""  # one line in ten is a long one (a traceback)
    logs.add({"time": time.time(), "level": "info", "node": "node-1", "service": "greeter",
              "instance": "greeter-3f2a9c1d", "trace_id": os.urandom(16).hex(),
              "message": f"handled request {i} for user {i % 97} in {i % 13} ms{long}",
              "fields": {"logger": "greeter.handlers"}})
for i in range(s.span_buffer * 2):
    spans.add(Span(os.urandom(16).hex(), os.urandom(8).hex(), os.urandom(8).hex(),
                   "call greeter/Greeter.Hello", "client", "node-1", "greeter", time.time(),
                   0.0012, 0, "", {"instance": "greeter-3f2a9c1d"}))
print(rss() - before, len(logs), len(spans))
'''


def _scrape(addresses: list[str], stop: trio.Event) -> Any:
    async def run() -> None:
        while not stop.is_set():
            for addr in addresses:
                await trio.to_thread.run_sync(
                    lambda a=addr: urllib.request.urlopen(f"http://{a}/metrics", timeout=5)
                    .read())
            with trio.move_on_after(SCRAPE_EVERY):
                await stop.wait()
    return run


async def _measure(sock: Path, seconds: float, metrics: list[str]) -> float:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        if metrics:
            nursery.start_soon(_scrape(metrics, stop))
        rate, _ = await rpcbench._meshd_client(sock, 32, seconds)
        stop.set()
    return rate


def _measured(daemon: Any, pids: tuple[int, ...], seconds: float,
              metrics: list[str]) -> tuple[float, list[float]]:
    """Calls/s through `daemon`, and each of `pids`' µs of CPU per call meanwhile."""
    before = [rpcbench._cpu_seconds(p) for p in pids]
    rate = trio.run(_measure, daemon.data_dir / "meshd.sock", seconds, metrics)
    return rate, [(rpcbench._cpu_seconds(p) - b) * 1e6 / (rate * seconds)
                  for p, b in zip(pids, before, strict=True)]


def start_config(root: Path, name: str, env: dict[str, str]) -> dict[str, Any]:
    """A pair of daemons with the echo service, run with `env` (one configuration)."""
    where = root / name.replace(" ", "-")
    where.mkdir(exist_ok=True)
    c = Cluster(where)
    a, b = rpcbench.echo_pair(c, where, env)
    metrics = [m for m in (control(d.data_dir, "status")["metrics"] for d in (a, b)) if m]
    return {"cluster": c, "a": a, "b": b, "metrics": metrics}


def idle_rss(root: Path) -> int:
    (root / "idle").mkdir(exist_ok=True)
    c = Cluster(root / "idle")
    try:
        a = c.add("a")
        trio.run(trio.sleep, 3)
        fields = Path(f"/proc/{a.proc.pid}/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=12)
    opts = ap.parse_args()
    rpcbench.host_baseline(32, opts.seconds)  # printed with the figures below
    results: dict[str, dict[str, list[float]]] = {n: {"c": [], "d": []} for n in CONFIGS}
    cpu: dict[str, list[float]] = {n: [] for n in CONFIGS}  # (d): µs of CPU per call
    # (c): µs of CPU per call of daemon A, daemon B, the service and the caller
    cpu_c: dict[str, list[list[float]]] = {n: [] for n in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        running = {name: start_config(root, name, env) for name, env in CONFIGS.items()}
        try:
            for r in range(opts.rounds):  # every configuration in turn, round after round
                for name, run in running.items():
                    service = run["cluster"].services[0].proc.pid
                    got_c, per_c = _measured(run["a"], (run["a"].proc.pid, run["b"].proc.pid,
                                                        service, os.getpid()), opts.seconds,
                                             run["metrics"])
                    got_d, per_d = _measured(run["b"], (run["b"].proc.pid, service,
                                                        os.getpid()), opts.seconds,
                                             run["metrics"])
                    got = {"c": got_c, "d": got_d}
                    cpu_c[name].append(per_c)
                    cpu[name].append(sum(per_d))
                    for case in ("c", "d"):
                        results[name][case].append(got[case])
                    print(f"round {r + 1} {name:<11} (c) {got['c']:8,.0f}/s  "
                          f"(d) {got['d']:8,.0f}/s", flush=True)
        finally:
            for run in running.values():
                run["cluster"].close()
        rss = idle_rss(root)
    fill = subprocess.run([sys.executable, "-c", FILL, str(ROOT)], capture_output=True,
                          text=True, check=True).stdout.split()
    print()
    print(f"{'':12}{'(c) calls/s':>14}{'ratio':>8}{'(d) calls/s':>14}{'ratio':>8}"
          f"{'(d) CPU µs/call':>17}{'ratio':>8}")
    def paired(name: str, case: str) -> float:
        """The median over rounds of this configuration's figure over off's in the same
        round (a host that drifts between rounds cancels out)."""
        mine, base = (cpu[name], cpu["off"]) if case == "cpu" else \
            (results[name][case], results["off"][case])
        return statistics.median(x / y for x, y in zip(mine, base, strict=True))

    for name in CONFIGS:
        med = {case: statistics.median(results[name][case]) for case in ("c", "d")}
        print(f"{name:<12}{med['c']:14,.0f}{paired(name, 'c'):8.3f}"
              f"{med['d']:14,.0f}{paired(name, 'd'):8.3f}{statistics.median(cpu[name]):17.1f}"
              f"{paired(name, 'cpu'):8.3f}")
    print("\n(c) CPU µs per call, medians over rounds: daemon A / daemon B / service / caller")
    for name in CONFIGS:
        per = [statistics.median(r[i] for r in cpu_c[name]) for i in range(4)]
        print(f"{name:<12}" + " / ".join(f"{x:.1f}" for x in per)
              + f"   total {sum(per):.1f}")
    print(f"\nidle daemon RSS: {rss / 1e6:.1f} MB; debug buffers full at default sizes "
          f"({fill[1]} log records, {fill[2]} spans): {int(fill[0]) / 1e6:.1f} MB "
          "(goal <= 10 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

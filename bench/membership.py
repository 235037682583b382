"""Membership targets, measured in the simulator: `python bench/membership.py [--quick]`.

Runs each scenario in its own process (so peak memory is that run's own) and prints, per
target, what was measured, the goal, and whether it holds. Baselines measured in the same run:
Lifeguard off (for the slow-nodes ratio) and 50 nodes (for the flat-load ratio). Anchors that
are not ours to run (Serf's convergence model: 9.2 / 10.7 rounds at 1,000 nodes) are printed
beside our numbers. `--quick` shrinks sizes and durations for a smoke run (CI), where the
targets are not expected to be meaningful; `--markdown` prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def sim(scenario: str, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "meshd_sim", "run", scenario, "--json", *args]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    opts = ap.parse_args()
    q = opts.quick
    big = "200" if q else "1000"
    rows: list[tuple[str, str, str, bool]] = []

    def row(name: str, measured: str, goal: str, ok: bool) -> None:
        rows.append((name, measured, goal, ok))
        print(f"{'PASS' if ok else 'MISS'}  {name}: {measured}  (goal {goal})", flush=True)

    started = time.perf_counter()
    # 1. dissemination, lossless and with 10% loss
    d0 = sim("dissemination", "--nodes", big)["metrics"]
    d10 = sim("dissemination", "--nodes", big, "--set", "network.loss=0.1")["metrics"]
    row(f"dissemination {big} nodes, fanout 3: rounds to 99.9% / 100%",
        f"{d0['dissemination_rounds_p999']} / {d0['dissemination_rounds_max']} "
        f"(Serf model 9.2 / 10.7)", "<= 12 / <= 16",
        _le(d0["dissemination_rounds_p999"], 12) and _le(d0["dissemination_rounds_max"], 16))
    row(f"dissemination {big} nodes, 10% loss: rounds to 99.9%",
        f"{d10['dissemination_rounds_p999']} (100%: {d10['dissemination_rounds_max']})",
        "<= 14", _le(d10["dissemination_rounds_p999"], 14))

    # 2. crash detection
    c = sim("crash", "--nodes", big)
    cm = c["metrics"]
    n = c["nodes"]
    from meshd.settings import membership_profile

    lan = membership_profile("lan")
    smin = lan.suspicion_min(n)
    row(f"crash, {n} nodes: median crash->first suspicion",
        f"{cm['detection_first_s_p50']} s over {cm['crashes']} crashes",
        f"<= {2 * lan.probe_interval:.0f} s (2 probe intervals)",
        _le(cm["detection_first_s_p50"], 2 * lan.probe_interval))
    row(f"crash, {n} nodes: first suspicion->dead at every node (worst)",
        f"{cm['dead_after_suspicion_s_max']} s (crash->all: {cm['detection_all_s_max']} s)",
        f"<= suspicion-min + 3 = {smin + 3:.0f} s",
        _le(cm["dead_after_suspicion_s_max"], smin + 3))

    # 3. lossy: no false deaths
    lossy_args = ["--nodes", "50", "--duration", "600"] if q else []
    lo = sim("lossy", *lossy_args)
    row(f"lossy.toml ({lo['nodes']} nodes, 10% loss, {lo['duration_s']:.0f} s)",
        f"{lo['metrics']['false_deaths']} false deaths, {lo['metrics']['suspicions']} "
        f"suspicions refuted", "0 false deaths", lo["metrics"]["false_deaths"] == 0)

    # 4. slow nodes, Lifeguard on vs off
    slow_args = ["--nodes", "50", "--duration", "900"] if q else []
    on = sim("slow-nodes", *slow_args, "--lifeguard")["metrics"]
    off = sim("slow-nodes", *slow_args, "--no-lifeguard")["metrics"]
    ratio = off["false_deaths"] / max(1, on["false_deaths"])
    row("slow-nodes.toml: false deaths Lifeguard off / on",
        f"{off['false_deaths']} / {on['false_deaths']} = {ratio:.0f}x "
        f"(stalled nodes declared dead: {off['degraded_deaths']} / {on['degraded_deaths']})",
        ">= 20x", on["false_deaths"] * 20 <= off["false_deaths"])

    # 5. partition heal
    p = sim("partition", *(["--nodes", "40"] if q else []))
    pn = p["nodes"]
    bound = lan.reconnect_interval + lan.push_pull_period(pn)
    row(f"partition.toml ({pn} nodes): heal -> one cluster",
        f"{p['metrics']['rejoin_after_heal_s']} s", f"<= reconnect + push-pull = {bound:.0f} s",
        _le(p["metrics"]["rejoin_after_heal_s"], bound))

    # 6. message load flat in N, bandwidth
    small = sim("steady", "--nodes", "50", "--duration", "300")
    large = sim("steady", "--nodes", big, "--duration", "300" if q else "600")
    sm, lg = small["metrics"], large["metrics"]
    load_ratio = lg["msgs_per_node_per_s"] / sm["msgs_per_node_per_s"]
    row(f"msgs/node/s at {big} vs 50 nodes",
        f"{lg['msgs_per_node_per_s']} vs {sm['msgs_per_node_per_s']} "
        f"(ratio {load_ratio:.3f})", "within 15%", abs(load_ratio - 1) <= 0.15)
    row(f"bandwidth per node at {big} nodes, LAN defaults",
        f"{lg['kbit_per_node_per_s']} kbit/s", "<= 330 kbit/s",
        lg["kbit_per_node_per_s"] <= 330)

    # 7. simulator speed and memory
    row(f"simulator: {large['nodes']} nodes x {large['duration_s']:.0f} simulated s",
        f"{large['sim_wall_s']:.1f} s wall, peak RSS {large['peak_rss_mb']:.0f} MB",
        "< 60 s, < 2048 MB", large["sim_wall_s"] < 60 and large["peak_rss_mb"] < 2048)

    print(f"\n{sum(r[3] for r in rows)} of {len(rows)} targets hold "
          f"({time.perf_counter() - started:.0f} s)")
    if opts.markdown:
        print("\n| target | measured | goal | holds |\n|---|---|---|---|")
        for name, measured, goal, ok in rows:
            print(f"| {name} | {measured} | {goal} | {'yes' if ok else 'no'} |")
    return 0


def _le(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


if __name__ == "__main__":
    sys.exit(main())

"""Membership targets, measured in the simulator: `python bench/membership.py [--quick]`.

Runs each scenario in its own process (so peak memory is that run's own) and prints, per
target, what was measured, the goal, and whether it holds. Baselines measured in the same run:
Lifeguard off (for the slow-nodes ratio) and 50 nodes (for the flat-load ratio). Anchors that
are not ours to run (Serf's convergence model: 9.2 / 10.7 rounds at 1,000 nodes) are printed
beside our numbers. `--quick` shrinks sizes and durations for a smoke run (CI), where the
targets are not expected to be meaningful; `--markdown` prints the table for docs/benchmarks.md.

`--scale` measures issue 22's targets instead: `sim/scenarios/scale.toml` at 10,000 nodes
(tag changes, then crashes) against the same scenario at 1,000 nodes in the same run, again
with 1% loss; and the simulator's speed on 1,000 nodes x 600 s against the code before
issue 22 (`--baseline-rev`, checked out in a temporary git worktree), which must take the
same protocol decisions: the same event log, messages and suspicions. The 50-daemon figures
come from `bench/daemons_scale.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEFORE_ISSUE_22 = "4be2213"  # main before the member table and digest push-pull

Row = Callable[[str, str, str, bool], None]


def sim(scenario: str, *args: str, cwd: Path = ROOT, module: str = "meshd_sim") -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, "run", scenario, "--json", *args]
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--scale", action="store_true", help="issue 22's scale targets instead")
    ap.add_argument("--baseline-rev", default=BEFORE_ISSUE_22,
                    help=f"--scale: the git revision to compare speed with "
                         f"(default {BEFORE_ISSUE_22}, before issue 22)")
    opts = ap.parse_args()
    q = opts.quick
    big = "200" if q else "1000"
    rows: list[tuple[str, str, str, bool]] = []

    def row(name: str, measured: str, goal: str, ok: bool) -> None:
        rows.append((name, measured, goal, ok))
        print(f"{'PASS' if ok else 'MISS'}  {name}: {measured}  (goal {goal})", flush=True)

    started = time.perf_counter()
    if opts.scale:
        scale(row, q, opts.baseline_rev)
    else:
        targets(row, q, big)
    print(f"\n{sum(r[3] for r in rows)} of {len(rows)} targets hold "
          f"({time.perf_counter() - started:.0f} s)")
    if opts.markdown:
        print("\n| target | measured | goal | holds |\n|---|---|---|---|")
        for name, measured, goal, ok in rows:
            print(f"| {name} | {measured} | {goal} | {'yes' if ok else 'no'} |")
    return 0


def targets(row: Row, q: bool, big: str) -> None:
    """The membership targets of the first issues (SWIM, Lifeguard, load, simulator)."""
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


def scale(row: Row, q: bool, baseline_rev: str) -> None:
    """Issue 22: 10,000 simulated nodes against 1,000, and the speed of the core."""
    from meshd.settings import membership_profile

    n_big, n_ref = (2000, 500) if q else (10000, 1000)
    lan = membership_profile("lan")
    big = sim("scale", "--nodes", str(n_big))
    ref = sim("scale", "--nodes", str(n_ref))
    bm, rm = big["metrics"], ref["metrics"]
    row(f"scale.toml, {n_big} nodes x {big['duration_s']:.0f} simulated s: wall / peak RSS",
        f"{big['sim_wall_s']:.0f} s / {big['peak_rss_mb']:.0f} MB", "<= 900 s / <= 8192 MB",
        big["sim_wall_s"] <= 900 and big["peak_rss_mb"] <= 8192)
    row(f"scale {n_big}: dissemination rounds p99.9 / max",
        f"{bm['dissemination_rounds_p999']} / {bm['dissemination_rounds_max']} "
        f"({n_ref} nodes: {rm['dissemination_rounds_p999']} / {rm['dissemination_rounds_max']})",
        "<= 6 / <= 8",
        _le(bm["dissemination_rounds_p999"], 6) and _le(bm["dissemination_rounds_max"], 8))
    bound = lan.suspicion_min(n_big) + 3
    row(f"scale {n_big}: first suspicion -> dead at every node (worst of "
        f"{bm['crashes']} crashes)",
        f"{bm['dead_after_suspicion_s_max']} s ({n_ref} nodes: "
        f"{rm['dead_after_suspicion_s_max']} s, bound {lan.suspicion_min(n_ref) + 3:.0f} s)",
        f"<= suspicion_min(N) + 3 = {bound:.0f} s (the bound used at {n_ref})",
        _le(bm["dead_after_suspicion_s_max"], bound))
    for key, what in (("msgs_per_node_per_s", "messages"), ("bytes_per_node_per_s", "bytes")):
        ratio = bm[key] / rm[key]
        row(f"scale: {what} per node per s, {n_big} vs {n_ref} nodes",
            f"{bm[key]} vs {rm[key]} (ratio {ratio:.3f})", "within 15%", abs(ratio - 1) <= 0.15)
    lossy = sim("scale", "--nodes", str(n_big), "--set", "network.loss=0.01")
    row(f"scale {n_big} with 1% loss: false deaths",
        f"{lossy['metrics']['false_deaths']} ({lossy['metrics']['suspicions']} suspicions "
        f"refuted; {lossy['sim_wall_s']:.0f} s, {lossy['peak_rss_mb']:.0f} MB)", "0",
        lossy["metrics"]["false_deaths"] == 0)
    speed(row, q, baseline_rev)


def speed(row: Row, q: bool, baseline_rev: str) -> None:
    """1,000 nodes x 600 s on this code and on `baseline_rev`, one after the other."""
    nodes = "300" if q else "1000"
    args = ("steady", "--nodes", nodes, "--duration", "600")
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        old_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), baseline_rev],
                       cwd=ROOT, check=True)
        try:
            # `python -m sim` in the old tree runs its own meshd and sim packages
            before = sim(*args, cwd=old_tree, module="sim")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT,
                           check=False)
    now = sim(*args)
    ratio = before["sim_wall_s"] / now["sim_wall_s"]
    row(f"simulator speed, {nodes} nodes x 600 s vs {baseline_rev} (before issue 22)",
        f"{now['sim_wall_s']:.1f} s vs {before['sim_wall_s']:.1f} s = {ratio:.2f}x faster "
        f"(issue's figure: 12 s); peak RSS {now['peak_rss_mb']:.0f} vs "
        f"{before['peak_rss_mb']:.0f} MB", ">= 3x", ratio >= 3)
    same = ("suspicions", "false_deaths", "msgs_per_node_per_s")
    decisions = all(now["metrics"][k] == before["metrics"][k] for k in same) \
        and now["event_log_sha256"] == before["event_log_sha256"] \
        and now["events"] == before["events"]
    row("the same protocol decisions as before",
        f"event log {now['event_log_sha256'][:12]} vs {before['event_log_sha256'][:12]}, "
        f"{now['events']} vs {before['events']} events, msgs/node/s "
        f"{now['metrics']['msgs_per_node_per_s']} vs {before['metrics']['msgs_per_node_per_s']}"
        f"; bytes/node/s {now['metrics']['bytes_per_node_per_s']} vs "
        f"{before['metrics']['bytes_per_node_per_s']} (push-pull sends digests now)",
        "identical", decisions)


def _le(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


if __name__ == "__main__":
    sys.exit(main())

"""50 real daemons on loopback (issue 22): `python bench/daemons_scale.py [--seconds S]`.

Job: run the scenario of tests/integration/fleet.py (the soak test's) and print its figures
against the issue's targets:
- time from the last join (the last daemon's ready line) until every daemon sees all N
  alive: goal <= 5 s;
- for each of the `--kills` daemons killed with kill -9: kill -> first suspicion, first
  suspicion -> dead at each survivor (min / median / max) against the suspicion bound
  (suspicion_min(N) + 3 s, docs/benchmarks.md's formula, from the daemons' own settings),
  and kill -> dead;
- false suspicions of healthy nodes (members.watch on every daemon, cross-checked with the
  daemons' `suspicions`/`refutations` counters) over `--seconds` of watching: goal 0;
- each daemon's RSS, peak RSS and CPU (from /proc), min / median / max, CPU as a % of one
  core over the watch; the load average over the run.
Host baseline first (bench/rpc.py: trio TCP echo at 32 callers, and the load average), so a
slow or shared host shows. `--json PATH` writes every figure (per daemon too).

Rules: only 127.0.0.1 and kernel-chosen ports; data dirs under a temporary directory that is
removed afterwards (`--keep` keeps it, with the daemons' logs); every daemon is killed when
the run ends, whatever happened. Exit status 0 when every target holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402  (bench/rpc.py: the host baseline)
import trio  # noqa: E402

from tests.integration import fleet  # noqa: E402


def targets(out: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, holds) rows."""
    p, s = out["plan"], out["suspicion"]
    rows = [(f"{p['nodes']} daemons ({p['profile']}): all see {p['nodes']} alive after the "
             "last join", f"{out['all_alive_after_last_join_s']} s",
             f"<= {fleet.ALIVE_WITHIN:g} s",
             out["all_alive_after_last_join_s"] is not None
             and out["all_alive_after_last_join_s"] <= fleet.ALIVE_WITHIN
             and out["members_check_all_alive"])]
    for row in out["detection"]:
        after = row.get("first_suspicion_to_dead_s") or {}
        rows.append((f"kill -9 {row['victim']}: first suspicion -> dead at every survivor "
                     "(min / median / max)",
                     f"{after.get('min')} / {after.get('median')} / {after.get('max')} s "
                     f"(kill -> first suspicion {row['kill_to_first_suspicion_s']} s, kill "
                     f"-> dead everywhere {(row.get('kill_to_dead_s') or {}).get('max')} s)",
                     f"<= suspicion_min({s['n']}) + 3 = {s['bound_s']} s",
                     bool(row["dead_everywhere"] and row.get("within_bound"))))
    c = out["counters"]
    late = out["false_by_phase"]["kill"] + out["false_by_phase"]["watch"]
    rows.append((f"false suspicions of healthy nodes over {out['watch_s']:g} s (and the kills)",
                 f"{late} (watch counters: {c['watch_suspicions_total']} suspicions, "
                 f"{c['watch_refutations_total']} refutations; join phase: "
                 f"{out['false_by_phase']['join']})", "0",
                 late == 0 and c["watch_suspicions_total"] == 0
                 and c["watch_refutations_total"] == 0
                 and c["kill_phase_refutations_total"] == 0))
    us = out["usage_summary"]

    def mmm(x: dict[str, float] | None) -> str:
        return "-" if x is None else f"{x['min']} / {x['median']} / {x['max']}"

    rows.append(("RSS per daemon, MB (min / median / max; peak)",
                 f"{mmm(us['rss_mb'])}; peak {mmm(us['hwm_mb'])}; all {us['rss_mb_sum']} MB",
                 "reported", True))
    rows.append(("CPU per daemon over the watch, % of one core (total CPU s)",
                 f"{mmm(us['cpu_pct_watch'])} ({mmm(us['cpu_s_total'])} s)", "reported", True))
    rows.append(("load average (1 min) over the watch (min / median / max)",
                 mmm(out["load1"]["watch"]), "reported", True))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=600.0, help="watch period after the kills")
    ap.add_argument("--seeds", type=int, default=3, help="daemons the others join through")
    ap.add_argument("--parallel", type=int, default=3, help="daemons starting at once")
    ap.add_argument("--profile", default="local")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    opts = ap.parse_args()
    started = time.monotonic()
    baseline, load_before = rpcbench.host_baseline()
    root = Path(tempfile.mkdtemp(prefix="meshd-scale-"))
    plan = fleet.Plan(nodes=opts.nodes, kills=opts.kills, watch_seconds=opts.seconds,
                      seeds=opts.seeds, start_parallel=opts.parallel, profile=opts.profile)
    try:
        out = trio.run(fleet.run, plan, root, lambda s: print(s, flush=True))
    finally:
        if opts.keep:
            print(f"data dirs and logs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    out["host"]["baseline_echo_calls_s"] = round(baseline)
    print()
    print(fleet.summary(out))
    print()
    rows = targets(out)
    for name, measured, goal, ok in rows:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {measured}  (goal {goal})")
    if opts.markdown:
        print("\n| target | measured | goal | holds |\n|---|---|---|---|")
        for name, measured, goal, ok in rows:
            print(f"| {name} | {measured} | {goal} | {'yes' if ok else 'no'} |")
    if opts.json:
        fleet.write_json(out, opts.json)
        print(f"figures written to {opts.json}")
    print(rpcbench.baseline_footer(baseline, load_before, time.monotonic() - started))
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Issue 22: real daemons on loopback at scale (tests/integration/fleet.py runs them).

Job: the issue's acceptance for 50 real daemons (local profile, one data dir each): all alive
<= 5 s after the last join; 5 killed with kill -9 -> dead at every survivor within the
suspicion bound; 0 false suspicions of healthy nodes over 10 minutes; each daemon's RSS and
CPU reported.
- `test_fifty_daemons_soak` (`-m soak`): 50 daemons, 5 kills, a watch of MESHD_SOAK_SECONDS
  (default 600) s; prints the figures and writes them as JSON to MESHD_SOAK_REPORT if set.
- `test_ten_daemons` (default suite): 10 daemons, 1 kill, a 20 s watch; the same checks,
  except that a false suspicion refuted in time is printed, not failed (no false death is
  allowed), and death is bounded by Lifeguard's suspicion_max + 3 s (the issue's tighter
  bound is printed): see `check`.

Rules:
- The only timing thresholds are the issue's: ALIVE_WITHIN (5 s from the last join's return,
  i.e. the last daemon's ready line) and the suspicion bound (docs/benchmarks.md:
  suspicion_min(N) + 3 s from the first suspicion, suspicion_min from the settings the
  daemons report; the short run uses suspicion_max instead, see `check`). Other waits are
  safeguards that end a stuck run.
- False suspicions are `suspect`/`dead`/`left` events about a member that was not killed,
  seen on any daemon's members.watch, from the kill on (the join phase's are printed, not
  asserted: starting 50 Python processes on 2 cores starves whoever runs); in the soak the
  daemons' own `suspicions`/`refutations` counters must agree.
- Every daemon is killed when the test ends, whatever happened (fleet.run's finally).
- This file is in tests/conftest.py's TIMING_SENSITIVE group: it never runs beside the
  CPU-bound simulator files.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from . import fleet


def check(out: dict[str, Any], strict: bool = True) -> None:
    """The issue's acceptance on a run's figures. `strict` (the soak): no false suspicion at
    all after the join phase. Not strict (the default suite's short run): no false death,
    and every healthy member alive everywhere at the end (a suspicion refuted in time is
    allowed: with the local profile's 200 ms probe timeout, 1 of 5 runs on this 2-core host
    at load average 6-9 had one, refuted within 0.3 s; it is printed with the load)."""
    alive = out["all_alive_after_last_join_s"]
    assert alive is not None and alive <= fleet.ALIVE_WITHIN, (
        f"all alive {alive} s after the last join (acceptance <= {fleet.ALIVE_WITHIN} s); "
        f"not alive per observer: {out.get('not_alive_per_observer')}")
    assert out["members_check_all_alive"], "a member list did not show everyone alive"
    sus = out["suspicion"]
    # strict: the bound (suspicion_min + slack). Not strict: Lifeguard's guarantee
    # (suspicion_max + slack), which holds whatever the confirmations: how soon other members
    # confirm a suspicion is chance (their shuffled probe order), and with 10 members on a
    # loaded CI host the tight bound was missed by 95 ms once (4.595 s against 4.5 s); the
    # tight figure is printed either way. Confirmations shrinking the timeout are the unit
    # tests' (tests/unit/membership/test_core.py).
    bound = sus["bound_s"] if strict else sus["suspicion_max_s"] + fleet.BOUND_SLACK
    for row in out["detection"]:
        assert row["dead_everywhere"], f"{row['victim']} not dead at {row['missing']}"
        worst = (row.get("first_suspicion_to_dead_s") or {}).get("max")
        assert worst is not None and worst <= bound, (
            f"{row['victim']} dead everywhere {worst} s after its first suspicion "
            f"(bound {bound} s): {row}")
        if not row.get("within_bound"):
            print(f"{row['victim']}: {worst} s is past the issue's bound {sus['bound_s']} s "
                  f"(within Lifeguard's {bound} s)")
    late = [f for f in out["false_suspicions"] if f["phase"] != "join"]
    if strict:
        count = out["false_by_phase"]["kill"] + out["false_by_phase"]["watch"]
        assert count == 0, f"{count} false suspicions of healthy nodes, the first: {late[:50]}"
        c = out["counters"]
        assert c["kill_phase_refutations_total"] == 0, c
        assert c["watch_suspicions_total"] == 0 and c["watch_refutations_total"] == 0, c
    else:
        deaths = [f for f in late if f["kind"] != "suspect"]
        assert not deaths, f"healthy nodes declared dead or left: {deaths}"
        if late:
            print(f"{len(late)} false suspicions (refuted), load average "
                  f"{out['load1']['whole_run']}: {late}")
    assert out["members_check_end"], "a survivor's member list is not all alive + victims dead"
    assert len(out["usage"]) == out["plan"]["nodes"]


async def test_ten_daemons(tmp_path):
    out = await fleet.run(fleet.Plan(nodes=10, kills=1, watch_seconds=20, seeds=2,
                                      start_parallel=8), tmp_path)
    print(fleet.summary(out))
    check(out, strict=False)


@pytest.mark.soak
async def test_fifty_daemons_soak(tmp_path):
    seconds = float(os.environ.get("MESHD_SOAK_SECONDS", "600"))
    out = await fleet.run(fleet.Plan(nodes=50, kills=5, watch_seconds=seconds), tmp_path)
    print(fleet.summary(out))
    report = os.environ.get("MESHD_SOAK_REPORT")
    if report:
        fleet.write_json(out, report)
        print(f"figures written to {report}")
    check(out)

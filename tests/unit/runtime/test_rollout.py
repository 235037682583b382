"""Rolling updates (sans-IO): one slot at a time, the next only after the moved ones run
healthy; a crash or a deadline fails the rollout and every moved slot goes back to the
stable version; new slots take the target at once; a first version has no rollout."""

from __future__ import annotations

from meshd.runtime.placement import Slot
from meshd.runtime.rollout import DONE, FAILED, MIN_HEALTHY, ROLLING, Rollout, judge, step

DEADLINE = 60.0


def slots(**nodes_versions: tuple[str, int]) -> dict[str, Slot]:
    return {k.lstrip("s"): Slot(node, 0.0, "", v, 0.0) for k, (node, v) in
            nodes_versions.items()}


def row(node: str, version: int, state: str = "running", healthy: bool = True,
        started: float = 0.0, **extra) -> dict:
    return {"node": node, "version": version, "state": state, "healthy": healthy,
            "registered": healthy, "started": started, "reason": "", **extra}


def versions(current: dict[str, Slot], changes: dict[str, Slot]) -> dict[str, int]:
    return {k: v.version for k, v in {**current, **changes}.items()}


def test_a_first_version_has_no_rollout_and_every_slot_takes_it():
    s = slots(s0=("a", 0), s1=("b", 0), s2=("", 0))
    changes, rollout = step(1, None, s, {}, None, 10.0, DEADLINE)
    assert rollout is None
    assert versions(s, changes) == {"0": 1, "1": 1, "2": 1}
    assert all(c.changed == 10.0 for c in changes.values())
    # nothing to do once they have it
    assert step(1, None, {**s, **changes}, {}, None, 11.0, DEADLINE) == ({}, None)


def test_one_slot_at_a_time_each_after_the_last_is_healthy():
    s = slots(s0=("a", 1), s1=("b", 1), s2=("c", 1))
    status = {"0": row("a", 1), "1": row("b", 1), "2": row("c", 1)}
    changes, rollout = step(2, 1, s, status, None, 100.0, DEADLINE)
    assert rollout == Rollout(2, 1, ROLLING, registers=True, started=100.0)
    assert versions(s, changes) == {"0": 2, "1": 1, "2": 1}  # the first slot only
    s = {**s, **changes}
    # the new replica is starting, then running but not registered: nothing more moves
    for st in (row("a", 2, "starting", False), row("a", 2, healthy=False), row("a", 1)):
        assert step(2, 1, s, {**status, "0": st}, rollout, 101.0, DEADLINE) == ({}, rollout)
    # registered: the next one moves
    status["0"] = row("a", 2)
    changes, rollout = step(2, 1, s, status, rollout, 102.0, DEADLINE)
    assert versions(s, changes) == {"0": 2, "1": 2, "2": 1}
    s = {**s, **changes}
    status["1"] = row("b", 2)
    changes, rollout = step(2, 1, s, status, rollout, 103.0, DEADLINE)
    assert versions(s, changes) == {"0": 2, "1": 2, "2": 2}
    s = {**s, **changes}
    assert rollout.state == ROLLING  # the last one is not healthy yet
    status["2"] = row("c", 2)
    changes, rollout = step(2, 1, s, status, rollout, 104.0, DEADLINE)
    assert changes == {} and rollout.state == DONE


def test_slots_move_in_number_order():
    s = {str(i): Slot(f"n{i}", 0.0, "", 1) for i in (10, 2, 1)}
    status = {k: row(v.node, 1) for k, v in s.items()}
    changes, _ = step(2, 1, s, status, None, 0.0, DEADLINE)
    assert list(changes) == ["1"]


def test_a_crash_of_the_new_version_fails_the_rollout_and_keeps_the_old():
    s = slots(s0=("a", 2), s1=("b", 2), s2=("c", 1))
    rollout = Rollout(2, 1, ROLLING)
    status = {"0": row("a", 2), "1": row("b", 2, "restarting", False, reason="exit code 3"),
              "2": row("c", 1)}
    changes, after = step(2, 1, s, status, rollout, 50.0, DEADLINE)
    assert after.state == FAILED
    assert "replica 1 on b" in after.reason and "exit code 3" in after.reason
    assert "v1 kept" in after.reason
    assert versions(s, changes) == {"0": 1, "1": 1, "2": 1}  # back, both moved ones
    # failed stays failed: a new slot takes the stable version, nothing else moves
    s = {**s, **changes, "3": Slot("d", 0.0)}
    changes, again = step(2, 1, s, status, after, 51.0, DEADLINE)
    assert again == after and versions(s, changes)["3"] == 1 and list(changes) == ["3"]


def test_not_healthy_by_the_deadline_fails():
    s = {"0": Slot("a", 0.0, "", 2, 100.0), "1": Slot("b", 0.0, "", 1)}
    rollout = Rollout(2, 1, ROLLING)
    status = {"0": row("a", 2, healthy=False), "1": row("b", 1)}
    assert step(2, 1, s, status, rollout, 100 + DEADLINE - 1, DEADLINE) == ({}, rollout)
    changes, after = step(2, 1, s, status, rollout, 100 + DEADLINE, DEADLINE)
    assert after.state == FAILED and "not healthy 60 s after it started" in after.reason
    assert "not registered" in after.reason
    assert versions(s, changes) == {"0": 1, "1": 1}


def test_a_worker_that_never_registered_is_healthy_after_running_a_while():
    s = slots(s0=("a", 1), s1=("b", 1))
    status = {"0": row("a", 1, healthy=False), "1": row("b", 1, healthy=False)}
    changes, rollout = step(2, 1, s, status, None, 0.0, DEADLINE)
    assert rollout.registers is False
    s = {**s, **changes}
    status["0"] = row("a", 2, healthy=False, started=10.0)
    assert step(2, 1, s, status, rollout, 10 + MIN_HEALTHY - 1, DEADLINE)[0] == {}
    changes, _ = step(2, 1, s, status, rollout, 10 + MIN_HEALTHY, DEADLINE)
    assert versions(s, changes) == {"0": 2, "1": 2}


def test_a_new_update_during_a_rollout_starts_over_from_the_stable_version():
    s = slots(s0=("a", 2), s1=("b", 1))
    rolling = Rollout(2, 1, ROLLING, started=5.0)
    status = {"0": row("a", 2), "1": row("b", 1)}
    changes, rollout = step(3, 1, s, status, rolling, 9.0, DEADLINE)
    assert (rollout.version, rollout.stable, rollout.state, rollout.started) == (3, 1, ROLLING,
                                                                               9.0)
    # the slot of the interrupted version counts as not moved: it moves first
    assert versions(s, changes) == {"0": 3, "1": 1}


def test_new_and_unplaced_slots_start_as_the_stable_version_and_move_one_at_a_time():
    # an update that changed the placement: every slot placed anew (version 0)
    s = {"0": Slot("a", 0.0, "", 0), "1": Slot("b", 0.0, "", 0), "2": Slot("", 0.0, "x", 0)}
    changes, rollout = step(2, 1, s, {}, Rollout(2, 1, ROLLING), 0.0, DEADLINE)
    # all start as v1 but the first placed one, which moves to v2 (not all of them at once)
    assert versions(s, changes) == {"0": 2, "1": 1, "2": 1}
    assert rollout.state == ROLLING


def test_a_dead_nodes_last_status_does_not_count_as_healthy():
    s = slots(s0=("a", 2), s1=("b", 1))
    status = {"0": row("a", 2), "1": row("b", 1)}  # a's last word: running, healthy
    rolling = Rollout(2, 1, ROLLING)
    assert step(2, 1, s, status, rolling, 0.0, DEADLINE, alive={"b"}) == ({}, rolling)
    changes, _ = step(2, 1, s, status, rolling, 0.0, DEADLINE, alive={"a", "b"})
    assert versions(s, changes) == {"0": 2, "1": 2}


def test_a_worker_is_timed_from_when_its_slot_moved_too():
    # its node's clock is behind: "started" long ago; the slot moved at 100 (coordinator)
    s = {"0": Slot("a", 0.0, "", 2, 100.0), "1": Slot("b", 0.0, "", 1)}
    rolling = Rollout(2, 1, ROLLING, registers=False)
    status = {"0": row("a", 2, healthy=False, started=1.0), "1": row("b", 1, healthy=False)}
    assert step(2, 1, s, status, rolling, 100 + MIN_HEALTHY - 1, DEADLINE)[0] == {}
    assert step(2, 1, s, status, rolling, 100 + MIN_HEALTHY, DEADLINE)[0] != {}


def test_whether_a_spec_registers_is_remembered_from_the_last_rollout():
    s = slots(s0=("a", 2), s1=("b", 2))
    # the replicas restarted and have not registered again yet: the last rollout knew
    _, rollout = step(3, 2, s, {}, Rollout(2, 1, DONE, registers=True), 0.0, DEADLINE)
    assert rollout.registers is True


def test_judge_reads_only_the_status_of_the_slots_node_and_version():
    slot = Slot("a", 0.0, "", 2)
    assert judge(row("b", 2), slot, True, 0.0)[0] == "waiting"  # another node's
    assert judge(row("a", 1), slot, True, 0.0)[0] == "waiting"  # the old version's
    assert judge(None, slot, True, 0.0) == ("waiting", "no status from it yet")
    assert judge(row("a", 2, "failed", False, reason="no main.py"), slot, True, 0.0) == (
        "failed", "failed: no main.py")
    assert judge(row("a", 2), slot, True, 0.0) == ("healthy", "")


def test_rollout_records_round_trip_and_bad_ones_are_none():
    r = Rollout(3, 2, FAILED, "why", False, 7.5)
    assert Rollout.from_record(r.to_record()) == r
    for bad in (None, [], {"version": "3", "stable": 2, "state": "done"},
                {"version": 3, "stable": 2, "state": "paused"}):
        assert Rollout.from_record(bad) is None


def test_a_slot_runs_the_spec_of_its_version_and_an_unknown_version_is_left_running():
    from meshd.runtime.service import _of_version
    from meshd.runtime.spec import parse_spec

    v1, v3 = (parse_spec({"name": "svc", "source": "/srv/svc", "version": v}) for v in (1, 3))
    assert _of_version(v3, v1, 3) is v3 and _of_version(v3, v1, 1) is v1
    assert _of_version(v3, v1, 0) is v3  # placed, its version not chosen yet
    # v2 (an interrupted rollout's) or v4 (not read here yet): neither restarted nor started
    assert _of_version(v3, v1, 2) is None and _of_version(v3, v1, 4) is None
    assert _of_version(v1, None, 2) is None

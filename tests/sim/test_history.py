"""Issue 23: the checker over the event log (sim/history.py) agrees with the run's own check
on a clean log and finds each kind of violation planted into a copy of the log: the history
of what clients did and were told, and what the nodes held, are judged from the log alone.

One short run writes the log (module fixture, about 12 s); every other test edits a copy of
its lines in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshd_sim import history
from meshd_sim.nemesis import NemesisSimulation
from meshd_sim.scenario import load

SHORT = ["nemesis.fault_phase=400", "nemesis.quiet=180", "nemesis.settle=120", "duration=700"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "events.log"
    with open(path, "w", encoding="utf-8") as f:
        result = NemesisSimulation(load("nemesis", SHORT), seed=2, event_log=f).run()
    assert result["violations"] == []
    return path, path.read_text(encoding="utf-8").splitlines(), result


def found(lines: list[str]) -> set[str]:
    return {v["invariant"] for v in history.check(lines).violations}


def check_index(lines: list[str]) -> int:
    (i,) = [i for i, line in enumerate(lines) if " hist check " in line]
    return i


def hist(t: str, node: str, kind: str, data) -> str:
    return f"{t} {node} hist {kind} {json.dumps(data, separators=(',', ':'))}"


def test_a_clean_log_checks_clean_and_counts_what_the_run_counted(clean):
    _, lines, result = clean
    report = history.check(lines)
    assert report.violations == []
    assert report.checks == 1 == result["quiet_periods"]
    assert report.checked_ops == result["checked_ops"] == result["history_check"]["checked_ops"]
    assert report.lines == len(lines)
    # without the history records the log is what it was before they were written
    assert not any(" hist " in line for line in result["violations"])


def test_the_cli_checks_a_saved_log_and_exits_non_zero_on_a_violation(clean, tmp_path):
    path, lines, result = clean
    out = subprocess.run([sys.executable, "-m", "meshd_sim", "check", str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checked_ops"] == result["checked_ops"]
    i = check_index(lines)
    bad = tmp_path / "bad.log"
    bad.write_text("\n".join([*lines[:i], hist(lines[i].split()[0], "n0001", "exception",
                                                {"detail": "KeyError: 'x'"}), *lines[i:]]))
    out = subprocess.run([sys.executable, "-m", "meshd_sim", "check", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no-crash-from-exception n0001" in out.stdout
    garbage = tmp_path / "garbage.log"
    garbage.write_text("\n".join([*lines[:5], "hello there", *lines[5:]]))
    out = subprocess.run([sys.executable, "-m", "meshd_sim", "check", str(garbage)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "line 6" in out.stderr and "Traceback" not in out.stderr


def test_a_log_without_history_records_is_refused(clean):
    _, lines, _ = clean
    with pytest.raises(history.HistoryError, match="not the event log of a nemesis run"):
        history.check([line for line in lines if " hist " not in line])


def test_an_acknowledged_write_the_nodes_do_not_hold_is_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    t = lines[i - 1].split()[0]
    forged = [hist(t, "n0001", "op", {"id": 10**9, "kind": "write", "key": "r0",
                                      "ts": [2**50, 0, "n0001"], "value": "vX"}),
              hist(t, "n0001", "acked", 10**9)]
    assert found([*lines[:i], *forged, *lines[i:]]) == {"lww-acked-write-kept"}


def test_an_acknowledged_increment_missing_from_the_counter_is_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    t = lines[i - 1].split()[0]
    forged = [hist(t, "n0002", "op", {"id": 10**9, "kind": "incr", "key": "c0", "delta": 3}),
              hist(t, "n0002", "acked", 10**9)]
    assert found([*lines[:i], *forged, *lines[i:]]) == {"counter-sum"}
    # of unknown outcome instead: it may or may not have landed, so nothing is wrong
    forged[1] = hist(t, "n0002", "unknown", 10**9)
    assert found([*lines[:i], *forged, *lines[i:]]) == set()


def test_an_acknowledged_add_missing_from_the_set_is_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    t = lines[i - 1].split()[0]
    forged = [hist(t, "n0003", "op", {"id": 10**9, "kind": "add", "key": "s1.0",
                                      "element": "zz", "tags": ["n0003:1:0:9"]}),
              hist(t, "n0003", "acked", 10**9)]
    assert found([*lines[:i], *forged, *lines[i:]]) == {"set-acked-add-kept"}


def test_a_client_told_twice_is_caught(clean):
    _, lines, _ = clean
    acked = next(line for line in lines if " hist acked " in line)
    i = lines.index(acked)
    assert found([*lines[:i + 1], acked, *lines[i + 1:]]) == {"client-told-once"}


def test_a_durable_message_never_received_is_caught(clean):
    _, lines, _ = clean
    msg = next(line.split()[3] for line in lines if line.split()[2] == "publish")
    kept = [line for line in lines
            if not (line.split()[2] == "receive" and line.split()[4] == msg)]
    assert len(kept) < len(lines)
    assert found(kept) == {"broker-durable-delivered"}


def test_a_queue_group_handed_a_message_more_often_than_offered_is_caught(clean):
    _, lines, _ = clean
    once = next(line for line in lines if line.split()[2:4] == ["receive", "billing"])
    i = lines.index(once)
    assert found([*lines[:i + 1], once, *lines[i + 1:]]) == {
        "broker-no-duplicate-without-redelivery"}


def test_a_core_message_handed_twice_or_out_of_order_is_caught(clean):
    _, lines, _ = clean
    got = [line for line in lines if line.split()[2:4] == ["receive-core", "0"]]
    i = lines.index(got[0])
    assert found([*lines[:i + 1], got[0], *lines[i + 1:]]) == {"broker-core-at-most-once"}
    # a message from the same publisher on the same topic with an earlier seq, handed after
    pubs = {line.split()[3]: line.split() for line in lines if line.split()[2] == "publish-core"}
    x = next(line for line in got if int(pubs[line.split()[4]][5]) > 1)
    t, node, _, _, msg = x.split()[:5]
    _, origin, _, _, topic, seq = pubs[msg]
    i = lines.index(x)
    forged = [f"{t} {origin} publish-core c9999999 {topic} {int(seq) - 1}",
              f"{t} {node} receive-core 0 c9999999 from {origin}"]
    assert found([*lines[:i + 1], *forged, *lines[i + 1:]]) == {"broker-core-in-order"}


def test_views_that_disagree_at_a_check_are_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    head, data = lines[i].split(" hist check ")
    d = json.loads(data)
    d["alive_views"].append(d["alive_views"][d["alive"]["n0004"]][1:])
    d["alive"]["n0004"] = len(d["alive_views"]) - 1
    assert found([*lines[:i], f"{head} hist check {json.dumps(d)}", *lines[i + 1:]]) == {
        "membership-agrees"}
    d = json.loads(data)
    view = json.loads(json.dumps(d["store_views"][d["store"]["n0005"]]))
    (counter,) = [k for k in view if k[0] == "c0"]
    counter[2] += 1  # one counter's value, on one node (not the first node's view)
    d["store_views"].append(view)
    d["store"]["n0005"] = len(d["store_views"]) - 1
    assert found([*lines[:i], f"{head} hist check {json.dumps(d)}", *lines[i + 1:]]) == {
        "store-digests-equal", "counter-sum"}


def test_a_registry_write_the_nodes_do_not_hold_is_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    d = json.loads(lines[i].split(" hist check ")[1])
    owner, life = next(iter(d["up"].items()))
    t = lines[i - 1].split()[0]
    forged = hist(t, owner, "reg", {"key": f"{owner}/i999999", "ts": [1, 0, owner],
                                    "life": life, "gone": False})
    assert found([*lines[:i], forged, *lines[i:]]) == {"registry-write-kept"}
    # written in an earlier life of its owner: its instances died with that life
    forged = hist(t, owner, "reg", {"key": f"{owner}/i999999", "ts": [1, 0, owner],
                                    "life": life - 1, "gone": False})
    assert found([*lines[:i], forged, *lines[i:]]) == set()

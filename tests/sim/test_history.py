"""Issue 23: the checker over the event log (sim/history.py) agrees with the run's own check
on a clean log and finds each kind of violation planted into a copy of the log: the history
of what clients did and were told, and what the nodes held, are judged from the log alone.

One short run writes the log (module fixture, about 12 s); every other test edits a copy of
its lines in memory."""

from __future__ import annotations

import hashlib
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


def test_the_history_records_change_nothing_the_run_decides(clean, monkeypatch):
    """The same run without writing them gives the log without them, byte for byte."""
    _, lines, result = clean
    monkeypatch.setattr(NemesisSimulation, "hist", lambda self, *a, **k: None)
    monkeypatch.setattr(NemesisSimulation, "_observed", lambda self, *a: None)
    monkeypatch.setattr(NemesisSimulation, "_history_check", lambda self: {})
    plain = NemesisSimulation(load("nemesis", SHORT), seed=2).run()
    without = "".join(line + "\n" for line in lines if " hist " not in line)
    assert hashlib.sha256(without.encode()).hexdigest() == plain["event_log_sha256"]
    assert plain["checked_ops"] == result["checked_ops"]
    assert hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest() \
        == result["event_log_sha256"]


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


def test_a_log_that_is_not_a_whole_nemesis_log_is_refused(clean):
    _, lines, _ = clean
    plain = [line for line in lines if " hist " not in line and " receive-core " not in line]
    with pytest.raises(history.HistoryError, match="no setup record: not the event log"):
        history.check(plain)
    with pytest.raises(history.HistoryError, match="the log is empty"):
        history.check([])
    with pytest.raises(history.HistoryError, match=r"no end record after line .*cut off"):
        history.check(lines[:len(lines) // 2])
    with pytest.raises(history.HistoryError, match="no end record"):
        history.check(lines[:2])  # the setup record alone
    i = check_index(lines)
    with pytest.raises(history.HistoryError, match="the end record counts 1 checks, the "
                       "log holds 0"):
        history.check([*lines[:i], *lines[i + 1:]])
    with pytest.raises(history.HistoryError, match="after the end record"):
        history.check([*lines, lines[-2]])
    with pytest.raises(history.HistoryError, match="unknown history record 'nope'"):
        history.check([*lines[:i], hist("1.0", "-", "nope", {}), *lines[i:]])


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
    # offered twice (a redelivery), handed over twice: nothing wrong
    name, msg = once.split()[3:5]
    offer = hist(once.split()[0], "-", "offer", {"name": name, "msg": msg})
    assert found([*lines[:i], offer, once, *lines[i:]]) == set()


def test_a_dead_lettered_message_is_named_as_such(clean):
    _, lines, _ = clean
    msg = next(line.split()[3] for line in lines if line.split()[2] == "publish")
    kept = [line for line in lines
            if not (line.split()[2] == "receive" and line.split()[4] == msg)]
    i = check_index(kept)
    dead = hist(kept[i].split()[0], "n0001", "dead", {"name": "audit", "msg": msg,
                                                      "why": "attempt 5"})
    (v,) = [v for v in history.check([*kept[:i], dead, *kept[i:]]).violations
            if "audit" in v["detail"]]
    assert v["invariant"] == "broker-durable-delivered" and "dead-lettered: attempt 5" in \
        v["detail"]


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


def edit_check(lines: list[str], edit) -> list[str]:
    """`lines` with the check record's data changed by edit(data)."""
    i = check_index(lines)
    head, data = lines[i].split(" hist check ")
    d = json.loads(data)
    edit(d)
    return [*lines[:i], f"{head} hist check {json.dumps(d)}", *lines[i + 1:]]


def test_a_value_no_client_wrote_is_caught(clean):
    _, lines, _ = clean

    def invent(d):
        for view in d["store_views"]:
            (entry,) = [k for k in view if k[0] == "r1"]
            entry[1][1] = "not-written"
    assert found(edit_check(lines, invent)) == {"lww-no-invented-value"}


def test_set_members_no_client_added_or_all_removed_are_caught(clean):
    _, lines, _ = clean

    def invent(d):
        for view in d["store_views"]:
            for k in view:
                if k[0] == "s1.0":
                    k[4] = sorted([*k[4], "zz"])
    assert found(edit_check(lines, invent)) == {"set-no-invented-member"}
    # an acknowledged remove of every tag of a member the nodes still show
    d = json.loads(lines[check_index(lines)].split(" hist check ")[1])
    entry = next(k for k in d["store_views"][0] if k[0].startswith("s") and k[4])
    key, member = entry[0], entry[4][0]
    tags = [t for line in lines if " hist op " in line
            for op in [json.loads(line.split(" hist op ")[1])]
            if op["kind"] == "add" and op["key"] == key and op["element"] == member
            for t in op["tags"]]
    i = check_index(lines)
    t = lines[i - 1].split()[0]
    forged = [hist(t, "n0001", "op", {"id": 10**9, "kind": "remove", "key": key,
                                      "element": member, "tags": tags}),
              hist(t, "n0001", "acked", 10**9)]
    assert found([*lines[:i], *forged, *lines[i:]]) == {"set-acked-remove-kept"}


def test_a_set_tag_made_twice_is_caught(clean):
    _, lines, _ = clean
    add = next(line for line in lines if " hist op " in line and '"kind":"add"' in line)
    op = json.loads(add.split(" hist op ")[1])
    again = add.replace(f'"id":{op["id"]}', '"id":1000000000')
    i = lines.index(add)
    assert found([*lines[:i + 1], again, *lines[i + 1:]]) == {"set-tag-unique"}


def test_registries_that_differ_are_caught(clean):
    _, lines, _ = clean

    def extra(d):
        view = dict(d["registry_views"][d["registry"]["n0006"]])
        view["n0006/i999999"] = [[1, 0, "n0006"], True]
        d["registry_views"].append(view)
        d["registry"]["n0006"] = len(d["registry_views"]) - 1
    assert found(edit_check(lines, extra)) == {"registry-digests-equal"}


def test_a_core_message_handed_to_a_subscriber_whose_pattern_does_not_match_is_caught(clean):
    _, lines, _ = clean
    paid = next(line for line in lines if line.split()[2] == "publish-core"
                and line.split()[4] == "orders.paid")
    t, origin, _, msg = paid.split()[:4]
    i = lines.index(paid)
    # core1 subscribes to orders.created only
    forged = f"{t} n0017 receive-core 1 {msg} from {origin}"
    assert found([*lines[:i + 1], forged, *lines[i + 1:]]) == {"broker-core-matching"}


def test_a_probe_that_never_arrived_is_caught(clean):
    _, lines, _ = clean
    probe = json.loads(next(line for line in lines if " hist probe " in line)
                       .split(" hist probe ")[1])
    kept = [line for line in lines
            if not (line.split()[2] == "receive-core" and line.split()[4] == probe["msg"])]
    assert len(kept) < len(lines)
    assert found(kept) == {"broker-core-delivered-when-healed"}


def test_an_exception_without_a_node_is_caught(clean):
    _, lines, _ = clean
    i = check_index(lines)
    exc = hist(lines[i].split()[0], "-", "exception", {"detail": "ValueError: x"})
    (v,) = history.check([*lines[:i], exc, *lines[i:]]).violations
    assert v["invariant"] == "no-crash-from-exception" and v["nodes"] == []

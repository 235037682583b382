"""Real daemons on loopback: join, agree, crash, restart, leave, wrong secret, locks, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import trio

from .cluster import Daemon, control, control_stream, wait_for

# member events that mean "this member stopped answering" (a graceful leave is "left")
TROUBLE = ("suspect", "dead")


def all_alive(daemons, names) -> bool:
    for d in daemons:
        members = d.members()
        if any(members.get(n, {}).get("status") != "alive" for n in names):
            return False
    return True


def test_five_nodes_join_through_one_seed_and_agree(cluster):
    seed = cluster.add("n1")
    others = [cluster.add(f"n{i}", join=[seed.addr]) for i in range(2, 6)]
    everyone = [seed, *others]
    names = [d.name for d in everyone]
    wait_for(lambda: all_alive(everyone, names), 20, "5 alive members everywhere")
    views = [{(m["name"], m["address"], m["id"]) for m in d.members().values()}
             for d in everyone]
    assert all(v == views[0] for v in views), "members differ between nodes"
    ids = {m[2] for m in views[0]}
    assert len(ids) == 5 and all(len(i) == 26 for i in ids)


def test_kill9_is_dead_then_restart_rejoins_with_higher_incarnation(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    c = cluster.add("c", join=[a.addr])
    wait_for(lambda: all_alive([a, b, c], ["a", "b", "c"]), 10, "3 alive")
    inc_before = a.members()["c"]["incarnation"]
    c.kill9()
    wait_for(lambda: a.status_of("c") == "dead" and b.status_of("c") == "dead", 20,
             "c dead on a and b")
    # restart with the same data dir and no --join: it rejoins from its saved peers
    c.start()
    wait_for(lambda: all_alive([a, b, c], ["a", "b", "c"]), 15, "c alive again")
    assert a.members()["c"]["incarnation"] > inc_before
    assert b.members()["c"]["incarnation"] > inc_before


async def joins_watched(cluster, a, events, name):
    """Start member `name` joining through `a` while `events` (a's members.watch) is open;
    its join showing there proves the watch live. Returns once both see each other alive."""
    d = await trio.to_thread.run_sync(lambda: cluster.add(name, join=[a.addr]))
    await events.next(lambda e: (e["name"], e["kind"]) == (name, "join"), 10,
                      f"{name}'s join on a")
    await trio.to_thread.run_sync(wait_for, lambda: all_alive([a, d], ["a", name]), 10,
                                  "2 alive")
    return d


def test_sigterm_leaves_gracefully_and_exits_zero_fast(cluster):
    a = cluster.add("a")

    async def main():
        async with control_stream(a.data_dir, "members.watch") as events:
            b = await joins_watched(cluster, a, events, "b")
            took = await trio.to_thread.run_sync(b.terminate)
            await events.next(lambda e: (e["name"], e["kind"]) == ("b", "left"), 5,
                              "b left on a")
            # a graceful leave must not turn into a death: watch a few more probe rounds
            # (0.5 s each on the local profile) for anything a missed leave would cause
            await trio.sleep(1.5)
            return took, events.seen

    took, seen = trio.run(main)
    b = cluster.daemons["b"]
    assert b.proc.returncode == 0
    assert took < 2.0, f"shutdown took {took:.2f} s"
    about_b = [e["kind"] for e in seen if e["name"] == "b"]
    assert about_b[-1] == "left" and not set(about_b) & set(TROUBLE), about_b
    assert a.status_of("b") == "left"


def test_cli_leave_command(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    wait_for(lambda: all_alive([a, b], ["a", "b"]), 10, "2 alive")
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "leave", "--data-dir",
                          str(b.data_dir)],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    b.proc.wait(5)
    assert b.proc.returncode == 0
    wait_for(lambda: a.status_of("b") == "left", 5, "b left on a")


def test_wrong_secret_is_refused_quickly_with_a_clear_message(cluster):
    from meshd.secure.keyring import format_secret, new_secret

    a = cluster.add("a")
    intruder = Daemon(cluster.root, "intruder", format_secret(new_secret()))
    start = time.monotonic()
    intruder.start(join=[a.addr], wait=False)
    intruder.proc.wait(10)
    took = time.monotonic() - start
    err = intruder.log.read_text()
    assert intruder.proc.returncode == 1
    assert "secret does not match" in err
    assert "Traceback" not in err
    assert took < 5.0 + 2.0  # handshake bound plus interpreter start-up
    assert "intruder" not in a.members()
    # no secret at all: refused before anything starts
    nosecret = Daemon(cluster.root, "nosecret", "")
    nosecret.start(join=[a.addr], wait=False, env={"MESHD_SECRET": ""})
    nosecret.proc.wait(10)
    assert nosecret.proc.returncode == 1
    assert "needs its secret" in nosecret.log.read_text()


def test_second_node_on_same_data_dir_is_refused(cluster):
    a = cluster.add("a")
    twin = Daemon(cluster.root, "a", cluster.secret)
    twin.start(wait=False)
    twin.proc.wait(10)
    assert twin.proc.returncode == 1
    assert "in use by another meshd" in twin.log.read_text()
    assert a.proc.poll() is None


def test_duplicate_name_is_reported(cluster):
    a = cluster.add("a")
    dup = Daemon(cluster.root / "other", "a", cluster.secret)
    (cluster.root / "other").mkdir()
    dup.start(join=[a.addr], wait=False)
    dup.proc.wait(15)
    assert dup.proc.returncode == 1
    assert "already used" in dup.log.read_text()


def test_secret_files_are_private_and_invite_prints_a_working_command(cluster):
    a = cluster.add("a")
    for f in ("identity.key", "keyring.json", "state.json"):
        assert oct((a.data_dir / f).stat().st_mode & 0o777) == "0o600", f
    assert oct((a.data_dir / "meshd.sock").stat().st_mode & 0o777) == "0o600"
    inv = control(a.data_dir, "invite")
    assert inv["command"] == (f"MESHD_SECRET={inv['secret']} MESHD_AUTH_ROOT="
                              f"{inv['auth_root']} meshd up --join {a.addr}")
    # the printed secret lets a new node in
    b = Daemon(cluster.root, "b", inv["secret"])
    cluster.daemons["b"] = b
    b.start(join=[a.addr])
    wait_for(lambda: all_alive([a, b], ["a", "b"]), 10, "b joined with the invite")


def test_cli_members_json_and_errors(cluster):
    a = cluster.add("a", extra=("--tags", "region=eu", "--tags", "role=web"))
    env = {**os.environ, "MESHD_DATA_DIR": str(a.data_dir)}
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "members", "--json"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    me = rows[0]
    for key in ("name", "id", "address", "status", "incarnation", "tags"):
        assert key in me
    assert me["tags"] == {"region": "eu", "role": "web"}
    assert me["status"] == "alive" and me["reach"] == "self"
    b = cluster.add("b", join=[a.addr])
    wait_for(lambda: all_alive([a, b], ["a", "b"]), 10, "b joined")
    # b answers a directly within a second or two (measure pings, then probes)
    wait_for(lambda: a.members()["b"]["reach"] == "direct", 10, "b reached directly")
    human = subprocess.run([sys.executable, "-m", "meshd_cli", "members"],
                           env={**env, "COLUMNS": "160"}, capture_output=True, text=True,
                           timeout=10)
    assert "region=eu" in human.stdout and "direct" in human.stdout
    missing = subprocess.run([sys.executable, "-m", "meshd_cli", "members", "--data-dir",
                              str(cluster.root / "nothing-here")], capture_output=True,
                             text=True, timeout=10)
    assert missing.returncode == 1
    assert missing.stderr.startswith("503 unavailable")
    assert "meshd up" in missing.stderr and "Traceback" not in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "meshd_cli", "join", "not a:host:x"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1 and bad.stderr.startswith("400 bad request")


def test_print_settings_layers(tmp_path):
    cfg = tmp_path / "meshd.toml"
    cfg.write_text('profile = "wan"\n[membership]\nprobe_interval = 7.0\n')
    env = {**os.environ, "MESHD_MEMBERSHIP_GOSSIP_NODES": "5"}
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "up", "--config", str(cfg),
                          "--print-settings", "--json", "--name", "flagged"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["profile"] == "wan"
    assert s["membership"]["probe_interval"] == 7.0  # toml over profile
    assert s["membership"]["probe_timeout"] == 3.0  # wan profile
    assert s["membership"]["gossip_nodes"] == 5  # env over toml/profile
    assert s["node"]["name"] == "flagged"  # flag
    # the TOML form shows every section, and reads back as the same settings
    text = subprocess.run([sys.executable, "-m", "meshd_cli", "up", "--config", str(cfg),
                           "--print-settings"], env={**env, "MESHD_DEBUG_TRACE_SAMPLE": "0.5"},
                          capture_output=True, text=True, timeout=10)
    import tomllib

    shown = tomllib.loads(text.stdout)
    assert set(shown) == {"profile", "node", "membership", "limits", "rpc", "store", "broker",
                          "debug", "api", "web", "runtime"}
    assert shown["debug"]["trace_sample"] == 0.5 and shown["broker"] == s["broker"]
    bad = subprocess.run([sys.executable, "-m", "meshd_cli", "up", "--print-settings"],
                         env={**os.environ, "MESHD_MEMBERSHIP_PROBE_INTERVAL": "soon"},
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1 and "probe_interval must be float" in bad.stderr


def test_keys_roll_across_the_cluster_without_downtime(cluster):
    from meshd.secure.keyring import format_secret, new_secret

    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    c = cluster.add("c", join=[a.addr])
    names = ["a", "b", "c"]
    wait_for(lambda: all_alive([a, b, c], names), 20, "3 alive")
    new = format_secret(new_secret())

    async def roll():
        # every member watches the others through the roll and a few probe rounds after it
        # (0.5 s each on the local profile): a packet sealed with a key its receiver lacks
        # is dropped, which shows as a suspicion
        async with control_stream(a.data_dir, "members.watch") as on_a, \
                control_stream(b.data_dir, "members.watch") as on_b, \
                control_stream(c.data_dir, "members.watch") as on_c:
            for op, d, secret in (("install", a, new), ("use", a, new),
                                  ("remove", b, cluster.secret)):
                r = await trio.to_thread.run_sync(
                    lambda d=d, op=op, secret=secret: control(d.data_dir, f"keys.{op}",
                                                              secret=secret))
                assert r["ok"] == 3 and not r["errors"], (op, r)
            listing = await trio.to_thread.run_sync(control, c.data_dir, "keys.list")
            await trio.sleep(2)
            return listing, {"a": on_a.seen, "b": on_b.seen, "c": on_c.seen}

    listing, seen = trio.run(roll)
    assert [k["key"] for k in listing["keys"]] == [new]
    assert listing["keys"][0]["nodes"] == 3 and listing["keys"][0]["primary_on"] == 3, listing
    trouble = {k: [e for e in v if e["kind"] in TROUBLE] for k, v in seen.items()}
    assert trouble == {"a": [], "b": [], "c": []}, "the roll must not cost any member"
    assert all_alive([a, b, c], names)
    # only the new secret gets in now; the old one is refused
    late = Daemon(cluster.root, "late", new)
    cluster.daemons["late"] = late
    late.start(join=[a.addr])
    old = Daemon(cluster.root, "old", cluster.secret)
    old.start(join=[a.addr], wait=False)
    old.proc.wait(10)
    assert old.proc.returncode == 1 and "secret does not match" in old.log.read_text()
    bad = subprocess.run([sys.executable, "-m", "meshd_cli", "keys", "remove", new, "--data-dir",
                          str(a.data_dir)], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1 and "primary" in bad.stderr


def test_sigint_also_leaves_and_watch_streams_member_events(cluster):
    import signal

    a = cluster.add("a")

    async def main():
        async with control_stream(a.data_dir, "members.watch") as events:
            b = await joins_watched(cluster, a, events, "b")
            b.proc.send_signal(signal.SIGINT)
            return await events.next(lambda e: e["kind"] == "left", 8, "a left event")

    left = trio.run(main)
    b = cluster.daemons["b"]
    b.proc.wait(5)
    assert b.proc.returncode == 0
    assert {"kind": "left", "name": "b", "address": b.addr}.items() <= left.items()


def test_daemons_that_agree_exchange_digests_not_tables(cluster):
    """Issue 22: anti-entropy between daemons that speak membership 3 sends bucket digests;
    once their tables agree, nothing else travels (no full table, no states)."""
    env = {"MESHD_MEMBERSHIP_PUSH_PULL_INTERVAL": "0.5"}
    a = cluster.add("a", env=env)
    b = cluster.add("b", join=[a.addr], env=env)
    c = cluster.add("c", join=[a.addr], env=env)

    def stats(d: Daemon) -> dict:
        return control(d.data_dir, "status")["stats"]

    wait_for(lambda: all(stats(d)["push_pulls_same"] >= 3 for d in (a, b, c)), 30,
             "digest rounds that found the tables equal")
    for d in (a, b, c):
        s = stats(d)
        assert s["push_pulls_full"] == 0, s  # every peer advertises membership 3
        assert s["push_pulls_digest"] >= s["push_pulls_same"] >= 3
        assert s["push_pulls_refused"] == 0 and s["decode_errors"] == 0
        assert d.members()[d.name]["protocols"]["membership"] == [2, 3]

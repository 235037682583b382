"""The runtime with real daemons: `meshd run examples/greeter --replicas 2` places two
instances on two nodes and calls answer; a killed process is restarted and counted; one that
always crashes is `failed` after the start limit; a killed node's replica is placed on
another node after the grace period; a restarted node brings its replicas back; stopping a
daemon leaves no process of its replicas behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshd.runtime.process import group_alive

from .cluster import control, wait_for
from .test_broker import FAST, ready

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter"
ENV = {**FAST, "MESHD_RUNTIME_GRACE": "3", "MESHD_RUNTIME_STOP_TIMEOUT": "3"}


def meshd(d, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir", str(d.data_dir)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def ok(d, *args: str) -> dict:
    out = meshd(d, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def replicas(d, name: str) -> list[dict]:
    return ok(d, "ps", name)["replicas"]


def running(d, name: str, n: int) -> bool:
    rows = replicas(d, name)
    return len(rows) == n and all(r["state"] == "running" and r["pid"] for r in rows)


def test_run_place_call_restart_fail_and_move(cluster, tmp_path):
    a = cluster.add("a", env=ENV)
    b = cluster.add("b", join=[a.addr], env=ENV)
    c = cluster.add("c", join=[a.addr], env=ENV)
    ready(a, b, c)
    r = ok(a, "run", str(GREETER), "--replicas", "2")
    assert (r["name"], r["replicas"], r["version"]) == ("greeter", 2, 1)
    wait_for(lambda: running(a, "greeter", 2), 30, "two greeters running")
    rows = replicas(c, "greeter")  # the same view from any node
    nodes = {x["node"] for x in rows}
    assert len(nodes) == 2  # spread over two nodes
    wait_for(lambda: len(control(c.data_dir, "describe", service="greeter")["instances"]) == 2,
             20, "both registered")
    out = meshd(c, "call", "greeter", "Greeter.Hello", '{"name": "Ada"}')
    assert out.returncode == 0 and "Hello Ada" in out.stdout, out.stderr
    # its output is in the logs under its name
    def logged() -> list[dict]:
        out = meshd(a, "logs", "greeter", "-n", "100", "--json")
        return [json.loads(x) for x in out.stdout.splitlines()]
    wait_for(lambda: any("registered greeter" in r["message"] and r["fields"].get("stream")
                         == "stderr" for r in logged()), 10, "its stderr in the logs")

    # kill -9 one process: restarted (with backoff) and counted
    victim = rows[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: any(x["slot"] == victim["slot"] and x["state"] == "running"
                         and x["pid"] != victim["pid"] and x["restarts"] == 1
                         for x in replicas(a, "greeter")), 20, "the killed replica back")

    # a service that always crashes: failed after the start limit, with the reason
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "main.py").write_text("import sys; print('boom', file=sys.stderr); sys.exit(7)\n")
    ok(a, "run", str(crash), "--name", "crasher", "--node", "b")
    wait_for(lambda: any(x["state"] == "failed" for x in replicas(a, "crasher")), 30,
             "crasher failed")
    (row,) = replicas(a, "crasher")
    assert row["node"] == "b" and "exit code 7" in row["reason"] and row["restarts"] == 4
    # an unknown selector: pending with the reason, nothing else disturbed
    ok(a, "run", str(crash), "--name", "nowhere", "--node", "zone=mars")
    wait_for(lambda: any(x["state"] == "pending" and "zone=mars" in x["reason"]
                         for x in replicas(a, "nowhere")), 20, "nowhere pending")
    ok(a, "kill", "nowhere")
    ok(a, "kill", "crasher")

    # kill -9 a node that runs a greeter: placed on the node left after the grace period
    lost = next(d for d in (b, c) if d.name in nodes)
    spare = next(d for d in (a, b, c) if d.name not in nodes)
    pids = [x["pid"] for x in replicas(a, "greeter") if x["node"] == lost.name]
    lost.kill9()
    for pid in pids:  # its processes go with it (the parent-death signal)
        wait_for(lambda pid=pid: not group_alive(pid), 10, "the killed node's process gone")
    start = time.monotonic()
    wait_for(lambda: {x["node"] for x in replicas(a, "greeter")
                      if x["state"] == "running"} == (nodes - {lost.name}) | {spare.name},
             3 + 10 + 20, "the replica placed on the spare node")
    assert time.monotonic() - start <= 3 + 10 + 20


def test_a_restarted_node_brings_its_replicas_back_and_stopping_leaves_no_orphan(cluster):
    a = cluster.add("a", env=ENV)
    b = cluster.add("b", join=[a.addr], env=ENV)
    ready(a, b)
    # running code on the mesh's nodes takes an admin: b's operator acts as node b
    out = meshd(b, "run", str(GREETER), "--name", "sneaky")
    assert out.returncode == 1 and out.stderr.startswith("403"), out.stderr
    ok(a, "run", str(GREETER), "--name", "everywhere", "--node", "*")
    wait_for(lambda: running(a, "everywhere", 2), 30, "one on each node")
    on_b = next(x for x in replicas(a, "everywhere") if x["node"] == "b")
    # a graceful stop of b stops its replica's whole process group
    b.terminate()
    assert not group_alive(on_b["pid"])
    # b back: its replica back
    b.start(join=[a.addr])
    wait_for(lambda: running(a, "everywhere", 2), 40, "b's replica back")
    new = next(x for x in replicas(a, "everywhere") if x["node"] == "b")
    assert new["pid"] != on_b["pid"]


TAGGED = '''
import trio
from dataclasses import dataclass
from meshd_sdk import Service

VERSION = "{version}"
{crash}

@dataclass
class Req:
    name: str


@dataclass
class Resp:
    msg: str


service = Service("tagged")


@service.handler("Tagged.Version")
async def version(req: Req) -> Resp:
    return Resp(msg=f"{{VERSION}} for {{req.name}}")


trio.run(service.run)
'''


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def tagged_repo(tmp_path: Path) -> Path:
    """A local git repository with tags v1 and v2 (answering their version) and v3 (exits
    at once)."""
    repo = tmp_path / "tagged"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for tag, crash in (("v1", ""), ("v2", ""), ("v3", "raise SystemExit(3)")):
        (repo / "main.py").write_text(TAGGED.format(version=tag, crash=crash))
        git(repo, "add", "main.py")
        git(repo, "commit", "-q", "-m", tag)
        git(repo, "tag", tag)
    return repo


def answers(d, n: int = 4) -> set[str]:
    out = set()
    for _ in range(n):
        r = meshd(d, "call", "tagged", "Tagged.Version", '{"name": "x"}', "--json")
        if r.returncode == 0:
            out.add(json.loads(r.stdout)["msg"])
    return out


def test_git_tags_rolling_update_a_failed_version_kept_back_and_health_restarts(
        cluster, tmp_path):
    env = {**ENV, "MESHD_RUNTIME_HEALTHY_DEADLINE": "20", "MESHD_RUNTIME_HEALTH_GRACE": "1",
           "MESHD_RPC_INSTANCE_TTL": "2"}
    a = cluster.add("a", env=env)
    b = cluster.add("b", join=[a.addr], env=env)
    ready(a, b)
    repo = tagged_repo(tmp_path)
    ok(a, "run", f"{repo}@v1", "--name", "tagged", "--replicas", "2")
    wait_for(lambda: running(a, "tagged", 2), 40, "two v1 replicas")
    v1 = {x["slot"]: x for x in replicas(a, "tagged")}
    assert {x["revision"] for x in v1.values()} == {git(repo, "rev-parse", "v1^{commit}")}
    wait_for(lambda: answers(a) == {"v1 for x"}, 20, "v1 answers")

    # a rolling update to v2: one replica at a time, the next after the new one is healthy
    ok(a, "update", "tagged", f"{repo}@v2")
    seen = []
    def rolled() -> bool:
        r = ok(a, "ps", "tagged")
        seen.append(r)
        return (r["specs"][0]["rollout"] or {}).get("state") == "done" and running(
            a, "tagged", 2)
    wait_for(rolled, 60, "v2 rolled out")
    both = [[x for x in r["replicas"]] for r in seen]
    # one moved while the other still ran v1 ...
    assert any(sorted(x.get("target") for x in rows) == [1, 2]
               and any(x["version"] == 1 and x["state"] == "running" for x in rows)
               for rows in both), seen
    # ... and never both at once: when both are moved, one of them already runs v2 healthy
    for rows in both:
        if [x.get("target") for x in rows] == [2, 2]:
            assert any(x["version"] == 2 and x["state"] == "running" and x["healthy"]
                       for x in rows), rows
    v2 = replicas(a, "tagged")
    assert {x["version"] for x in v2} == {2}
    assert {x["revision"] for x in v2} == {git(repo, "rev-parse", "v2^{commit}")}
    wait_for(lambda: answers(a) == {"v2 for x"}, 20, "v2 answers")

    # v3 exits at once: the rollout fails on its first replica and v2 is kept
    before = {x["slot"]: x["pid"] for x in v2}
    ok(a, "update", "tagged", f"{repo}@v3")
    wait_for(lambda: (ok(a, "ps", "tagged")["specs"][0]["rollout"] or {}).get("state")
             == "failed", 40, "the v3 rollout failed")
    (spec,) = ok(a, "ps", "tagged")["specs"]
    assert spec["version"] == 3 and "v2 kept" in spec["rollout"]["reason"]
    assert "exit code 3" in spec["rollout"]["reason"], spec
    wait_for(lambda: running(a, "tagged", 2)
             and {x["version"] for x in replicas(a, "tagged")} == {2}, 30, "v2 back")
    assert answers(a) == {"v2 for x"}
    # only the first slot tried v3: the other's process never stopped
    assert replicas(a, "tagged")[1]["pid"] == before["1"]
    text = meshd(a, "ps", "tagged").stdout
    assert "tagged: v3 failed to roll out" in text, text

    # the health check: a replica that hangs (SIGSTOP: its heartbeat stops) is restarted
    victim = replicas(a, "tagged")[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    wait_for(lambda: any(x["slot"] == victim["slot"] and x["state"] == "running"
                         and x["pid"] != victim["pid"] for x in replicas(a, "tagged")),
             30, "the hung replica restarted")
    after = next(x for x in replicas(a, "tagged") if x["slot"] == victim["slot"])
    assert after["restarts"] == victim["restarts"] + 1
    assert not group_alive(victim["pid"])
    # the new process registers and stays up
    wait_for(lambda: any(x["pid"] == after["pid"] and x["healthy"]
                         for x in replicas(a, "tagged")), 20, "the new one healthy")
    time.sleep(3)
    assert any(x["pid"] == after["pid"] and x["state"] == "running"
               for x in replicas(a, "tagged"))
    logged = meshd(a, "logs", "tagged", "-n", "200").stdout
    assert "health check failed" in logged, logged


def test_keep_on_exit_leaves_replicas_running_and_the_next_daemon_adopts_them(cluster):
    keep = {**ENV, "MESHD_RUNTIME_KEEP_ON_EXIT": "1"}
    a = cluster.add("a", env=keep)
    ready(a)
    ok(a, "run", str(GREETER), "--name", "kept")
    wait_for(lambda: running(a, "kept", 1), 30, "kept running")
    wait_for(lambda: meshd(a, "call", "greeter", "Greeter.Hello", '{"name": "A"}')
             .returncode == 0, 20, "it answers")
    (first,) = replicas(a, "kept")
    pid = first["pid"]
    try:
        a.terminate()  # a graceful stop: with keep_on_exit the replica runs on
        assert group_alive(pid)
        a.start()
        wait_for(lambda: running(a, "kept", 1), 30, "kept adopted")
        (adopted,) = replicas(a, "kept")
        assert adopted["pid"] == pid and adopted["restarts"] == 0
        # it registered again with the new daemon (MESHD_RECONNECT) and answers
        wait_for(lambda: "Hello B" in meshd(a, "call", "greeter", "Greeter.Hello",
                                            '{"name": "B"}').stdout, 20, "it answers again")
        logged = meshd(a, "logs", "kept", "-n", "200").stdout
        assert f"adopted pid {pid}" in logged, logged
        assert "registered greeter" in logged  # its output, read from its file
        # a daemon without keep_on_exit finds it left over: stopped, and started anew
        a.terminate()
        assert group_alive(pid)
        a.start(env={"MESHD_RUNTIME_KEEP_ON_EXIT": "0"})
        wait_for(lambda: not group_alive(pid), 20, "the leftover stopped")
        wait_for(lambda: running(a, "kept", 1) and replicas(a, "kept")[0]["pid"] != pid, 30,
                 "a new process")
        new = replicas(a, "kept")[0]["pid"]
        a.terminate()  # and this one stops with its daemon
        assert not group_alive(new)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

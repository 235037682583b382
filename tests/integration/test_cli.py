"""The cluster commands of `meshd` against real daemons, run as the user runs them
(`python -m meshd_cli ...` in a controlled environment): status, invite, join PEER, graph (table,
DOT, SVG, JSON), ping, new-secret with the keys roll it feeds."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from meshd.secure.keyring import parse_secret

from .cluster import Daemon, control, wait_for


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No MESHD_* of the caller's, the token file in a temp dir (the user's config dir is
    never touched), this tree's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    env["MESHD_TOKEN_FILE"] = str(tmp_path / "config" / "token.json")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.update(extra)
    return env


def meshd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def ok(*args: str, env: dict[str, str]) -> str:
    out = meshd(*args, env=env)
    assert out.returncode == 0, f"meshd {' '.join(args)}: {out.stderr}"
    return out.stdout


def alive(d: Daemon) -> set[str]:
    return {n for n, m in d.members().items() if m["status"] == "alive"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_invite_and_join_a_running_node_to_a_cluster(cluster, tmp_path):
    a = cluster.add("a")
    b = cluster.add("b")  # a one-node cluster of its own (same secret)
    env_a = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    env_b = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))

    st = json.loads(ok("status", "--json", env=env_a))
    assert (st["name"], st["address"], st["data_dir"]) == ("a", a.addr, str(a.data_dir))
    assert st["members"] == {"alive": 1} and st["uptime_s"] >= 0
    for key in ("id", "short_id", "incarnation", "health_score", "links", "version", "stats"):
        assert key in st, key
    human = ok("status", env=env_a).splitlines()
    assert human[0].startswith(f"a ({st['short_id']}) at {a.addr}  meshd {st['version']}")
    assert "members    1 alive" in human[1]
    assert any(line.strip() == f"data dir   {a.data_dir}" for line in human)

    # `meshd invite` prints the one line a new host runs; run exactly that
    line = ok("invite", env=env_a).strip()
    pin = (a.data_dir / "auth-root").read_text().strip()
    assert line == (f"MESHD_SECRET={cluster.secret} MESHD_AUTH_ROOT={pin} meshd up --join "
                    f"{a.addr}")
    assert json.loads(ok("invite", "--json", env=env_a))["command"] == line
    assigns, _, command = line.partition(" meshd up ")
    invited = dict(kv.split("=", 1) for kv in assigns.split())
    c = Daemon(cluster.root, "c", invited["MESHD_SECRET"], env=invited)
    cluster.daemons["c"] = c
    c.start(join=[command.removeprefix("--join ")])
    wait_for(lambda: alive(a) == {"a", "c"}, 10, "c in a's cluster")
    assert (c.data_dir / "auth-root").read_text().strip() == pin
    wait_for(lambda: len(control(c.data_dir, "auth.rules.list")) == 3, 10, "c has a's auth")

    # `meshd join PEER`: the running one-node cluster b joins a's
    assert json.loads(ok("status", "--json", env=env_b))["members"] == {"alive": 1}
    out = ok("join", a.addr, env=env_b)
    assert out.strip() == "joined through 1 of 1 peer(s)"
    wait_for(lambda: all(alive(d) == {"a", "b", "c"} for d in (a, b, c)), 20,
             "one cluster of 3")
    assert json.loads(ok("status", "--json", env=env_b))["members"] == {"alive": 3}
    assert "members    3 alive" in ok("status", env=env_b)
    rows = {r["name"]: r for r in json.loads(ok("members", "--json", env=env_a))}
    assert rows["b"]["address"] == b.addr and rows["b"]["status"] == "alive"
    again = json.loads(ok("join", c.addr, "--json", env=env_b))
    assert again == {"joined": 1, "errors": []}
    # nobody at the peer: one clear line, exit 1
    dead = f"127.0.0.1:{closed_port()}"
    out = meshd("join", dead, env=env_b)
    assert out.returncode == 1 and out.stderr.startswith("503 unavailable: could not join")
    assert dead in out.stderr and "Traceback" not in out.stderr


def test_a_node_given_the_auth_root_joins_later_with_that_root(cluster, tmp_path):
    a = cluster.add("a")
    pin = (a.data_dir / "auth-root").read_text().strip()
    b = cluster.add("b", env={"MESHD_AUTH_ROOT": pin})  # no --join: `meshd join` comes later
    ok("join", a.addr, env=cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir)))
    wait_for(lambda: alive(b) == {"a", "b"}, 10, "b joined")
    [root] = [k["kid"] for k in control(a.data_dir, "auth.keys.list") if k["root"]]
    assert (b.data_dir / "auth-root").read_text().strip() == pin
    assert not (b.data_dir / "admin.token").exists(), "b bootstrapped an auth of its own"
    wait_for(lambda: [k["kid"] for k in control(b.data_dir, "auth.keys.list")
                      if k["root"]] == [root], 10, "b trusts the cluster's root key")


def test_graph_in_every_format_and_ping(cluster, tmp_path):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    c = cluster.add("c", join=[a.addr])
    pairs = {frozenset(p) for p in (("a", "b"), ("a", "c"), ("b", "c"))}

    def edges() -> set[frozenset[str]]:
        return {frozenset((e["a"], e["b"])) for e in control(a.data_dir, "graph")["edges"]}

    wait_for(lambda: edges() == pairs, 30, "every link measured and advertised")
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))

    g = json.loads(ok("graph", "--json", env=env))
    assert g["nodes"] == ["a", "b", "c"]
    assert {frozenset((e["a"], e["b"])) for e in g["edges"]} == pairs
    assert all(e["latency_ms"] > 0 for e in g["edges"])

    text = ok("graph", env=env)
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")]
            for line in text.splitlines() if line.rstrip("│ ").endswith(" ms")]
    assert {frozenset(r[:2]) for r in rows} == pairs and len(rows) == 3, text
    assert all(re.fullmatch(r"\d+\.\d{3} ms", r[2]) for r in rows), text

    dot = ok("graph", "--format", "dot", env=env).splitlines()
    assert dot[0] == "graph meshd {" and dot[-1] == "}"
    found = set()
    for line in dot[1:-1]:
        m = re.fullmatch(r'  "(\w+)" -- "(\w+)" \[label="\d+\.\d\d ms"\];', line)
        assert m, line
        found.add(frozenset(m.groups()))
    assert found == pairs

    svg = ET.fromstring(ok("graph", "--format", "svg", env=env))
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg"
    assert len(svg.findall(f"{ns}circle")) == 3 and len(svg.findall(f"{ns}line")) == 3
    labels = {t.text for t in svg.findall(f"{ns}text")}
    assert {"a", "b", "c"} <= labels
    assert sum(1 for t in labels if t and t.endswith(" ms")) >= 1

    p = json.loads(ok("ping", "b", "--count", "3", "--json", env=env))
    assert (p["node"], p["address"]) == ("b", b.addr)
    assert len(p["rtt_ms"]) == 3 and all(x > 0 for x in p["rtt_ms"])
    assert p["min_ms"] == min(p["rtt_ms"]) and p["min_ms"] <= p["avg_ms"]
    assert p["path"][0] == "a" and p["path"][-1] == "b"
    human = ok("ping", "c", "--count", "2", env=env).splitlines()
    assert len(human) == 3
    for i in range(2):
        assert re.fullmatch(rf"reply from c \({re.escape(c.addr)}\): seq={i} time=\d+\.\d+ ms",
                            human[i]), human[i]
    assert human[2].startswith("min ") and " avg " in human[2]
    out = meshd("ping", "nobody", env=env)
    assert out.returncode == 1
    assert out.stderr.strip() == "404 not found: no live member named 'nobody'"
    assert meshd("ping", "b", "--count", "0", env=env).returncode == 2  # 1..100


def test_new_secret_rolls_in_and_admits_new_nodes(cluster, tmp_path):
    env = cli_env(tmp_path)
    first = ok("new-secret", env=env).strip()
    second = json.loads(ok("new-secret", "--json", env=env))["secret"]
    assert first != second
    assert len(parse_secret(first)) == 32 and len(parse_secret(second)) == 32
    assert parse_secret(first) != parse_secret(cluster.secret)

    a = cluster.add("a")
    env_a = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    assert ok("keys", "install", first, env=env_a).strip() == "install: 1 of 1 node(s) done"
    assert ok("keys", "use", first, env=env_a).strip() == "use: 1 of 1 node(s) done"
    assert ok("keys", "remove", cluster.secret, env=env_a).strip() == \
        "remove: 1 of 1 node(s) done"
    listing = json.loads(ok("keys", "list", "--json", env=env_a))
    assert [k["key"] for k in listing["keys"]] == [first]
    # a host given only the new secret gets in
    b = Daemon(cluster.root, "b", first)
    cluster.daemons["b"] = b
    b.start(join=[a.addr])
    wait_for(lambda: alive(a) == {"a", "b"} == alive(b), 10, "b joined with the new secret")

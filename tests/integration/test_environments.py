"""Issue 13, environments: the full CLI command set driven through `meshd env` against a
node's wss:// proxy, from a second data dir with no daemon (every command, `--json`),
including a tunnel; watches, refusals and the SDK's `Client(env=)` likewise.

One cluster serves the whole file: node a (proxy endpoint on wss://, a test service, a
tunnel) and node b joined to it. "The laptop" is a HOME, an environments file and an empty
data dir: every command runs there as `python -m meshd_cli ...` with environment `prod` (a's
proxy) current, and is compared with the same command run on a's own data dir.

Every command of `meshd` is in exactly one table below (a test walks the click tree and
fails on a command no table has): THROUGH (run through the environment, and which test does
it), OPERATOR_ONLY (refused remotely with the 403 operator line) or LOCAL_BY_NATURE (with
the reason it never goes through an environment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import redis as redis_py
import trio

from meshd.envs import Environments
from meshd.proxy.remote import RemoteControlClient
from meshd.proxy.via import CONNECT_TIMEOUT, Via
from meshd.secure.keyring import format_secret, new_secret
from meshd_cli.main import main as meshd_cli

from .cluster import Cluster, Daemon, Lines, client_stream, control, wait_for
from .engine_servers import redis, why_no_redis
from .test_tls import Pki, admin_token, make_pki, stop, tls_node
from .test_tunnel import EchoServer, free_port, refused, through

READS = "test_reads_through_the_environment_match_the_node"
WRITES = "test_writes_through_the_environment_land_on_the_node"
KEYS = "test_issuer_keys_rotate_and_revoke_through_the_environment"
WATCHES = "test_watches_through_the_environment"
TUNNEL = "test_tunnel_through_the_environment"
REFUSALS = "test_refusals_through_the_environment"
BROKER = "test_broker_through_the_environment"
DEBUG = "test_debug_through_the_environment"
RUNTIME = "test_runtime_through_the_environment"
BOT = "test_bot_map_through_the_environment"
ENGINES = "test_store_engines_through_the_environment"

# Commands that work through an environment as they do locally, and the test that runs
# each through `prod` (with --json where the command has it) and checks its result.
THROUGH: dict[str, str] = {
    "members": READS, "services": READS, "describe": READS, "health": READS,
    "status": READS, "routes": READS, "graph": READS, "ping": READS,
    "store databases": READS, "store tables": READS, "tunnel list": READS,
    "nodes revocations": READS, "auth accounts list": READS, "auth rules list": READS,
    "auth keys list": READS, "auth whoami": READS, "namespaces": READS,
    "call": WRITES, "stream": WRITES, "store write": WRITES, "store read": WRITES,
    "store list": WRITES, "store delete": WRITES, "store counter": WRITES,
    "store set": WRITES, "store export": WRITES, "store import": WRITES,
    "config set": WRITES, "config get": WRITES, "config del": WRITES, "config history": WRITES,
    "auth accounts create": WRITES, "auth accounts delete": WRITES,
    "auth rules create": WRITES, "auth rules delete": WRITES,
    "auth token create": WRITES, "auth token revoke": WRITES, "nodes revoke": WRITES,
    "auth keys revoke": KEYS,
    "watch": WATCHES, "store watch": WATCHES, "config watch": WATCHES,
    "tunnel connect": TUNNEL,
    "publish": BROKER, "subscribe": BROKER, "topics": BROKER, "topics create": BROKER,
    "topics delete": BROKER,
    "logs": DEBUG, "stats": DEBUG, "trace": DEBUG, "traces": DEBUG,
    "auth login": REFUSALS,
    "run": RUNTIME, "ps": RUNTIME, "update": RUNTIME, "kill": RUNTIME,
    "bot map": BOT, "bot unmap": BOT, "bot users": BOT,
    "store databases create": ENGINES, "store migrate": ENGINES,
}

# Commands for the node's operator: through an environment, the op is refused with 403.
OPERATOR_ONLY: dict[str, str] = {
    "invite": "invite", "leave": "leave", "join": "join",
    "keys install": "keys.install", "keys use": "keys.use", "keys remove": "keys.remove",
    "keys list": "keys.list", "tunnel expose": "tunnel.expose",
    "tunnel close": "tunnel.close", "auth bootstrap": "auth.bootstrap",
    "auth keys rotate": "auth.keys.rotate",
}

LOCAL_BY_NATURE: dict[str, str] = {
    "up": "runs a node in this process: the node is wherever it runs",
    "new-secret": "prints fresh random bytes; talks to no node",
    "version": "this CLI's own version",
    "env": "lists the environments file on this machine",
    "env add": "writes the environments file on this machine",
    "env set": "writes the environments file on this machine",
    "env get": "reads the environments file on this machine",
    "env remove": "writes the environments file on this machine",
    "auth logout": "forgets tokens kept on this machine; tells no node",
    "bot slack": "runs the bot beside a node, on its control socket (it refuses --env)",
    "new": "writes a new project's files on this machine; talks to no node",
    "completion": "prints the shell completion script; talks to no node",
    "doctor": "checks the node on this host: its data dir, processes and probes (refuses --env)",
}


def walk(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    """Every runnable command under `group`, as "sub command" paths."""
    if path and group.invoke_without_command:
        yield " ".join(path), group
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from walk(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


COMMANDS = dict(walk(meshd_cli))


def command_of(args: tuple[str, ...]) -> str:
    """The command path that `meshd ARGS` runs (args start with the command)."""
    cmd: click.Command = meshd_cli
    path: list[str] = []
    for arg in args:
        if not isinstance(cmd, click.Group) or arg not in cmd.commands:
            break
        cmd = cmd.commands[arg]
        path.append(arg)
    return " ".join(path)


def has_json(command: str) -> bool:
    return any(p.name == "as_json" for p in COMMANDS[command].params)


def operator_line(op: str) -> str:
    return (f"403 forbidden: {op} is for the node's operator: run it on the node (its control "
            "socket), not through an environment\n")


@dataclass
class Mesh:
    cluster: Cluster
    pki: Pki
    a: Daemon
    b: Daemon
    port: int
    home: Path
    laptop_dir: Path  # a data dir with no daemon
    echo: EchoServer
    env_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.env_file = self.home / "environments.json"

    @property
    def via(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def environ(self, env_file: Path | None = None, **extra: str) -> dict[str, str]:
        """The laptop: no MESHD_* of the caller's, its own HOME (so the user's config dir
        and token file are in it), the environments file, an empty data dir."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
        env.update({"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"),
                    "XDG_DATA_HOME": str(self.home / ".local" / "share"),
                    "MESHD_ENV_FILE": str(env_file or self.env_file),
                    "MESHD_DATA_DIR": str(self.laptop_dir),
                    "PYTHONPATH": os.pathsep.join(sys.path)})
        env.update(extra)
        return env

    def node_environ(self) -> dict[str, str]:
        """On node a itself: its data dir, the local environment."""
        return self.environ(MESHD_DATA_DIR=str(self.a.data_dir), MESHD_ENV="local")


def meshd(*args: str, env: dict[str, str], timeout: float = 60,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, input=stdin)


def ok_json(out: subprocess.CompletedProcess[str], what: str) -> Any:
    assert out.returncode == 0, f"meshd {what}: {out.stderr}"
    return json.loads(out.stdout)


class Laptop:
    """Runs commands on the laptop (through `prod`, or the environment given) and records
    which ones it ran, so each test can prove it drove the commands THROUGH gives it."""

    def __init__(self, mesh: Mesh, test: str) -> None:
        self.mesh = mesh
        self.test = test
        self.driven: set[str] = set()

    def run(self, *args: str, env_file: Path | None = None, stdin: str | None = None,
            **extra: str) -> subprocess.CompletedProcess[str]:
        command = command_of(args)
        assert command in COMMANDS, f"not a command: {args}"
        if has_json(command):
            assert "--json" in args, f"run {command} with --json through the environment"
        self.driven.add(command)
        return meshd(*args, env=self.mesh.environ(env_file, **extra), stdin=stdin)

    def ok(self, *args: str, **kw: Any) -> Any:
        return ok_json(self.run(*args, **kw), " ".join(args))

    def lines(self, *args: str) -> list[Any]:
        out = self.run(*args)
        assert out.returncode == 0, f"meshd {' '.join(args)}: {out.stderr}"
        return [json.loads(x) for x in out.stdout.splitlines()]

    def on_node(self, *args: str) -> Any:
        """The same command run on node a (its data dir, the local environment)."""
        return ok_json(meshd(*args, env=self.mesh.node_environ()), " ".join(args))

    def node_lines(self, *args: str) -> list[Any]:
        out = meshd(*args, env=self.mesh.node_environ())
        assert out.returncode == 0, f"meshd {' '.join(args)} on a: {out.stderr}"
        return [json.loads(x) for x in out.stdout.splitlines()]

    def drove_its_commands(self) -> None:
        mine = {c for c, t in THROUGH.items() if t == self.test}
        assert mine <= self.driven, f"{self.test} did not run {sorted(mine - self.driven)}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("envs")
    cluster = Cluster(root)
    try:
        pki = make_pki(root / "pki")
        a, port = tls_node(cluster, pki)
        b = cluster.add("b", join=[a.addr])
        cluster.service(a)
        echo = EchoServer()
        control(a.data_dir, "tunnel.expose", name="echo", to=f"127.0.0.1:{echo.port}")
        control(a.data_dir, "store.write", key="seed", value=b"1")
        home, laptop_dir = root / "home", root / "laptop"
        home.mkdir()
        laptop_dir.mkdir()
        m = Mesh(cluster, pki, a, b, port, home, laptop_dir, echo)
        wait_for(lambda: any(s["name"] == "testsvc" for s in control(a.data_dir, "services"))
                 and {n for n, r in a.members().items() if r["status"] == "alive"} ==
                 {"a", "b"} and control(a.data_dir, "graph")["edges"] != []
                 and any(r["destination"] == "b" for r in control(a.data_dir, "routes")),
                 30, "the service, b, the a-b link and its route on a")

        env = m.environ()
        added = ok_json(meshd("env", "add", "prod", "--via", m.via, "--ca-file", str(pki.ca),
                              "--json", env=env), "env add")
        assert added == {"name": "prod", "via": m.via, "namespace": "", "ca_file": str(pki.ca),
                         "token": False}
        chosen = meshd("env", "set", "prod", env=env)
        assert chosen.returncode == 0 and chosen.stdout == "current environment: prod\n"
        # the admin account the laptop logs in as, made through prod with the admin token
        created = ok_json(meshd("auth", "accounts", "create", "ops", "--secret", "ops-secret-1",
                                "--scope", "admin", "--token", admin_token(a), "--json",
                                env=env), "accounts create")
        assert created["id"] == "ops"
        login = ok_json(meshd("auth", "login", "--env", "prod", "--id", "ops", "--secret",
                              "ops-secret-1", "--json", env=env), "auth login")
        assert login["account"] == "ops"
        assert Environments(m.env_file).get("prod").token == login["token"]
        yield m
    finally:
        cluster.close()


@pytest.fixture
def laptop(mesh: Mesh, request: pytest.FixtureRequest) -> Laptop:
    assert not (mesh.laptop_dir / "meshd.sock").exists(), "a daemon runs on the laptop"
    return Laptop(mesh, request.node.name)


def test_every_command_is_classified_once():
    tables = (set(THROUGH), set(OPERATOR_ONLY), set(LOCAL_BY_NATURE))
    assert not (tables[0] & tables[1] or tables[0] & tables[2] or tables[1] & tables[2])
    unclassified = set(COMMANDS) - set().union(*tables)
    assert not unclassified, (f"commands no table of test_environments.py classifies (run "
                              f"them through an environment): {sorted(unclassified)}")
    assert set().union(*tables) <= set(COMMANDS), "the tables name commands meshd lacks"
    tests = {name for name in globals() if name.startswith("test_")}
    assert set(THROUGH.values()) <= tests


def test_reads_through_the_environment_match_the_node(mesh, laptop):
    a, b = mesh.a, mesh.b

    def both(*args: str) -> tuple[Any, Any]:
        return laptop.ok(*args), laptop.on_node(*args)

    remote, local = both("members", "--json")
    assert {r["name"]: (r["id"], r["address"]) for r in remote} == \
        {r["name"]: (r["id"], r["address"]) for r in local}
    assert {"a", "b"} <= {r["name"] for r in remote}
    assert [r["name"] for r in remote if r["self"]] == ["a"]

    remote, local = both("services", "--json")
    assert remote == local and "testsvc" in {r["name"] for r in remote}
    remote, local = both("describe", "testsvc", "--json")
    assert remote == local and remote["instances"][0]["node"] == "a"
    remote, local = both("health", "testsvc", "--json")
    assert [(r["id"], r["node"], r["status"]) for r in remote] == \
        [(r["id"], r["node"], r["status"]) for r in local] == [(r["id"], "a", "ok")
                                                              for r in remote]

    remote, local = both("status", "--json")
    assert (remote["name"], remote["id"], remote["address"]) == \
        (local["name"], local["id"], local["address"]) == ("a", local["id"], a.addr)
    # the node's paths are its operator's business, not a remote environment's
    assert local["data_dir"] == str(a.data_dir) and "data_dir" not in remote
    human = meshd("status", env=mesh.environ())
    assert human.returncode == 0 and "data dir" not in human.stdout, human.stderr
    remote, local = both("routes", "--json")
    assert {(r["destination"], r["next_hop"]) for r in remote} == \
        {(r["destination"], r["next_hop"]) for r in local} and \
        ("b", "b") in {(r["destination"], r["next_hop"]) for r in remote}
    remote, local = both("graph", "--json")
    assert remote["nodes"] == local["nodes"] == ["a", "b"]
    assert [(e["a"], e["b"]) for e in remote["edges"]] == \
        [(e["a"], e["b"]) for e in local["edges"]] != []
    remote = laptop.ok("ping", "b", "--count", "2", "--json")
    assert (remote["node"], remote["address"], len(remote["rtt_ms"])) == ("b", b.addr, 2)
    assert remote["path"] == ["a", "b"] and all(x > 0 for x in remote["rtt_ms"])

    remote, local = both("store", "databases", "--json")
    assert remote == local and {"name": "default", "backend": "embedded"} in remote
    remote, local = both("store", "tables", "--database", "default", "--json")
    assert remote == local and "store" in remote
    remote, local = both("tunnel", "list", "--json")
    assert remote == local == [{"name": "echo", "node": "a",
                                "target": f"127.0.0.1:{mesh.echo.port}"}]
    remote, local = both("nodes", "revocations", "--json")
    assert remote == local
    remote, local = both("namespaces", "--json")
    assert remote == local and "default" in {r["name"] for r in remote}

    remote, local = both("auth", "accounts", "list", "--json")
    assert remote == local and "ops" in {r["id"] for r in remote}
    remote, local = both("auth", "rules", "list", "--json")
    assert remote == local and len(remote) >= 3
    remote, local = both("auth", "keys", "list", "--json")
    assert remote == local and [k["signer"] for k in remote if k["root"]] == ["a"]
    # through the environment the user acts, never the node
    who = laptop.ok("auth", "whoami", "--json")
    assert (who["id"], who["scopes"]) == ("ops", ["admin"])
    laptop.drove_its_commands()


def test_writes_through_the_environment_land_on_the_node(mesh, laptop, tmp_path):
    # calls: the service sees the user's account as the caller (locally: the admin token's)
    assert laptop.ok("call", "testsvc", "Test.Caller", '{"text": ""}', "--json") == \
        {"text": "ops"}
    assert laptop.on_node("call", "testsvc", "Test.Caller", '{"text": ""}', "--json") == \
        {"text": "admin"}
    assert laptop.ok("call", "testsvc", "Test.Echo", "-", "--json",
                     stdin='{"text": "from stdin"}') == {"text": "from stdin"}
    streamed = laptop.lines("stream", "testsvc", "Test.Count", '{"n": 3}', "--json")
    assert streamed == laptop.node_lines("stream", "testsvc", "Test.Count", '{"n": 3}',
                                         "--json") == [{"text": str(i)} for i in range(3)]

    # the store: written through prod, read on the node, and back
    rec = laptop.ok("store", "write", "env-k1", "v1", "--meta", "by=laptop", "--json")
    assert (rec["key"], rec["value"], rec["metadata"]) == ("env-k1", "v1", {"by": "laptop"})
    laptop.ok("store", "write", "env-k2", "v2", "--json")
    local = laptop.on_node("store", "read", "env-k1", "--json")
    assert laptop.ok("store", "read", "env-k1", "--json") == local
    assert local["value"] == "v1"
    assert laptop.ok("store", "list", "--prefix", "env-", "--json") == \
        laptop.on_node("store", "list", "--prefix", "env-", "--json") == ["env-k1", "env-k2"]
    assert laptop.ok("store", "counter", "env-hits", "5", "--json")["counter"] == 5
    assert laptop.ok("store", "counter", "--json", "--", "env-hits", "-2")["counter"] == 3
    assert laptop.on_node("store", "counter", "env-hits", "--json")["counter"] == 3
    laptop.ok("store", "set", "add", "env-team", "ada", "--json")
    assert sorted(laptop.ok("store", "set", "add", "env-team", "bob", "--json")["members"]) \
        == ["ada", "bob"]
    assert sorted(laptop.on_node("store", "set", "members", "env-team", "--json")["members"]) \
        == ["ada", "bob"]
    exported = laptop.lines("store", "export", "--json")
    assert exported == laptop.node_lines("store", "export", "--json")
    assert {r["key"] for r in exported} >= {"env-k1", "env-k2", "env-hits", "env-team"}
    dump = tmp_path / "export.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in exported))
    imported = laptop.ok("store", "import", str(dump), "--table", "copy", "--json")
    assert imported == {"imported": len(exported)}
    assert laptop.node_lines("store", "export", "--table", "copy", "--json") == exported
    assert laptop.ok("store", "delete", "env-k1", "--json") == {"deleted": "env-k1"}
    gone = meshd("store", "read", "env-k1", "--json", env=mesh.node_environ())
    assert gone.returncode == 1 and gone.stderr.startswith("404"), gone.stderr

    # config
    assert laptop.ok("config", "set", "env.db", '{"host": "h", "port": 5}', "--json") == \
        {"path": "env.db", "value": {"host": "h", "port": 5}}
    assert laptop.on_node("config", "get", "env.db", "--json") == {"host": "h", "port": 5}
    assert laptop.ok("config", "get", "env.db.port", "--json") == 5
    assert laptop.ok("config", "del", "env.db", "--json") == {"deleted": "env.db"}
    assert laptop.on_node("config", "get", "env", "--json") == \
        laptop.ok("config", "get", "env", "--json")
    assert "db" not in (laptop.on_node("config", "get", "env", "--json") or {})
    history = laptop.ok("config", "history", "env.db", "--json")
    assert [(r["path"], r["deleted"]) for r in history] == [("env.db", True), ("env.db", False)]
    assert history == laptop.on_node("config", "history", "env.db", "--json")

    # auth: accounts, rules and tokens made through prod are the cluster's
    laptop.ok("auth", "accounts", "create", "temp", "--secret", "temp-secret-1", "--scope",
              "temp", "--json")
    assert "temp" in {r["id"] for r in laptop.on_node("auth", "accounts", "list", "--json")}
    laptop.ok("auth", "rules", "create", "temp-calls", "--resource", "service:testsvc:*",
              "--scope", "temp", "--access", "granted", "--json")
    assert "temp-calls" in {r["id"] for r in laptop.on_node("auth", "rules", "list", "--json")}
    token = laptop.ok("auth", "token", "create", "--account", "temp", "--ttl", "600",
                      "--json")["token"]
    assert laptop.ok("auth", "whoami", "--token", token, "--json")["id"] == "temp"
    assert laptop.ok("call", "testsvc", "Test.Caller", '{"text": ""}', "--token", token,
                     "--json") == {"text": "temp"}
    assert laptop.ok("auth", "token", "revoke", token, "--json")["revoked"]
    revoked = laptop.run("auth", "whoami", "--token", token, "--json")
    assert revoked.returncode == 1 and revoked.stderr.startswith("401"), revoked.stderr
    laptop.ok("auth", "rules", "delete", "temp-calls", "--json")
    laptop.ok("auth", "accounts", "delete", "temp", "--json")
    assert "temp" not in {r["id"] for r in laptop.on_node("auth", "accounts", "list", "--json")}
    assert "temp-calls" not in {r["id"] for r in
                                laptop.on_node("auth", "rules", "list", "--json")}

    # node revocation (an identity that is no member: nothing else changes)
    ghost = "0" * 25 + "g"
    assert laptop.ok("nodes", "revoke", ghost, "--json")["id"] == ghost
    assert ghost in {r["id"] for r in laptop.on_node("nodes", "revocations", "--json")}
    laptop.drove_its_commands()


def test_issuer_keys_rotate_and_revoke_through_the_environment(mesh, laptop):
    a, b = mesh.a, mesh.b

    def states() -> dict[str, str]:
        return {k["kid"]: k["state"] for k in laptop.on_node("auth", "keys", "list", "--json")}

    # b's operator (with the admin token) makes b a signer: a's root key endorses b's key
    on_b = mesh.environ(MESHD_DATA_DIR=str(b.data_dir), MESHD_ENV="local")
    kb = ok_json(meshd("auth", "keys", "rotate", "--token", admin_token(a), "--json",
                       env=on_b), "keys rotate on b")
    assert kb["signer"] == "b"
    wait_for(lambda: states().get(kb["kid"]) == "current", 10, "b's key trusted on a")
    # a's operator (rotating makes a private key on the node: never through prod) makes a
    # new key on a (endorsed by a's root), which retires b's
    ka = laptop.on_node("auth", "keys", "rotate", "--json")
    assert ka["signer"] == "a" and ka["kid"] != kb["kid"]
    now = states()
    assert (now[ka["kid"]], now[kb["kid"]]) == ("current", "retired")
    # through prod: revoke b's key; it endorsed nothing, so only it loses its trust
    revoked = laptop.ok("auth", "keys", "revoke", kb["kid"], "--json")
    assert (revoked["revoked"], revoked["keys_untrusted"]) == (kb["kid"], [kb["kid"]])
    after = states()
    assert (after[kb["kid"]], after[ka["kid"]]) == ("revoked", "current")
    # the root cannot be revoked, through prod as on the node: the same one line
    [root] = [k["kid"] for k in laptop.on_node("auth", "keys", "list", "--json") if k["root"]]
    remote = laptop.run("auth", "keys", "revoke", root, "--json")
    local = meshd("auth", "keys", "revoke", root, "--json", env=mesh.node_environ())
    assert (remote.returncode, remote.stderr) == (local.returncode, local.stderr)
    assert remote.stderr.startswith(f"409 conflict: key {root} is the cluster's auth root")
    # the laptop's login token (signed by the root before all this) still works
    assert laptop.ok("auth", "whoami", "--json")["id"] == "ops"
    laptop.drove_its_commands()


def test_operator_commands_are_refused_through_the_environment(mesh, laptop):
    secret = format_secret(new_secret())
    args = {"join": (mesh.b.addr,), "keys install": (secret,), "keys use": (secret,),
            "keys remove": (secret,), "tunnel expose": ("other", "--to", "127.0.0.1:1"),
            "tunnel close": ("echo",)}
    keys_before = control(mesh.a.data_dir, "keys.list")
    issuers_before = control(mesh.a.data_dir, "auth.keys.list")
    for command, op in OPERATOR_ONLY.items():
        out = laptop.run(*command.split(), *args.get(command, ()), "--json")
        assert (out.returncode, out.stderr, out.stdout) == (1, operator_line(op), ""), command
    # nothing happened: a is up, its keys (secrets and issuers) and tunnels as they were
    assert control(mesh.a.data_dir, "keys.list") == keys_before
    assert control(mesh.a.data_dir, "auth.keys.list") == issuers_before
    assert [t["name"] for t in control(mesh.a.data_dir, "tunnel.list")] == ["echo"]
    assert mesh.a.members()["a"]["status"] == "alive"
    # and on the node itself the operator runs them (one that changes nothing)
    assert laptop.on_node("invite", "--json")["command"].endswith(f"--join {mesh.a.addr}")


def watcher(mesh: Mesh, laptop: Laptop, *args: str) -> tuple[subprocess.Popen[str], Lines]:
    command = command_of(args)
    assert has_json(command) and "--json" in args
    laptop.driven.add(command)
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=mesh.environ())
    return proc, Lines(proc.stdout)


def test_watches_through_the_environment(mesh, laptop):
    a = mesh.a

    def sessions() -> int:
        return control(a.data_dir, "status")["stats"]["proxy_control_sessions"]

    opened = sessions()
    procs = [watcher(mesh, laptop, "watch", "--json"),
             watcher(mesh, laptop, "store", "watch", "--prefix", "envw-", "--json"),
             watcher(mesh, laptop, "config", "watch", "envw", "--json")]
    try:
        # the three watches hold control sessions on a; each asks for its stream at once
        wait_for(lambda: sessions() >= opened + 3, 20, "the watches' sessions on a")
        registry, store, config = (lines for _, lines in procs)
        mesh.cluster.service(mesh.b, "watched")
        ev = json.loads(registry.wait(lambda x: '"watched"' in x, 20, "watched registered"))
        assert (ev["kind"], ev["instance"]["service"], ev["instance"]["node"]) == \
            ("create", "watched", "b")

        def wrote(n: list[int]) -> bool:
            n[0] += 1
            control(a.data_dir, "store.write", key=f"envw-{n[0]}", value=b"x")
            return '"envw-' in store.text()

        wait_for(lambda c=[0]: wrote(c), 20, "a store change seen through prod")
        ev = json.loads(store.wait(lambda x: '"envw-' in x, 1, "the store event"))
        assert (ev["key"].startswith("envw-"), ev["deleted"], ev["record"]["value"]) == \
            (True, False, "x")

        def set_config(n: list[int]) -> bool:
            n[0] += 1
            control(a.data_dir, "config.set", path="envw.n", value=n[0])
            return config.text() != ""

        wait_for(lambda c=[0]: set_config(c), 20, "a config change seen through prod")
        ev = json.loads(config.lines[0])
        assert (ev["path"], ev["deleted"], list(ev["value"])) == ("envw", False, ["n"]), ev
        assert ev["value"]["n"] >= 1
        for proc, _ in procs:
            assert proc.poll() is None, stop(proc)
    finally:
        errors = [stop(proc) for proc, _ in procs]
    assert errors == ["", "", ""]
    laptop.drove_its_commands()


def test_broker_through_the_environment(mesh, laptop):
    a = mesh.a
    made = laptop.ok("topics", "create", "envb.durable", "--durable", "--max-msgs", "10",
                     "--json")
    assert made["topic"] == "envb.durable" and made["max_msgs"] == 10
    proc, lines = watcher(mesh, laptop, "subscribe", "envb.*", "--json")
    try:
        wait_for(lambda: any(r["pattern"] == "envb.*" for r in
                             control(a.data_dir, "broker.topics")["interest"]), 20,
                 "the laptop's subscription on a")
        sent = laptop.ok("publish", "envb.x", '{"v": 1}', "--json")
        got = json.loads(lines.wait(lambda x: '"envb.x"' in x, 20, "the message via prod"))
        assert (got["id"], got["body"], got["publisher"]) == (sent["id"], {"v": 1}, "ops")
        assert proc.poll() is None, stop(proc)
    finally:
        error = stop(proc)
    assert error == ""
    listed = laptop.ok("topics", "--json")
    assert "envb.durable" in {t["topic"] for t in listed["durable"]}
    assert laptop.ok("topics", "delete", "envb.durable", "--json")["deleted"] == "envb.durable"
    laptop.drove_its_commands()


def test_debug_through_the_environment(mesh, laptop):
    """Logs, stats and traces of every node through prod's proxy, as on the node."""
    remote, local = laptop.ok("stats", "--json"), laptop.on_node("stats", "--json")
    assert [n["node"] for n in remote["nodes"]] == [n["node"] for n in local["nodes"]] == \
        ["a", "b"] and remote["errors"] == {}
    proc, lines = watcher(mesh, laptop, "logs", "testsvc", "-f", "-n", "1", "--json")
    try:
        marker = f"env-{time.monotonic_ns()}"
        laptop.ok("call", "testsvc", "Test.Log", json.dumps({"text": marker}), "--json")
        got = json.loads(lines.wait(lambda x: marker in x, 20, "the line via prod"))
        assert (got["node"], got["service"]) == ("a", "testsvc")
    finally:
        error = stop(proc)
    assert error == ""
    found = laptop.lines("logs", "testsvc", "-n", "50", "--json")
    assert marker in {r["message"] for r in found}
    traced = laptop.run("call", "testsvc", "Test.Echo", '{"text": "t"}', "--trace", "--json")
    assert traced.returncode == 0, traced.stderr
    trace_id = traced.stderr.split()[-1]
    spans = laptop.ok("trace", trace_id, "--json")["spans"]
    assert {s["kind"] for s in spans} == {"client", "handler"}
    assert trace_id in {t["trace_id"] for t in laptop.ok("traces", "--json")["traces"]}
    laptop.drove_its_commands()


async def test_members_events_through_the_environment(mesh):
    """No CLI command streams member events: the op itself, through prod's proxy with the
    token `meshd auth login --env prod` kept."""
    env = Environments(mesh.env_file).get("prod")
    client = RemoteControlClient(Via(env.via, env.ca_file), token=env.token)
    async with client_stream(client, "members.watch") as events:
        await trio.to_thread.run_sync(lambda: mesh.cluster.add("c", join=[mesh.a.addr]))
        ev = await events.next(lambda e: e["name"] == "c", 20, "c joining, seen via prod")
        assert ev["address"] == mesh.cluster.daemons["c"].addr


def test_tunnel_through_the_environment(mesh, laptop, tmp_path):
    port = free_port()
    laptop.driven.add("tunnel connect")
    cmd = [sys.executable, "-m", "meshd_cli", "tunnel", "connect", "echo", "--listen",
           f"127.0.0.1:{port}", "--env", "prod"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mesh.environ())
    try:
        first = proc.stdout.readline()
        assert first == f"tunnel echo: listening on 127.0.0.1:{port} via {mesh.via}\n", \
            first + (proc.stderr.read() if proc.poll() is not None else "")
        payload = os.urandom(256 * 1024)
        assert through(port, payload) == payload
        assert through(port, b"again") == b"again"
    finally:
        assert stop(proc) == ""

    # logged out of prod (in a copy of the file), the proxy refuses the tunnel
    logged_out = tmp_path / "environments.json"
    shutil.copy(mesh.env_file, logged_out)
    out = meshd("auth", "logout", "--env", "prod", env=mesh.environ(logged_out))
    assert (out.returncode, out.stdout) == (0, "logged out of prod\n")
    assert Environments(logged_out).get("prod").token == ""
    port = free_port()
    cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mesh.environ(logged_out))
    try:
        assert "listening" in proc.stdout.readline()
        stderr = Lines(proc.stderr)
        refused(port)
        line = stderr.wait(lambda x: x.startswith("connection refused"), 10, "the refusal")
        assert line == ("connection refused: 401 unauthorized: the proxy needs a token "
                        "(--token or MESHD_TOKEN)")
    finally:
        stop(proc)
    laptop.drove_its_commands()


def test_refusals_through_the_environment(mesh, laptop, tmp_path):
    env = mesh.environ()
    # no token: 401, one line
    bare = meshd("env", "add", "bare", "--via", mesh.via, "--ca-file", str(mesh.pki.ca),
                 env=env)
    assert bare.returncode == 0, bare.stderr
    out = laptop.run("members", "--env", "bare", "--json")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == ("401 unauthorized: a remote environment acts with a token: log in "
                          "with `meshd auth login --env NAME` or set MESHD_TOKEN\n")

    # an account no rule grants mesh:members (default rules know node, service and admin)
    laptop.ok("auth", "accounts", "create", "dev", "--secret", "dev-secret-1", "--scope",
              "dev", "--json")
    devs = tmp_path / "environments.json"
    shutil.copy(mesh.env_file, devs)
    login = laptop.ok("auth", "login", "--env", "prod", "--id", "dev", "--secret",
                      "dev-secret-1", "--json", env_file=devs)
    assert (login["account"], login["scopes"]) == ("dev", ["dev"])
    assert Environments(devs).get("prod").token == login["token"]
    assert Environments(mesh.env_file).get("prod").token != login["token"]  # per file, env
    assert Environments(devs).get("bare").token == ""  # tokens stay with their environment
    out = laptop.run("members", "--json", env_file=devs)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == "403 forbidden: dev may not access mesh:members:: no rule grants it\n"
    assert laptop.ok("auth", "whoami", "--json", env_file=devs)["id"] == "dev"

    # an unknown environment: one line naming the known ones
    out = laptop.run("members", "--env", "nope", "--json")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == ("400 bad request: no environment named 'nope'; known: local, bare, "
                          "prod (add one with `meshd env add NAME --via wss://HOST:PORT`)\n")

    # an unreachable one: one line with the address, well within the connect timeout
    dead = free_port()
    added = meshd("env", "add", "dead", "--via", f"wss://127.0.0.1:{dead}", env=env)
    assert added.returncode == 0, added.stderr
    start = time.monotonic()
    out = laptop.run("members", "--env", "dead", "--json")
    assert time.monotonic() - start < CONNECT_TIMEOUT
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith(f"503 unavailable: cannot reach the proxy at 127.0.0.1:{dead}")
    assert len(out.stderr.splitlines()) == 1, out.stderr

    # the environment commands themselves (local by nature) see all of that
    listed = ok_json(meshd("env", "--json", env=env), "env")
    assert [(e["name"], e["current"], e["token"]) for e in listed] == [
        ("local", False, False), ("bare", False, False), ("dead", False, False),
        ("prod", True, True)]
    assert ok_json(meshd("env", "get", "--json", env=env), "env get")["name"] == "prod"
    for name in ("bare", "dead"):
        removed = meshd("env", "remove", name, env=env)
        assert (removed.returncode, removed.stdout) == (0, f"removed environment {name}\n")
    assert Environments(mesh.env_file).names() == ["local", "prod"]
    laptop.drove_its_commands()


async def test_sdk_client_env_calls_through_the_environment(mesh, monkeypatch):
    from meshd_sdk import Client

    monkeypatch.setenv("MESHD_ENV_FILE", str(mesh.env_file))
    monkeypatch.delenv("MESHD_TOKEN", raising=False)
    monkeypatch.delenv("MESHD_ADDR", raising=False)
    async with Client(env="prod") as client:
        assert await client.call("testsvc", "Test.Caller", {"text": ""}) == {"text": "ops"}
        assert await client.call("testsvc", "Test.Echo", {"text": "sdk"}) == {"text": "sdk"}


def test_runtime_through_the_environment(mesh, laptop):
    """A managed service run, listed, updated and killed through prod, as on the node."""
    command = f"{sys.executable} -c 'import time; time.sleep(300)'"
    r = laptop.ok("run", "module:json", "--name", "envrt", "--command", command, "--json")
    assert (r["name"], r["version"], r["source"]) == ("envrt", 1, "module:json")

    def state(version: int) -> bool:
        rows = laptop.ok("ps", "envrt", "--json")["replicas"]
        return len(rows) == 1 and rows[0]["state"] == "running" and \
            rows[0]["version"] == version and rows[0]["pid"] > 0
    wait_for(lambda: state(1), 30, "envrt running")
    def listed(rows: dict) -> dict:
        return {**rows, "replicas": [{k: v for k, v in r.items() if k != "uptime"}
                                     for r in rows["replicas"]]}  # uptime: as of each ask
    assert listed(laptop.ok("ps", "--json")) == listed(laptop.on_node("ps", "--json"))
    assert laptop.ok("update", "envrt", "--json")["version"] == 2
    wait_for(lambda: state(2), 30, "envrt's version 2 running")
    assert laptop.ok("kill", "envrt", "--json")["killed"] == "envrt"
    wait_for(lambda: laptop.ok("ps", "--json")["replicas"] == [], 30, "envrt gone")
    laptop.drove_its_commands()


def test_bot_map_through_the_environment(mesh, laptop):
    """Slack users mapped, listed and unmapped through prod, as on the node."""
    r = laptop.ok("bot", "map", "U0LAPTOP", "ops", "--json")
    assert r == {"user": "U0LAPTOP", "account": "ops", "namespace": "default"}
    listed = laptop.ok("bot", "users", "--json")
    assert listed == laptop.on_node("bot", "users", "--json")
    assert {"user": "U0LAPTOP", "account": "ops", "namespace": "default"} in listed
    assert laptop.ok("bot", "unmap", "U0LAPTOP", "--json") == {"unmapped": "U0LAPTOP"}
    assert all(u["user"] != "U0LAPTOP" for u in laptop.on_node("bot", "users", "--json"))
    laptop.drove_its_commands()


def test_store_engines_through_the_environment(mesh, laptop, tmp_path):
    """A database created on Redis and an embedded one migrated there, through prod: the DSN
    file is read on the laptop and the node serves both from Redis."""
    if why_no_redis() is not None:
        pytest.fail(why_no_redis())
    with redis(tmp_path / "redis") as server:
        dsn = tmp_path / "dsn"
        dsn.write_text(server.url + "\n")
        made = laptop.ok("store", "databases", "create", "env-orders", "--backend", "redis",
                         "--dsn-file", str(dsn), "--json")
        assert made["backend"] == "redis" and server.url not in json.dumps(made)
        laptop.ok("store", "write", "o1", "on-redis", "--database", "env-orders", "--json")
        assert laptop.on_node("store", "read", "o1", "--database", "env-orders",
                              "--json")["value"] == "on-redis"

        laptop.ok("store", "write", "m1", "moved", "--database", "env-moving", "--json")
        events = laptop.lines("store", "migrate", "env-moving", "--to", "redis",
                              "--dsn-file", str(dsn), "--grace", "0", "--json")
        assert events[-1]["phase"] == "done", events
        rows = {r["name"]: r["backend"] for r in laptop.on_node("store", "databases", "--json")}
        assert rows["env-orders"] == rows["env-moving"] == "redis"
        assert laptop.ok("store", "read", "m1", "--database", "env-moving",
                         "--json")["value"] == "moved"
        # the value now lives in Redis: the engine's own client finds the key there
        found = redis_py.Redis.from_url(server.url).keys("meshd:v:*m1")
        assert len(found) == 1, found
        # a service account (it may write the store) may not bind databases: admin only
        laptop.ok("auth", "accounts", "create", "env-svc", "--secret", "svc-secret-1",
                  "--scope", "service", "--json")
        svc = tmp_path / "environments.json"
        shutil.copy(mesh.env_file, svc)
        laptop.ok("auth", "login", "--env", "prod", "--id", "env-svc", "--secret",
                  "svc-secret-1", "--json", env_file=svc)
        out = laptop.run("store", "databases", "create", "env-x", "--backend", "redis",
                         "--dsn-file", str(dsn), "--json", env_file=svc)
        assert (out.returncode, out.stdout) == (1, ""), out.stderr
        assert out.stderr.startswith("403 forbidden") and "Traceback" not in out.stderr
        assert "env-x" not in {r["name"] for r in laptop.on_node("store", "databases",
                                                                 "--json")}
    laptop.drove_its_commands()

"""Auth per namespace with real daemons: accounts and rules of team-a and team-b, tokens that
carry their namespace, and who may reach and administer what.

One cluster for the file: node a (the auth root, a wss:// proxy endpoint) runs greeter in
team-a, node b (no issuer key: its service tokens come from a) runs greeter in team-b and
`caller` in team-a. greeter and caller are tests/integration/services/nssvc.py, which answer
with their namespace (Ns.Which) and with the identity that called them (Ns.Caller).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.errors import MeshError
from meshd.proxy.remote import RemoteControlClient
from meshd.proxy.via import Via

from .cluster import SERVICES, Cluster, Daemon, Lines, control, wait_for
from .test_cli import meshd
from .test_cli import ok as cli_ok
from .test_tls import Pki, admin_token, make_pki, tls_node

NSSVC = SERVICES / "nssvc.py"
SECRET = "a-secret-of-some-length"
INVALID = ("400 bad request: invalid namespace 'Team_A': a namespace is 1 to 63 lowercase "
           "letters, digits or '-' (allowed: [a-z0-9-]{1,63})\n")


@dataclass
class Mesh:
    cluster: Cluster
    a: Daemon
    b: Daemon
    pki: Pki
    port: int
    home: Path

    def env(self, daemon: Daemon | None = None, **extra: str) -> dict[str, str]:
        """A user of node `daemon` (a by default): no MESHD_* of the caller's, a HOME of its
        own (token file, environments), this tree's code."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
        env.update({"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"),
                    "MESHD_ENV_FILE": str(self.home / "environments.json"),
                    "MESHD_TOKEN_FILE": str(self.home / "token.json"),
                    "MESHD_DATA_DIR": str((daemon or self.a).data_dir),
                    "PYTHONPATH": os.pathsep.join(sys.path)})
        env.update(extra)
        return env


def ok(*args: str, env: dict[str, str]) -> Any:
    """What a command that must succeed prints (parsed, with --json)."""
    out = cli_ok(*args, env=env)
    return json.loads(out) if "--json" in args else out


def refused(*args: str, env: dict[str, str]) -> str:
    """The one error line of a command that must fail."""
    out = meshd(*args, env=env)
    assert out.returncode == 1, f"meshd {' '.join(args)} did not fail: {out.stdout}"
    assert out.stderr.count("\n") == 1, out.stderr
    return out.stderr.rstrip("\n")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("authns")
    (root / "home").mkdir()
    pki = make_pki(root / "pki")
    cluster = Cluster(root)
    try:
        a, port = tls_node(cluster, pki)
        m = Mesh(cluster, a, cluster.add("b", join=[a.addr]), pki, port, root / "home")
        b = m.b
        wait_for(lambda: (b.data_dir / "auth-root").exists(), 15, "b has the auth root")
        cluster.service(a, "greeter", script=NSSVC, env={"MESHD_NAMESPACE": "team-a"})
        cluster.service(b, "greeter", script=NSSVC, env={"MESHD_NAMESPACE": "team-b"})
        cluster.service(b, "caller", script=NSSVC, args=("team-a",))

        def listed(d: Daemon, ns: str) -> list[str]:
            rows = ok("services", "--namespace", ns, "--json", env=m.env(d))
            return sorted(r["name"] for r in rows)

        wait_for(lambda: all(listed(d, "team-a") == ["caller", "greeter"]
                             and listed(d, "team-b") == ["greeter"] for d in (a, b)),
                 20, "the greeters and caller in both registries")
        added = ok("env", "add", "prod", "--via", f"wss://127.0.0.1:{port}", "--ca-file",
                   str(pki.ca), "--json", env=m.env())
        assert added["name"] == "prod"
        yield m
    finally:
        cluster.close()


def account(m: Mesh, name: str, ns: str, *scopes: str) -> str:
    """Make account `name` in `ns` with the default admin's token; log in as it (on b, whose
    node asks a signer); its token."""
    args = [a for s in scopes for a in ("--scope", s)]
    made = ok("auth", "accounts", "create", name, "--secret", SECRET, *args, "--namespace", ns,
              "--token", admin_token(m.a), "--json", env=m.env())
    assert made == {"id": name, "type": "user", "scopes": list(scopes), "namespace": ns}
    login = ok("auth", "login", "--id", name, "--secret", SECRET, "--namespace", ns, "--json",
               env=m.env(m.b, MESHD_TOKEN_FILE=str(m.home / f"{name}@{ns}.json")))
    assert (login["account"], login["namespace"]) == (name, ns)
    return login["token"]


def test_admins_administer_their_namespace_and_default_admins_every_one(mesh):
    m = mesh
    root = admin_token(m.a)
    # a default admin creates accounts in both namespaces (account() checks each)
    ann = account(m, "ann", "team-a", "admin")
    account(m, "bea", "team-b", "admin")
    who = ok("auth", "whoami", "--token", ann, "--json", env=m.env())
    assert who == {"id": "ann", "scopes": ["admin"], "via": "token", "namespace": "team-a"}

    # a team-a admin: accounts in team-a yes, in team-b (or default) no, with the reason;
    # the same from b, whose writes go to the signer (a), which checks it again
    for d in (m.a, m.b):
        name = f"dev-{d.name}"
        made = ok("auth", "accounts", "create", name, "--secret", SECRET, "--scope", "dev",
                  "--namespace", "team-a", "--token", ann, "--json", env=m.env(d))
        assert made["namespace"] == "team-a"
        line = refused("auth", "accounts", "create", name, "--secret", SECRET,
                       "--namespace", "team-b", "--token", ann, env=m.env(d))
        assert line == ("403 forbidden: ann is an admin of namespace 'team-a', not of "
                        "'team-b': only admins of 'team-b' or of 'default' administer it")
    line = refused("auth", "accounts", "create", "x", "--secret", SECRET, "--token", ann,
                   env=m.env())
    assert line == ("403 forbidden: ann is an admin of namespace 'team-a', not of 'default': "
                    "only admins of 'default' administer it")
    # nor read team-b's accounts, nor touch the cluster's keys
    line = refused("auth", "accounts", "list", "--namespace", "team-b", "--token", ann,
                   env=m.env())
    assert line.startswith("403 forbidden: ann is an admin of namespace 'team-a'")
    assert refused("auth", "keys", "rotate", "--token", ann, env=m.env()).startswith(
        "403 forbidden: ann is an admin of namespace 'team-a', not of 'default'")

    # each namespace lists its own accounts; the same id in two namespaces is two accounts
    rows = ok("auth", "accounts", "list", "--namespace", "team-a", "--token", ann, "--json",
              env=m.env())
    assert sorted(r["id"] for r in rows) == ["ann", "dev-a", "dev-b"]
    assert {r["namespace"] for r in rows} == {"team-a"}
    ok("auth", "accounts", "create", "ann", "--secret", "another-secret-9", "--namespace",
       "team-b", "--token", root, "--json", env=m.env())
    out = meshd("auth", "login", "--id", "ann", "--secret", SECRET, "--namespace", "team-b",
                "--json", env=m.env(MESHD_TOKEN_FILE=str(m.home / "failed.json")))
    assert (out.returncode, out.stderr) == (1, "401 unauthorized: wrong account id or secret\n")
    rows = ok("auth", "accounts", "list", "--json", env=m.env())  # default: the local operator
    assert [r["id"] for r in rows] == ["admin"]

    # meshd namespaces counts the accounts of each (team-c: accounts only, no services)
    account(m, "cid", "team-c", "dev")

    def counts() -> dict[str, Any]:
        rows = ok("namespaces", "--json", env=m.env(m.b))
        return {r["name"]: (r["services"], r["accounts"]) for r in rows}

    wait_for(lambda: counts() == {"default": (0, 1), "team-a": (2, 3), "team-b": (1, 2),
                                  "team-c": (0, 1)}, 10, "the accounts replicated to b")

    # invalid namespace: a 400 line, whatever the command
    for args in (("auth", "accounts", "list"), ("auth", "rules", "list"),
                 ("auth", "whoami"), ("auth", "login", "--id", "ann", "--secret", SECRET),
                 ("auth", "accounts", "create", "x", "--secret", SECRET, "--token", root),
                 ("auth", "rules", "create", "r", "--resource", "service:x", "--access",
                  "granted", "--token", root)):
        assert refused(*args, "--namespace", "Team_A", env=m.env()) + "\n" == INVALID, args
    line = refused("auth", "rules", "create", "r", "--resource", "service:x", "--scope",
                   "Team_B:dev", "--access", "granted", "--namespace", "team-a",
                   "--token", root, env=m.env())
    assert line.startswith("400 bad request: invalid namespace 'Team_B'")


def test_tokens_reach_their_own_namespace_unless_a_rule_lets_them_in(mesh):
    m = mesh
    root = admin_token(m.a)
    bob = account(m, "bob", "team-b", "dev")
    # team-b lets its devs do everything in team-b (its first rule: the defaults come with it)
    ok("auth", "rules", "create", "devs", "--resource", "*:*:*", "--scope", "dev",
       "--access", "granted", "--namespace", "team-b", "--token", root, "--json", env=m.env())
    rules = ok("auth", "rules", "list", "--namespace", "team-b", "--json", env=m.env())
    assert sorted(r["id"] for r in rules) == ["default-admin", "default-nodes",
                                              "default-services", "devs"]

    def call(ns: str, token: str, d: Daemon = m.a) -> subprocess.CompletedProcess[str]:
        return meshd("call", "greeter", "Ns.Which", "{}", "--namespace", ns, "--json",
                     "--token", token, env=m.env(d))

    # bob calls team-b's greeter, from either node; team-a's is a 403 naming why
    wait_for(lambda: call("team-b", bob, m.b).returncode == 0, 10, "team-b's rule on b")
    assert json.loads(call("team-b", bob).stdout)["namespace"] == "team-b"
    for d in (m.a, m.b):
        out = call("team-a", bob, d)
        assert out.returncode == 1
        assert out.stderr == (
            "403 forbidden: bob may not access service:greeter:Ns.Which in namespace "
            "'team-a': no rule grants it (bob is of namespace 'team-b': only rules of "
            "'team-a' with scope 'team-b:SCOPE' let it in)\n")
    stream = meshd("stream", "greeter", "Ns.Stream", "{}", "--namespace", "team-a",
                   "--token", bob, env=m.env(m.b))
    assert stream.returncode == 1 and stream.stderr.startswith(
        "403 forbidden: bob may not access service:greeter:Ns.Stream in namespace 'team-a'")

    # through the proxy (a remote environment): bob lists team-b's services, not team-a's
    prod = m.env(MESHD_ENV="prod", MESHD_DATA_DIR=str(m.home / "laptop"))
    rows = ok("services", "--namespace", "team-b", "--token", bob, "--json", env=prod)
    assert [r["name"] for r in rows] == ["greeter"]
    line = refused("services", "--namespace", "team-a", "--token", bob, env=prod)
    assert line.startswith("403 forbidden: bob may not access mesh:services: in namespace "
                           "'team-a': no rule grants it")
    line = refused("describe", "greeter", "--namespace", "team-a", "--token", bob, env=prod)
    assert line.startswith("403 forbidden: bob may not access mesh:services:")

    # a rule of team-a naming team-b:dev lets team-b's devs call team-a's greeter (only it)
    ok("auth", "rules", "create", "b-devs", "--resource", "service:greeter", "--scope",
       "team-b:dev", "--access", "granted", "--namespace", "team-a", "--token", root,
       "--json", env=m.env())
    wait_for(lambda: call("team-a", bob, m.b).returncode == 0, 10, "the team-a rule")
    assert json.loads(call("team-a", bob, m.b).stdout) == {"namespace": "team-a",
                                                          "env": "team-a", "node": "a"}
    assert refused("services", "--namespace", "team-a", "--token", bob, env=prod).startswith(
        "403 forbidden: bob may not access mesh:services: in namespace 'team-a'")
    # "*" in team-a means team-a's accounts, never team-b's
    ok("auth", "rules", "create", "a-any", "--resource", "mesh:*", "--scope", "*",
       "--access", "granted", "--namespace", "team-a", "--token", root, "--json", env=m.env())
    assert refused("services", "--namespace", "team-a", "--token", bob, env=prod).startswith(
        "403 forbidden: bob may not access mesh:services: in namespace 'team-a'")

    # watching every namespace through the proxy (admitted by default's rules) shows the
    # events of the namespaces the token may read only: dora (default) may read team-b's
    # services, by a rule there, and not team-a's
    dora = account(m, "dora", "default", "watcher")
    for ns, scope in (("default", "watcher"), ("team-b", "default:watcher")):
        ok("auth", "rules", "create", "watchers", "--resource", "mesh:services", "--scope",
           scope, "--access", "granted", "--namespace", ns, "--token", root, "--json",
           env=m.env())
    wait_for(lambda: meshd("services", "--namespace", "team-b", "--token", dora,
                           env=prod).returncode == 0, 10, "the watchers rules on a")

    def sessions() -> int:
        return control(m.a.data_dir, "status")["stats"]["proxy_control_sessions"]

    opened = sessions()
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "watch", "--json", "--token", dora],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=prod)
    try:
        lines = Lines(proc.stdout)
        wait_for(lambda: sessions() > opened, 20, "the watch's session on a")
        m.cluster.service(m.a, "wa", script=NSSVC, args=("team-a",))
        wait_for(lambda: any(r["name"] == "wa" for r in control(
            m.a.data_dir, "services", namespace="team-a")), 10, "wa registered on a")
        m.cluster.service(m.a, "wb", script=NSSVC, args=("team-b",))
        ev = json.loads(lines.wait(lambda x: '"wb"' in x, 20, "wb's event"))
        assert (ev["kind"], ev["instance"]["namespace"]) == ("create", "team-b")
        assert '"wa"' not in lines.text()
    finally:
        proc.kill()
        proc.wait(5)


def test_a_team_a_service_calls_another_with_its_own_token(mesh):
    m = mesh
    # caller (team-a, on b: its token came from signer a) calls greeter (team-a, on a), whose
    # daemon sees the caller's service account, admitted by team-a's rules
    def forward() -> dict[str, Any]:
        return ok("call", "caller", "Ns.ForwardCaller", '{"service": "greeter"}',
                  "--namespace", "team-a", "--json", env=m.env(m.b))

    assert forward() == {"caller": "service:caller"}
    # the namespace's rules decide for its services: a deny rule of team-a stops it
    ok("auth", "rules", "create", "no-services", "--resource", "service:greeter:Ns.Caller",
       "--scope", "service", "--access", "denied", "--priority", "10", "--namespace",
       "team-a", "--token", admin_token(m.a), "--json", env=m.env())
    wait_for(lambda: meshd("call", "caller", "Ns.ForwardCaller", '{"service": "greeter"}',
                           "--namespace", "team-a", env=m.env(m.b)).returncode == 1,
             10, "the deny rule on a")
    out = meshd("call", "caller", "Ns.ForwardCaller", '{"service": "greeter"}',
                "--namespace", "team-a", env=m.env(m.b))
    assert "service:caller may not access service:greeter:Ns.Caller in namespace 'team-a': " \
           "rule 'no-services' denies it" in out.stderr
    ok("auth", "rules", "delete", "no-services", "--namespace", "team-a", "--token",
       admin_token(m.a), "--json", env=m.env())
    wait_for(lambda: meshd("call", "caller", "Ns.ForwardCaller", '{"service": "greeter"}',
                           "--namespace", "team-a", env=m.env(m.b)).returncode == 0,
             10, "the deny rule gone on a")
    assert forward() == {"caller": "service:caller"}


async def test_a_namespace_admin_reads_its_namespace_not_the_cluster(mesh):
    """Reads of the cluster's own state (status, members, routes...) are checked by
    default's rules whatever namespace the request names: team-a's rules let its admin do
    everything in team-a, which must not open them (found by review)."""
    m = mesh
    tina = await trio.to_thread.run_sync(account, m, "tina", "team-a", "admin")
    client = RemoteControlClient(Via(f"wss://127.0.0.1:{m.port}", str(m.pki.ca)), token=tina)
    try:
        # her namespace's services: hers, as before
        rows = await client.call("services", namespace="team-a")
        assert "greeter" in {r["name"] for r in rows}
        cluster_reads = {  # op: (its resource mesh:WHAT, its args)
            "status": ("status", {}), "members": ("members", {}), "routes": ("routes", {}),
            "graph": ("routes", {}), "ping": ("routes", {"node": "b", "count": 1}),
            "tunnel.list": ("tunnels", {}), "namespaces": ("namespaces", {}),
            "members.watch": ("members", {})}
        for op, (what, args) in cluster_reads.items():
            for named in ({"namespace": "team-a"}, {}):
                with pytest.raises(MeshError) as info:
                    await client.call(op, **args, **named)
                assert info.value.status == 403 and info.value.detail.startswith(
                    f"tina may not access mesh:{what}: in namespace 'default': no rule grants "
                    "it"), (op, named, info.value)
    finally:
        await client.aclose()

"""Namespaces with real daemons: `greeter` in team-a (on a) and in team-b (on b) are two
services that answer differently; calls, streams, describe and services reach the one the
namespace names (--namespace, MESHD_NAMESPACE, the SDK's namespace=), a service's own
outgoing calls stay in its namespace, an invalid name is a 400 line, an unknown namespace
reads empty, and `meshd namespaces` counts each one."""

from __future__ import annotations

import json
import re

import trio

from meshd_sdk import Client

from .cluster import SERVICES, wait_for
from .test_cli import cli_env, meshd, ok

NSSVC = SERVICES / "nssvc.py"


def _setup(cluster, tmp_path):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    cluster.service(a, "greeter", script=NSSVC, env={"MESHD_NAMESPACE": "team-a"})
    cluster.service(b, "greeter", script=NSSVC, env={"MESHD_NAMESPACE": "team-b"})
    # named in code (Service(namespace=)), with no MESHD_NAMESPACE in its environment
    cluster.service(a, "caller", script=NSSVC, args=("team-b",))
    env_a = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    env_b = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))

    def listed(env, ns, want):
        rows = json.loads(ok("services", "--namespace", ns, "--json", env=env))
        return sorted(r["name"] for r in rows) == want

    for env in (env_a, env_b):
        wait_for(lambda env=env: listed(env, "team-a", ["greeter"])
                 and listed(env, "team-b", ["caller", "greeter"]), 15,
                 "both greeters and caller in the registry of both nodes")
    return a, b, env_a, env_b


def _call(env, *args):
    return json.loads(ok("call", "greeter", "Ns.Which", "{}", "--json", *args, env=env))


def test_same_name_in_two_namespaces(cluster, tmp_path):
    a, _, env_a, env_b = _setup(cluster, tmp_path)

    # --namespace picks the service, from either node
    for env in (env_a, env_b):
        assert _call(env, "--namespace", "team-a") == {"namespace": "team-a",
                                                       "env": "team-a", "node": "a"}
        assert _call(env, "--namespace", "team-b") == {"namespace": "team-b",
                                                       "env": "team-b", "node": "b"}
    # MESHD_NAMESPACE does when no flag is given; the flag wins over it
    assert _call({**env_a, "MESHD_NAMESPACE": "team-b"})["node"] == "b"
    assert _call({**env_b, "MESHD_NAMESPACE": "team-a"})["node"] == "a"
    assert _call({**env_a, "MESHD_NAMESPACE": "team-b"}, "--namespace", "team-a")["node"] == "a"
    # the default namespace has no greeter: the usual 404 line
    out = meshd("call", "greeter", "Ns.Which", "{}", env=env_a)
    assert out.returncode == 1
    assert out.stderr == "404 not found: service 'greeter' has no instances\n"

    # streams too
    lines = ok("stream", "greeter", "Ns.Stream", "{}", "--json", "--namespace", "team-b",
               env=env_a).splitlines()
    assert [json.loads(x)["node"] for x in lines] == ["b", "b"]
    lines = ok("stream", "greeter", "Ns.Stream", "{}", "--json", env={**env_b,
               "MESHD_NAMESPACE": "team-a"}).splitlines()
    assert [json.loads(x)["node"] for x in lines] == ["a", "a"]

    # describe and health see the namespace's instances only
    info = json.loads(ok("describe", "greeter", "--namespace", "team-b", "--json", env=env_a))
    assert info["namespace"] == "team-b"
    assert [(i["node"], i["namespace"]) for i in info["instances"]] == [("b", "team-b")]
    assert "(namespace team-b)" in ok("describe", "greeter", "--namespace", "team-b",
                                      env=env_a).splitlines()[0]
    rows = json.loads(ok("health", "greeter", "--namespace", "team-a", "--json", env=env_b))
    assert [(r["node"], r["status"]) for r in rows] == [("a", "ok")]

    # a service's outgoing calls stay in its namespace (caller: team-b, on node a, where
    # team-a's greeter runs) unless it names another
    fwd = json.loads(ok("call", "caller", "Ns.Forward", '{"service": "greeter"}', "--json",
                        "--namespace", "team-b", env=env_a))
    assert (fwd["namespace"], fwd["node"]) == ("team-b", "b")
    # ... and its token (service:caller of team-b) gets into team-a only when a rule of
    # team-a names team-b's services
    out = meshd("call", "caller", "Ns.Forward", '{"service": "greeter", "namespace": "team-a"}',
                "--namespace", "team-b", env=env_b)
    assert out.returncode == 1 and out.stderr.startswith(
        "403 forbidden: service:caller may not access service:greeter:Ns.Which in namespace "
        "'team-a': no rule grants it"), out.stderr
    ok("auth", "rules", "create", "b-services", "--resource", "service:greeter",
       "--scope", "team-b:service", "--access", "granted", "--namespace", "team-a", env=env_a)
    fwd = json.loads(ok("call", "caller", "Ns.Forward",
                        '{"service": "greeter", "namespace": "team-a"}', "--json",
                        "--namespace", "team-b", env=env_b))
    assert (fwd["namespace"], fwd["node"]) == ("team-a", "a")

    # the SDK: Client(namespace=), a call naming another, MESHD_NAMESPACE by default
    async def sdk_calls() -> list[str]:
        async with Client(a.data_dir / "meshd.sock", namespace="team-b") as client:
            first = await client.call("greeter", "Ns.Which", {})
            second = await client.call("greeter", "Ns.Which", {}, namespace="team-a")
            listed = await client.services()
        return [first["node"], second["node"], ",".join(s["name"] for s in listed)]

    assert trio.run(sdk_calls) == ["b", "a", "caller,greeter"]


def test_lists_bad_names_and_counts(cluster, tmp_path):
    _, b, env_a, env_b = _setup(cluster, tmp_path)

    rows = json.loads(ok("services", "--namespace", "team-a", "--json", env=env_b))
    assert [(r["name"], r["instances"], r["nodes"], r["namespace"]) for r in rows] == [
        ("greeter", 1, ["a"], "team-a")]
    rows = json.loads(ok("services", "--json", env={**env_b, "MESHD_NAMESPACE": "team-b"}))
    assert sorted((r["name"], r["nodes"][0]) for r in rows) == [("caller", "a"),
                                                                ("greeter", "b")]
    # nothing was registered in the default namespace; an unknown one reads empty
    assert json.loads(ok("services", "--json", env=env_a)) == []
    assert json.loads(ok("services", "--namespace", "nobody", "--json", env=env_a)) == []
    out = meshd("describe", "greeter", "--namespace", "nobody", env=env_a)
    assert out.returncode == 1
    assert out.stderr == ("404 not found: service 'greeter' has no instances in namespace "
                          "'nobody'\n")

    # an invalid name: one 400 line, whatever the command
    for args in (("services",), ("describe", "greeter"), ("call", "greeter", "Ns.Which", "{}"),
                 ("health", "greeter"), ("stream", "greeter", "Ns.Stream", "{}")):
        out = meshd(*args, "--namespace", "Team_A", env=env_a)
        assert out.returncode == 1, args
        assert out.stderr == ("400 bad request: invalid namespace 'Team_A': a namespace is 1 "
                              "to 63 lowercase letters, digits or '-' (allowed: "
                              "[a-z0-9-]{1,63})\n"), (args, out.stderr)
    out = meshd("services", env={**env_a, "MESHD_NAMESPACE": "x" * 64})
    assert out.returncode == 1 and out.stderr.startswith("400 bad request: invalid namespace")

    # meshd namespaces: each namespace with its counts; default has the admin account
    # bootstrap made
    rows = json.loads(ok("namespaces", "--json", env=env_b))
    assert rows == [
        {"name": "default", "services": 0, "instances": 0, "store_keys": 0,
         "accounts": 1},
        {"name": "team-a", "services": 1, "instances": 1, "store_keys": 0,
         "accounts": 0},
        {"name": "team-b", "services": 2, "instances": 2, "store_keys": 0,
         "accounts": 0}]
    cells = [[c.strip() for c in re.split("[│┃]", line.strip("│┃ "))]
             for line in ok("namespaces", env=env_a).splitlines()]
    assert ["namespace", "services", "instances", "store keys", "accounts"] in cells
    assert ["team-b", "2", "2", "0", "0"] in cells

    # a service registering with MESHD_NAMESPACE set: the namespace's counts follow
    cluster.service(b, "greeter", script=NSSVC, env={"MESHD_NAMESPACE": "team-a"})
    wait_for(lambda: json.loads(ok("namespaces", "--json", env=env_a))[1]["instances"] == 2,
             15, "a second greeter in team-a")
    rows = json.loads(ok("services", "--namespace", "team-a", "--json", env=env_a))
    assert [(r["name"], r["instances"], r["nodes"]) for r in rows] == [
        ("greeter", 2, ["a", "b"])]

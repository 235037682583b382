"""The SDK finds the local daemon without being told where: MESHD_ADDR, else the control
socket in MESHD_DATA_DIR, else in the platform's user data dir (platformdirs: on Linux
$XDG_DATA_HOME/meshd). Services and clients run as separate processes with MESHD_ADDR
unset and HOME/XDG_DATA_HOME pointing into a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from meshd.errors import MeshError

from .cluster import SERVICES, Daemon, control, wait_for

CLIENT = """
import json, sys, trio
from meshd_sdk import Client

async def main():
    async with Client() as client:
        print(json.dumps({
            "echo": await client.call("testsvc", "Test.Echo", {"text": sys.argv[1]},
                                      timeout=5),
            "caller": (await client.call("testsvc", "Test.Caller", {"text": ""},
                                         timeout=5))["text"]}))

trio.run(main)
"""


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose default data dir is <home>/share/meshd; no MESHD_* at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    env.update({"HOME": str(home), "XDG_DATA_HOME": str(home / "share"),
                "XDG_CONFIG_HOME": str(home / "config"),
                "PYTHONPATH": os.pathsep.join(sys.path)})
    env.update(extra)
    return env


def client(arg: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLIENT, arg], capture_output=True, text=True,
                          timeout=30, env=env)


def instances(d: Daemon, service: str) -> list[dict]:
    try:
        return control(d.data_dir, "describe", service=service)["instances"]
    except MeshError:
        return []


def test_service_and_client_find_the_daemon_through_the_default_data_dir(cluster, tmp_path):
    home = tmp_path / "home"
    env = home_env(home)
    default_dir = home / "share" / "meshd"
    default_dir.parent.mkdir(parents=True)
    # the node keeps its data in this user's default data dir ("meshd" is platformdirs' name)
    a = Daemon(home / "share", "meshd", cluster.secret, extra=("--name", "a"))
    cluster.daemons["a"] = a
    a.start()
    assert a.data_dir == default_dir and (default_dir / "meshd.sock").exists()
    b = cluster.add("b", join=[a.addr])
    wait_for(lambda: {"a", "b"} <= set(a.members()), 10, "b joined")

    # a service with no address and no data dir registers through the default one
    log = tmp_path / "svc.log"
    with open(log, "ab") as err:
        svc = subprocess.Popen([sys.executable, str(SERVICES / "testsvc.py"), "testsvc"],
                               env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: [i["node"] for i in instances(b, "testsvc")] == ["a"], 15,
                 f"testsvc registered on a (log: {log})")
        # a client process likewise: it calls through a (the callee sees node a calling)
        out = client("hi", env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"echo": {"text": "hi"}, "caller": "node:a"}
        # so does the CLI without --data-dir
        cli = subprocess.run([sys.executable, "-m", "meshd_cli", "status", "--json"],
                             capture_output=True, text=True, timeout=30, env=env)
        assert cli.returncode == 0 and json.loads(cli.stdout)["name"] == "a", cli.stderr

        # MESHD_DATA_DIR beats the default, MESHD_ADDR beats both
        with_dir = client("x", {**env, "MESHD_DATA_DIR": str(b.data_dir)})
        via_addr = client("y", {**env, "MESHD_DATA_DIR": str(tmp_path / "nothing"),
                                "MESHD_ADDR": str(b.data_dir / "meshd.sock")})
        for out, text in ((with_dir, "x"), (via_addr, "y")):
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"echo": {"text": text}, "caller": "node:b"}
        cli = subprocess.run([sys.executable, "-m", "meshd_cli", "status", "--json"],
                             capture_output=True, text=True, timeout=30,
                             env={**env, "MESHD_ADDR": str(b.data_dir / "meshd.sock")})
        assert cli.returncode == 0 and json.loads(cli.stdout)["name"] == "b", cli.stderr

        # where nothing runs, the SDK says where it looked and what to do
        empty = client("z", home_env(tmp_path / "empty-home"))
        assert empty.returncode == 1
        expected = tmp_path / "empty-home" / "share" / "meshd" / "meshd.sock"
        assert f"no meshd is running at {expected}" in empty.stderr
        assert "meshd up" in empty.stderr
    finally:
        if svc.poll() is None:
            svc.kill()
        svc.wait(5)

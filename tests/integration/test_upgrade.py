"""Rolling upgrades: nodes of the previous release and of this code in one cluster.

The previous release is the git tag PREVIOUS of this repository, built as a wheel in a git
worktree and installed (without its dependencies, which this Python has) into a virtualenv
of its own. Its daemons and CLI run from that venv, in a folder outside the checkout and with
no PYTHONPATH, so they import only the old code. Old and new nodes join through each other,
call services registered on the other release, read what the other wrote to the store, and
carry a tunnel exposed on the other release, in both directions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshd_sdk.testing import Cluster, Node, child_env

from .cluster import ServiceProcess, control, wait_for
from .test_tunnel import EchoServer, free_port, through

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "v0.1.0"
# The commit the tag names: a checkout made without tags (as CI's) still has the history.
PREVIOUS_COMMIT = "dbc8378a4cf7ffc512b82c484bf8593bbd99db8f"
BOUND = 180  # seconds for building and installing the previous release


@dataclass
class Previous:
    python: str  # the venv's python, importing the previous release
    greeter: Path  # its examples/greeter/main.py
    home: Path  # where its processes run (outside the checkout)

    def env(self, **extra: str) -> dict[str, str]:
        return child_env({"PYTHONPATH": "", **extra})

    def cli(self, node: Node, *args: str) -> subprocess.CompletedProcess[str]:
        """The previous release's `meshd` CLI against `node`."""
        return subprocess.run([self.python, "-m", "cli", *args, "--data-dir",
                               str(node.data_dir)], capture_output=True, text=True,
                              timeout=60, cwd=self.home, env=self.env())


def _previous_ref() -> tuple[str | None, str]:
    """(the git ref to build the previous release from, or None; why not)."""
    if shutil.which("git") is None:
        return None, "git is not installed"
    if not (ROOT / ".git").exists():
        return None, "not a git checkout"
    for ref in (PREVIOUS, PREVIOUS_COMMIT):
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                f"{ref}^{{commit}}"], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == PREVIOUS_COMMIT:
            return ref, ""
    return None, (f"neither the tag {PREVIOUS} nor its commit {PREVIOUS_COMMIT[:12]} is in "
                  "this checkout (git fetch --tags, or a clone with its history)")


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Iterator[Previous]:
    ref, why = _previous_ref()
    if ref is None:
        pytest.fail(f"the previous release cannot be built: {why}")
    base = tmp_path_factory.mktemp("previous")
    tree, dist, venv = base / "tree", base / "dist", base / "venv"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force",
                    str(tree), ref], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-build-isolation", "-w", str(dist), str(tree)], check=True,
                       capture_output=True, timeout=BOUND, cwd=base)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True, capture_output=True, timeout=BOUND)
        wheel = next(dist.glob("meshd-*.whl"))
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--no-deps", "--disable-pip-version-check", str(wheel)], check=True,
                       capture_output=True, timeout=BOUND, cwd=base)
        greeter = base / "greeter.py"
        shutil.copy(tree / "examples" / "greeter" / "main.py", greeter)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, timeout=60)
    old = Previous(str(venv / "bin" / "python"), greeter, base)
    probe = subprocess.run([old.python, "-c", "import meshd, cli; print(meshd.__file__)"],
                           capture_output=True, text=True, cwd=base, env=old.env())
    assert probe.returncode == 0 and str(venv) in probe.stdout, (probe.stdout, probe.stderr)
    yield old


def test_previous_and_current_nodes_join_call_store_and_tunnel_both_ways(previous, tmp_path):
    c = Cluster(tmp_path)
    old_cmd = [previous.python, "-m", "cli"]
    try:
        def add(name: str, old: bool, join: str | None) -> Node:
            node = Node(c.root, name, c.secret, command=old_cmd if old else None,
                        cwd=previous.home if old else None,
                        env={"PYTHONPATH": ""} if old else None)
            c.daemons[name] = node
            return node.start(join=[join] if join else None)

        o1 = add("o1", True, None)
        n1 = add("n1", False, o1.addr)  # new joins through old
        o2 = add("o2", True, n1.addr)  # old joins through new
        n2 = add("n2", False, o2.addr)
        c.wait_converged(30)
        rows = {r["name"]: r for r in control(n1.data_dir, "members")}
        assert rows["n2"]["version"] and rows["o1"]["version"] == "", rows  # old: no tag

        # RPC: an old service called from a new node, a new one from an old node
        greeter = subprocess.Popen([previous.python, str(previous.greeter)],
                                   cwd=previous.home, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL,
                                   env=previous.env(MESHD_ADDR=str(o1.socket)))
        c.processes.append(greeter)
        ServiceProcess(n1, "newsvc")  # tests/integration/services/testsvc.py, new code
        wait_for(lambda: {"greeter", "newsvc"} <= {s["name"] for s in
                                                   control(n2.data_dir, "services")},
                 30, "both services seen on n2")
        wait_for(lambda: previous.cli(o2, "services").returncode == 0 and "newsvc" in
                 previous.cli(o2, "services", "--json").stdout, 30, "newsvc seen on o2")
        assert control(n2.data_dir, "rpc.call", service="greeter", endpoint="Greeter.Hello",
                       body={"name": "Ada"}) == {"msg": "Hello Ada"}
        old_call = previous.cli(o2, "call", "newsvc", "Test.Echo", '{"text": "from old"}',
                                "--json")
        assert old_call.returncode == 0, old_call.stderr
        assert json.loads(old_call.stdout) == {"text": "from old"}

        # store: written on one release, read on the other
        control(n1.data_dir, "store.write", database="default", table="store",
                key="from-new", value="n")
        wrote = previous.cli(o1, "store", "write", "from-old", "o")
        assert wrote.returncode == 0, wrote.stderr
        wait_for(lambda: previous.cli(o2, "store", "read", "from-new").returncode == 0, 30,
                 "new write read on o2")
        read = json.loads(previous.cli(o2, "store", "read", "from-new", "--json").stdout)
        assert (read["key"], read["value"]) == ("from-new", "n"), read
        wait_for(lambda: control(n2.data_dir, "store.read", database="default",
                                 table="store", key="from-old") != [], 30,
                 "old write read on n2")
        [row] = control(n2.data_dir, "store.read", database="default", table="store",
                        key="from-old")
        assert row["value"] in ("o", b"o"), row

        # tunnels: exposed on old, used from new; exposed on new, used from old
        echo = EchoServer()
        control(o1.data_dir, "tunnel.expose", name="oldecho", to=f"127.0.0.1:{echo.port}")
        control(n1.data_dir, "tunnel.expose", name="newecho", to=f"127.0.0.1:{echo.port}")
        for user, name, cmd, env, cwd in (
                (n2, "oldecho", [sys.executable, "-m", "meshd_cli"], child_env(), None),
                (o2, "newecho", old_cmd, previous.env(), previous.home)):
            wait_for(lambda u=user, n=name: any(t["name"] == n for t in
                                                control(u.data_dir, "tunnel.list")),
                     30, f"{name} listed on {user.name}")
            port = free_port()
            proc = subprocess.Popen([*cmd, "tunnel", "connect", name, "--listen",
                                     f"127.0.0.1:{port}", "--data-dir", str(user.data_dir)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=cwd)
            c.processes.append(proc)  # type: ignore[arg-type]
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening" in line, line
            payload = f"through {name} from {user.name}".encode() * 1000
            try:
                assert through(port, payload) == payload
            except (AssertionError, OSError) as exc:  # say what the tunnel client saw
                proc.terminate()
                raise AssertionError(f"tunnel {name} from {user.name}: {exc!r}; the client "
                                     f"said: {proc.communicate(timeout=10)}") from exc
    finally:
        c.close()

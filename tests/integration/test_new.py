"""`meshd new`: each kind of project runs as made. Its own tests pass (they start a real
daemon through meshd_sdk.testing), `meshd run` of the folder runs it managed, and bad input
writes nothing.

Also `meshd up --print-systemd-unit` (checked by systemd-analyze where it is installed) and
`meshd completion`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshd import scaffold
from meshd_sdk.testing import child_env, cluster

BOUND = 180  # seconds a generated project's test run may take


def meshd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=child_env(env))


@pytest.mark.parametrize("kind", scaffold.KINDS)
def test_a_new_project_passes_its_own_tests(tmp_path, kind):
    name = f"demo-{kind}"
    out = meshd("new", name, "--type", kind, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    root = tmp_path / name
    assert made["dir"] == name and made["type"] == kind
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        == made["files"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True, timeout=BOUND,
                         env=child_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = [line for line in run.stdout.splitlines() if " passed" in line]
    expected = {"service": 2, "subscriber": 1, "web": 2}[kind]
    assert passed and passed[-1].startswith(f"{expected} passed"), run.stdout[-1000:]


def test_meshd_run_of_a_new_service_runs_it_managed(tmp_path):
    out = meshd("new", "greeter-x", "--dir", str(tmp_path / "gx"))
    assert out.returncode == 0, out.stderr
    assert "python -m greeter_x" in out.stdout and "pytest" in out.stdout
    with cluster(1, root=tmp_path / "mesh") as m:
        env = {"MESHD_DATA_DIR": str(m.node(0).data_dir)}
        ran = meshd("run", str(tmp_path / "gx"), "--json", env=env)
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["name"] == "gx"
        m.wait_service("greeter-x", timeout=120)  # a venv is made for it first
        called = meshd("call", "greeter-x", "GreeterX.Hello", '{"name": "Ada"}', "--json",
                       env=env)
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout) == {"greeting": "Hello, Ada!"}
        ps = json.loads(meshd("ps", "gx", "--json", env=env).stdout)
        assert ps, "meshd ps lists it"


def test_new_refuses_a_used_folder_and_bad_names_writing_nothing(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    out = meshd("new", "orders", "--dir", str(used))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("409 conflict:") and out.stderr.count("\n") == 1
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    for bad in ("Orders", "a/b", "x--y"):
        out = meshd("new", bad, cwd=tmp_path)
        assert out.returncode == 1 and out.stderr.startswith("400 bad request:"), out.stderr
        assert "Traceback" not in out.stderr
    out = meshd("new", "orders", "--type", "daemon", cwd=tmp_path)
    assert out.returncode == 2 and "daemon" in out.stderr  # click's usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_print_systemd_unit_keeps_the_options_and_verifies(tmp_path):
    out = meshd("up", "--print-systemd-unit", "--name", "web-1", "--join", "127.0.0.1:7946",
                "--join", "127.0.0.1:7947", "--tags", "role=web", "--unit-user", "mesh",
                "--profile", "lan")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = next(line for line in lines if line.startswith("ExecStart="))
    assert " up --data-dir /var/lib/meshd " in start
    for part in ("--name web-1", "--join 127.0.0.1:7946 --join 127.0.0.1:7947",
                 "--tags role=web", "--profile lan"):
        assert part in start, start
    assert "--unit-user" not in start and "--print-systemd-unit" not in start
    assert "User=mesh" in lines and "NoNewPrivileges=yes" in lines
    bad = meshd("up", "--print-systemd-unit", "--unit-user", "a b")
    assert bad.returncode == 1 and bad.stderr.startswith("400 bad request:")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not verified")
    unit = tmp_path / "meshd.service"
    unit.write_text(out.stdout)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_complete_meshd(shell):
    out = meshd("completion", shell)
    assert out.returncode == 0, out.stderr
    assert "_MESHD_COMPLETE" in out.stdout
    # the script's protocol answers: what `meshd n<TAB>` offers
    env = {"_MESHD_COMPLETE": f"{shell}_complete", "COMP_WORDS": "meshd ne",
           "COMP_CWORD": "ne" if shell == "fish" else "1"}
    done = subprocess.run([sys.executable, "-m", "meshd_cli"], capture_output=True, text=True,
                          timeout=60, env=child_env(env))
    assert "new" in done.stdout and "members" not in done.stdout, (done.stdout, done.stderr)

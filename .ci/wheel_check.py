"""CI: the wheel alone is meshd. Builds it (`python -m build`), installs only it (and its
dependencies, from PyPI) into a fresh virtualenv with no access to this checkout, then in
that venv: no generic top-level names (`sdk`, `cli`, `sim`) are installed; `meshd up` starts
a node on loopback; the greeter example registers and answers `meshd call`; `python -m
meshd_sim run dissemination` runs; `meshd new` for each type makes a project whose own tests
pass. Prints one line per step; exits non-zero at the first that fails.

usage: python3 .ci/wheel_check.py [--keep]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("service", "subscriber", "web")


def step(what: str, cmd: list[str], cwd: Path, timeout: float = 600, **kw: object
         ) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         **kw)  # type: ignore[call-overload]
    took = time.monotonic() - start
    if out.returncode != 0:
        print(f"FAIL  {what} ({took:.1f} s): {' '.join(cmd)}\n{out.stdout[-3000:]}"
              f"\n{out.stderr[-3000:]}")
        raise SystemExit(1)
    print(f"ok    {what} ({took:.1f} s)")
    return out


def main() -> int:
    keep = "--keep" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="meshd-wheel-"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    node = None
    try:
        step("build the wheel", [sys.executable, "-m", "build", "--wheel", "--outdir",
                                 str(work / "dist"), str(ROOT)], work, 900)
        wheel = next((work / "dist").glob("meshd-*.whl"))
        venv = work / "venv"
        step("a fresh venv", [sys.executable, "-m", "venv", str(venv)], work)
        py, bindir = str(venv / "bin" / "python"), venv / "bin"
        step(f"install only {wheel.name}", [py, "-m", "pip", "install", "--quiet",
                                            "--disable-pip-version-check", str(wheel)],
             work, 900, env=env)
        step("no generic top-level names installed", [py, "-c", (
            "import importlib.util as u\n"
            "bad = [n for n in ('sdk', 'cli', 'sim') if u.find_spec(n)]\n"
            "assert not bad, f'installed generic names: {bad}'\n"
            "import meshd_sdk, meshd_cli, meshd_sim\n"
            "from importlib import resources\n"
            "assert any(p.name.endswith('.toml') for p in "
            "resources.files('meshd_sim').joinpath('scenarios').iterdir())\n")], work,
             env=env)

        data = work / "node"
        node = subprocess.Popen([str(bindir / "meshd"), "up", "--bind", "127.0.0.1:0",
                                 "--profile", "local", "--data-dir", str(data), "--json"],
                                cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=open(work / "node.log", "wb"))  # noqa: SIM115
        assert node.stdout is not None
        ready = node.stdout.readline()
        if not ready:
            print(f"FAIL  meshd up: {(work / 'node.log').read_text()[-3000:]}")
            return 1
        print(f"ok    meshd up from the wheel: {json.loads(ready)['address']}")
        node_env = {**env, "MESHD_DATA_DIR": str(data)}
        greeter = subprocess.Popen([py, str(ROOT / "examples" / "greeter" / "main.py")],
                                   cwd=work, env=node_env, stdout=subprocess.DEVNULL,
                                   stderr=open(work / "greeter.log", "wb"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 30
            while True:
                out = subprocess.run([str(bindir / "meshd"), "call", "greeter",
                                      "Greeter.Hello", '{"name": "Ada"}', "--json"],
                                     cwd=work, env=node_env, capture_output=True, text=True,
                                     timeout=30)
                if out.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    print(f"FAIL  the greeter example: {out.stderr}"
                          f"{(work / 'greeter.log').read_text()[-2000:]}")
                    return 1
                time.sleep(0.3)
            assert json.loads(out.stdout) == {"msg": "Hello Ada"}, out.stdout
            print("ok    the greeter example answers meshd call")
        finally:
            greeter.kill()
            greeter.wait(10)

        step("python -m meshd_sim run dissemination",
             [py, "-m", "meshd_sim", "run", "dissemination", "--nodes", "30", "--json"],
             work, env=env)
        step("pytest for the generated projects",
             [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "pytest>=8", "pytest-trio>=0.8"], work, 600, env=env)
        for kind in KINDS:
            step(f"meshd new --type {kind}", [str(bindir / "meshd"), "new", f"demo-{kind}",
                                               "--type", kind], work, env=env)
            step(f"the new {kind}'s own tests", [py, "-m", "pytest", "-q", "-p",
                                                 "no:cacheprovider"],
                 work / f"demo-{kind}", 600, env=env)
        print("the wheel alone is meshd: every step passed")
        return 0
    finally:
        if node is not None:
            node.kill()
            node.wait(10)
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

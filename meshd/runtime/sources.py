"""A spec's source made ready to run on this node: checked out per version into the data dir,
with its own virtualenv when it has dependencies.

Theory of operation: `prepare(spec)` returns a `Prepared` (the directory to run in and the
command line) for the spec's source:
- a folder is copied to `runtime/checkouts/NAME/v<version>-<digest>/` (a copy: editing the
  folder does not change what runs until `meshd update`), without `.git`, `.venv`,
  `__pycache__` and `node_modules`;
- a git repository is cloned there and checked out at its ref (branch, tag or commit; the
  commit it resolved to is kept, so every replica of a version runs the same code);
- a module runs as `python -m NAME` in the runtime's own directory.
A checkout with `pyproject.toml` or `requirements.txt` gets `runtime/venvs/<digest>/`, a
virtualenv that sees this Python's packages (meshd's SDK among them) and holds the
service's own: built once per content of those files and reused by every version that has
the same ones. The command is the spec's, else `python main.py` (the venv's python when
there is one).

Rules:
- Every external step (git, venv, pip) runs with a deadline (`timeout`), its output kept;
  a failure raises SourceError with the step and the tail of its output (`meshd ps` shows
  it); nothing half-made is used: a checkout or venv is built in a temporary directory and
  renamed into place only when complete.
- A checkout that already exists for the version is reused (a restart does not clone again).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from .spec import Spec

IGNORED = (".git", ".venv", "venv", "__pycache__", "node_modules", ".mypy_cache",
           ".pytest_cache", ".ruff_cache")
TAIL = 2000  # characters of a failed step's output kept in its error


class SourceError(Exception):
    """A source could not be made ready; str() says which step and why."""


@dataclass(frozen=True)
class Prepared:
    cwd: Path
    argv: tuple[str, ...]
    revision: str  # what runs: the git commit, the folder's digest, or the module's name


async def _run(argv: list[str], step: str, timeout: float, cwd: Path | None = None) -> str:
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(argv, cwd=cwd, capture_stdout=True,
                                          capture_stderr=True, check=False,
                                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except trio.TooSlowError:
        raise SourceError(f"{step}: no result within {timeout:g} s") from None
    except OSError as exc:
        raise SourceError(f"{step}: {exc.strerror or exc}") from None
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0:
        raise SourceError(f"{step} failed (exit {done.returncode}): {out[-TAIL:].strip()}")
    return out


def _digest_tree(root: Path) -> str:
    """A digest of a folder's files (names, sizes, times): changes when its code does."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


class Sources:
    """Checkouts and virtualenvs under `root` (the data dir's runtime/)."""

    def __init__(self, root: Path, timeout: float = 300.0) -> None:
        self.root = root
        self.timeout = timeout

    async def prepare(self, spec: Spec) -> Prepared:
        src = spec.source
        if src.kind == "module":
            self.root.mkdir(parents=True, exist_ok=True)
            argv = spec.command or (sys.executable, "-m", src.location)
            return Prepared(self.root, tuple(argv), src.location)
        if src.kind == "folder":
            folder = Path(src.location)
            if not folder.is_dir():
                raise SourceError(f"no folder {src.location} on this node")
            digest = await trio.to_thread.run_sync(_digest_tree, folder)
            target = self._checkout(spec, digest)
            if not target.exists():
                await self._build(target, lambda tmp: shutil.copytree(
                    folder, tmp, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True))
            revision = digest
        else:
            target = self._checkout(spec, hashlib.sha256(str(src).encode()).hexdigest()[:12])
            if not target.exists():
                async def clone(tmp: Path) -> None:
                    await _run(["git", "clone", "--quiet", "--no-checkout", src.location,
                                str(tmp)], "git clone", self.timeout)
                    await _run(["git", "-C", str(tmp), "-c", "advice.detachedHead=false",
                                "checkout", "--quiet", src.ref or "HEAD", "--"],
                               f"git checkout {src.ref or 'HEAD'}", self.timeout)
                await self._build_async(target, clone)
            revision = (await _run(["git", "-C", str(target), "rev-parse", "HEAD"],
                                   "git rev-parse", 30.0)).strip()
        python = await self._venv(target)
        argv = spec.command or (python, "main.py")
        if not spec.command and not (target / "main.py").is_file():
            raise SourceError(f"{src} has no main.py: give --command")
        return Prepared(target, tuple(argv), revision)

    def _checkout(self, spec: Spec, key: str) -> Path:
        return self.root / "checkouts" / spec.namespace / spec.name / f"v{spec.version}-{key}"

    async def _build(self, target: Path, make: object) -> None:
        async def run(tmp: Path) -> None:
            await trio.to_thread.run_sync(make, tmp)  # type: ignore[arg-type]
        await self._build_async(target, run)

    async def _build_async(self, target: Path, make: object) -> None:
        """`make(tmp)` builds in a temporary directory renamed to `target` when complete."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            await make(tmp)  # type: ignore[operator]
            os.replace(tmp, target)
        except OSError as exc:
            raise SourceError(f"checkout into {target}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _venv(self, checkout: Path) -> str:
        """The python to run with: a venv's for a checkout with dependencies, else ours."""
        files = [checkout / n for n in ("pyproject.toml", "requirements.txt")
                 if (checkout / n).is_file()]
        if not files:
            return sys.executable
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        venv = self.root / "venvs" / h.hexdigest()[:16]
        python = venv / "bin" / "python"
        if python.exists():
            return str(python)

        async def build(tmp: Path) -> None:
            await _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)],
                       "python -m venv", self.timeout)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet",
                   "--disable-pip-version-check"]
            if (checkout / "requirements.txt").is_file():
                await _run([*pip, "-r", str(checkout / "requirements.txt")],
                           "pip install -r requirements.txt", self.timeout)
            if (checkout / "pyproject.toml").is_file():
                await _run([*pip, str(checkout)], "pip install .", self.timeout)
        await self._build_async(venv, build)
        return str(python)

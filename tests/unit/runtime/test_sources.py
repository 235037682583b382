"""Sources made ready to run: a folder copied per version, a git repository checked out at a
tag or branch, a module, a virtualenv built once per requirements and reused, and bad
sources failing with the step that failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshd.runtime.sources import SourceError, Sources
from meshd.runtime.spec import parse_spec


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "HOME": str(repo)})


def spec(source: str, **kw):
    return parse_spec({"name": "svc", "source": source, **kw})


async def test_a_folder_is_copied_per_version_and_runs_main(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("print('v1')\n")
    (app / ".git").mkdir()
    sources = Sources(tmp_path / "runtime")
    ready = await sources.prepare(spec(str(app)))
    assert ready.argv == (sys.executable, "main.py")
    assert (ready.cwd / "main.py").read_text() == "print('v1')\n"
    assert not (ready.cwd / ".git").exists() and ready.cwd != app
    # the copy is what runs: editing the folder changes nothing until a new version
    (app / "main.py").write_text("print('v2')\n")
    again = await sources.prepare(spec(str(app)))
    assert again.cwd != ready.cwd  # its content changed: another checkout
    assert (ready.cwd / "main.py").read_text() == "print('v1')\n"
    # a command of its own, and no main.py needed then
    (app / "main.py").unlink()
    with pytest.raises(SourceError, match=r"main\.py"):
        await sources.prepare(spec(str(app), version=2))
    custom = await sources.prepare(spec(str(app), version=2, command=["python3", "-V"]))
    assert custom.argv == ("python3", "-V")
    with pytest.raises(SourceError, match="no folder"):
        await sources.prepare(spec(str(tmp_path / "missing")))


async def test_a_git_repository_at_a_tag_and_a_branch(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    (repo / "main.py").write_text("V = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "one")
    git(repo, "tag", "v1")
    (repo / "main.py").write_text("V = 2\n")
    git(repo, "commit", "--quiet", "-am", "two")
    sources = Sources(tmp_path / "runtime")
    at_tag = await sources.prepare(spec(f"{repo}@v1"))
    assert (at_tag.cwd / "main.py").read_text() == "V = 1\n" and len(at_tag.revision) == 40
    head = await sources.prepare(spec(f"{repo}@main", version=2))
    assert (head.cwd / "main.py").read_text() == "V = 2\n"
    assert head.revision != at_tag.revision
    again = await sources.prepare(spec(f"{repo}@v1"))
    assert again.cwd == at_tag.cwd  # reused, not cloned again
    with pytest.raises(SourceError, match="git checkout nope"):
        await sources.prepare(spec(f"{repo}@nope", version=3))
    with pytest.raises(SourceError, match="git clone"):
        await sources.prepare(spec(f"{tmp_path / 'nothing'}@v1", version=4))
    assert not list((tmp_path / "runtime" / "checkouts" / "default" / "svc").glob(".*tmp"))


async def test_a_module_and_a_venv_built_once(tmp_path):
    sources = Sources(tmp_path / "runtime")
    mod = await sources.prepare(spec("module:http.server"))
    assert mod.argv == (sys.executable, "-m", "http.server")
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("import meshd_sdk\n")
    (app / "requirements.txt").write_text("# nothing beyond what this python has\n")
    first = await sources.prepare(spec(str(app)))
    python = Path(first.argv[0])
    assert python != Path(sys.executable) and python.name == "python"
    # the venv sees this python's packages (the SDK)
    subprocess.run([str(python), "-c", "import meshd_sdk, trio"], check=True)
    (app / "main.py").write_text("import meshd_sdk  # v2\n")
    second = await sources.prepare(spec(str(app), version=2))
    assert second.argv[0] == first.argv[0]  # same requirements: the same venv
    (app / "requirements.txt").write_text("no-such-package-xyz==0.0.0\n")
    with pytest.raises(SourceError, match="pip install"):
        await sources.prepare(spec(str(app), version=3))

"""`meshd new NAME [--type service|subscriber|web] [--dir PATH]`: a new project that runs as
made (meshd/scaffold.py has the files).

Rules:
- Writes into PATH (default ./NAME), which must not exist or be an empty folder of the
  user's that no one else may write in: nothing is ever overwritten, nothing written
  through a link another user planted. A bad NAME or type is one line (400) and nothing is written.
- Prints what it wrote and the three commands that matter (--json: the paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from meshd import scaffold
from meshd.errors import MeshError
from meshd_cli.output import fail, json_option


@click.command("new")
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(scaffold.KINDS), default="service",
              show_default=True, help="A service (typed handler), a subscriber (broker "
              "events) or a web app (HTTP through the API gateway).")
@click.option("--dir", "where", metavar="PATH", help="Where to write it (default: ./NAME).")
@json_option
def new(name: str, kind: str, where: str | None, as_json: bool) -> None:
    """Write a new project NAME that runs as made: `python -m MODULE`, `meshd run .`,
    `pytest`."""
    try:
        files = scaffold.project(name, kind)
    except MeshError as exc:
        fail(f"{exc.status} bad request: {exc.detail}")
    root = Path(where) if where else Path(name)
    try:
        _prepare(root)
        for path, text in files.items():
            target = root / path
            if not target.parent.exists():
                target.parent.mkdir(parents=True)  # never through a folder planted meanwhile
            with open(target, "x", encoding="utf-8") as f:
                f.write(text)
    except OSError as exc:
        fail(f"500 internal: writing {root}: {exc.strerror or exc}")
    module = scaffold.check_name(name)
    if as_json:
        click.echo(json.dumps({"name": name, "type": kind, "dir": str(root),
                               "files": sorted(files)}))
        return
    click.echo(f"wrote {kind} {name} in {root}/ ({len(files)} files)\n\n"
               f"  cd {root}\n"
               f"  python -m {module}        # run it (registers with the local meshd)\n"
               f"  meshd run .               # or run it managed by the node\n"
               f"  pip install -e '.[test]' && pytest   # test it")


def _prepare(root: Path) -> None:
    """Make `root`, or accept an empty folder that is ours and no one else may write in."""
    try:
        root.mkdir(parents=True)
        return
    except FileExistsError:
        pass
    st = root.lstat()
    if not root.is_dir() or root.is_symlink() or any(root.iterdir()):
        fail(f"409 conflict: {root} exists and is not an empty folder; nothing was written")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        fail(f"409 conflict: {root} is not a folder of yours that only you may write in; "
             "nothing was written")


COMMANDS: tuple[click.Command, ...] = (new,)

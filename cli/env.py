"""`meshd env`: the environments commands act in (Micro's `micro env`).

Rules:
- `local` (the daemon on this machine) is built in; others are a node's proxy endpoint
  (`--via wss://HOST:PORT`, `--ca-file` for a private CA, `--namespace` for the namespace
  commands use there). Kept by meshd/envs.py in the user's config dir, 0600.
- `meshd env` lists them, `*` on the current one; `set` chooses the current one; `get`
  prints it; `remove` forgets one (and its tokens). `--env NAME` or MESHD_ENV picks one for
  a single command.
- Adding checks the address and the CA file at once (a bad one is a 400 now, not at the
  first command); it does not contact the proxy: `meshd status --env NAME` does.
- Tokens are never printed: the listing says whether one is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from meshd.envs import EnvError, Environment, Environments
from meshd.errors import MeshError
from meshd_cli.output import fail, json_option, say, show


def _load() -> Environments:
    try:
        return Environments()
    except EnvError as exc:
        fail(f"400 bad request: {exc}")


def _save(envs: Environments) -> None:
    try:
        envs.save()
    except OSError as exc:
        fail(f"500 internal: cannot write {envs.path}: {exc.strerror or exc}")


@click.group("env", invoke_without_command=True)
@json_option
@click.pass_context
def env(ctx: click.Context, as_json: bool) -> None:
    """Environments: the local daemon, or clusters reached through a node's proxy."""
    if ctx.invoked_subcommand is not None:
        return
    envs = _load()
    try:
        current = envs.current().name
    except EnvError as exc:
        fail(f"400 bad request: {exc}")
    rows = [{**envs.get(n).to_dict(), "current": n == current} for n in envs.names()]
    show(rows, as_json, ("", "NAME", "VIA", "NAMESPACE", "TOKEN"),
         (("*" if r["current"] else "", r["name"], r["via"] or "(this machine's daemon)",
           r["namespace"] or "default", "yes" if r["token"] else "-") for r in rows))


@env.command("add")
@click.argument("name")
@click.option("--via", required=True, metavar="wss://HOST:PORT",
              help="A node's proxy endpoint (`meshd up --proxy-listen ... --tls-cert ...`).")
@click.option("--namespace", default="", metavar="NS",
              help="The namespace commands use there unless told (default: default).")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Trust the proxy's certificate if this CA signed it.")
@json_option
def env_add(name: str, via: str, namespace: str, ca_file: Path | None, as_json: bool) -> None:
    """Add environment NAME, reached through the proxy at --via."""
    from meshd.proxy.via import Via

    ca = str(ca_file.expanduser().resolve()) if ca_file else ""
    try:
        checked = Via(via, ca or None)
    except MeshError as exc:
        fail(str(exc))
    envs = _load()
    try:
        added = envs.add(name, via, namespace, ca)
    except EnvError as exc:
        fail(f"400 bad request: {exc}")
    _save(envs)
    warning = checked.cleartext_warning()
    if warning:
        click.echo(warning, err=True)
    say(added.to_dict(), as_json, f"added environment {name} (via {via}); use it with "
        f"`meshd env set {name}` or --env {name}")


def _change(change: Callable[[Environments], None], done: str) -> None:
    """Apply `change` to the environments and save them; an EnvError is one line."""
    envs = _load()
    try:
        change(envs)
    except EnvError as exc:
        fail(f"400 bad request: {exc}")
    _save(envs)
    click.echo(done)


@env.command("set")
@click.argument("name")
def env_set(name: str) -> None:
    """Make NAME the current environment."""
    _change(lambda envs: envs.use(name), f"current environment: {name}")


@env.command("get")
@json_option
def env_get(as_json: bool) -> None:
    """Print the current environment."""
    envs = _load()
    try:
        current: Environment = envs.current()
    except EnvError as exc:
        fail(f"400 bad request: {exc}")
    say(current.to_dict(), as_json, current.name)


@env.command("remove")
@click.argument("name")
def env_remove(name: str) -> None:
    """Forget environment NAME and its tokens."""
    _change(lambda envs: envs.remove(name), f"removed environment {name}")


COMMANDS: tuple[click.Command, ...] = (env,)

"""`meshd config`: dynamic config, JSON values at dot paths, replicated and watched.

Rules:
- Thin functions over the `config.*` control ops; every command acts on the config tree of
  one namespace (--namespace, MESHD_NAMESPACE, the environment's, else default).
- Values are JSON: `set` refuses one that does not parse with a "400 bad request" line that
  says strings need quotes; `get` prints the value (indented for people).
- `watch` prints a line per change until interrupted (one JSON line per change with --json).
- `history` lists the recorded changes at, above and below a path (newest first): when,
  who, the value set or "deleted"; changes are kept 30 days.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from meshd_cli.client import Client, client_options, namespace_option
from meshd_cli.output import fail, json_option, line, print_table, say


@click.group()
def config() -> None:
    """Dynamic config: JSON values at dot paths, replicated, watched."""


def _ns_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = namespace_option(f)
    return client_options(json_option(f))


@config.command("get")
@click.argument("path", default="")
@_ns_option
def config_get(path: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Print the JSON value at PATH (all of the namespace without one)."""
    r = client.call("config.get", namespace=client.namespace(namespace), path=path)
    say(r["value"], as_json, json.dumps(r["value"], indent=2))


@config.command("set")
@click.argument("path")
@click.argument("value")
@_ns_option
def config_set(path: str, value: str, namespace: str | None, client: Client,
               as_json: bool) -> None:
    """Set PATH to the JSON VALUE."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: value is not valid JSON: {exc.msg} at line {exc.lineno} "
             f"column {exc.colno} (strings need quotes: '\"text\"')")
    r = client.call("config.set", namespace=client.namespace(namespace), path=path, value=parsed)
    say(r, as_json, f"set {path}")


@config.command("del")
@click.argument("path")
@_ns_option
def config_del(path: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Delete PATH (and everything below it)."""
    r = client.call("config.del", namespace=client.namespace(namespace), path=path)
    say(r, as_json, f"deleted {path}")


@config.command("watch")
@click.argument("path", default="")
@_ns_option
def config_watch(path: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Print PATH's value each time it changes (one JSON line per change with --json)."""
    def show(ev: Any) -> None:
        if as_json:
            line(json.dumps(ev))
        elif ev["deleted"]:
            line(f"{ev['path']} deleted")
        else:
            line(f"{ev['path']} = {json.dumps(ev['value'])}")

    client.stream("config.watch", show, namespace=client.namespace(namespace), path=path)


COMMANDS: tuple[click.Command, ...] = (config,)


@config.command("history")
@click.argument("path", default="")
@_ns_option
def config_history(path: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """The recent changes at, above and below PATH (all of the namespace without one)."""
    import time

    rows = client.call("config.history", namespace=client.namespace(namespace), path=path)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no changes recorded")
        return
    print_table(["WHEN", "PATH", "BY", "VALUE"], [
        [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])), r["path"],
         r.get("by") or "-", "(deleted)" if r.get("deleted") else json.dumps(r["value"])]
        for r in rows])

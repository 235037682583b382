"""The cluster and who is in it: `meshd members`, `join`, `leave`, `invite`, `keys`,
`new-secret`.

Rules:
- Thin functions over the control ops (`members`, `join`, `leave`, `invite`, `keys.*`);
  output as everywhere: a table or lines for people, `--json` for programs.
- `keys install/use/remove` reach every member: the count of nodes done is printed, each
  failure on its own line, and any failure exits with status 1.
- `new-secret` needs no node: it only prints a fresh random secret.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from meshd_cli.client import Client, client_options
from meshd_cli.output import json_option, say, show


@click.command("join")
@click.argument("peers", nargs=-1, required=True)
@client_options
@json_option
def join_cmd(peers: tuple[str, ...], client: Client, as_json: bool) -> None:
    """Make the running node join the cluster of PEERS."""
    result = client.call("join", peers=list(peers))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"joined through {result['joined']} of {len(peers)} peer(s)")
        for line in result["errors"]:
            click.echo(f"  failed: {line}")


@click.command()
@client_options
@json_option
def leave(client: Client, as_json: bool) -> None:
    """Leave the cluster gracefully and stop the node."""
    result = client.call("leave")
    say(result, as_json, "left the cluster; the node is stopping")


_STATUS_COLORS = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def _member_row(r: dict[str, Any]) -> tuple[str, ...]:
    tags = ",".join(f"{k}={v}" for k, v in r["tags"].items())
    rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f} ms"
    return (r["name"] + (" *" if r["self"] else ""), r["id"][:8], r["address"],
            f"[{_STATUS_COLORS.get(r['status'], 'white')}]{r['status']}[/]",
            str(r["incarnation"]), r.get("version") or "?", tags, rtt, r.get("reach", ""))


@click.command()
@click.option("--status", "status_filter", help="Only members with this status.")
@client_options
@json_option
def members(status_filter: str | None, client: Client, as_json: bool) -> None:
    """List the members this node knows."""
    rows = client.call("members")
    if status_filter:
        rows = [r for r in rows if r["status"] == status_filter]
    show(rows, as_json,
         ("name", "id", "address", "status", "incarnation", "version", "tags", "rtt",
          "reach"),
         (_member_row(r) for r in rows))


@click.command()
@client_options
@json_option
def invite(client: Client, as_json: bool) -> None:
    """Print the one-line command another host runs to join (secret included)."""
    inv = client.call("invite")
    if as_json:
        click.echo(json.dumps(inv))
    else:
        click.echo(inv["command"])


@click.group()
def keys() -> None:
    """Manage the cluster secrets (roll a new one in without downtime)."""


def _key_op(op: str, doc: str) -> Callable[..., None]:
    @click.argument("secret")
    @client_options
    @json_option
    def command(secret: str, client: Client, as_json: bool) -> None:
        result = client.call(f"keys.{op}", secret=secret)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(f"{op}: {result['ok']} of {result['nodes']} node(s) done")
        for line in result["errors"]:
            click.echo(f"  failed: {line}")
        if result["errors"]:
            sys.exit(1)

    command.__doc__ = doc
    return command


keys.command("install")(_key_op("install", "Add SECRET to every member's keyring."))
keys.command("use")(_key_op("use", "Make SECRET the one every member seals with."))
keys.command("remove")(_key_op("remove", "Remove SECRET from every member's keyring."))


@keys.command("list")
@client_options
@json_option
def keys_list(client: Client, as_json: bool) -> None:
    """List the secrets in the cluster and how many members hold each."""
    result = client.call("keys.list")
    show(result, as_json, ("secret", "members holding it", "primary on"),
         ((k["key"], f"{k['nodes']}/{result['total_nodes']}", str(k["primary_on"]))
          for k in result["keys"]))


@click.command("new-secret")
@json_option
def new_secret_cmd(as_json: bool) -> None:
    """Print a fresh random cluster secret (for `meshd keys install`)."""
    from meshd.secure.keyring import format_secret, new_secret

    secret = format_secret(new_secret())
    say({"secret": secret}, as_json, secret)


COMMANDS: tuple[click.Command, ...] = (join_cmd, leave, members, invite, keys, new_secret_cmd)

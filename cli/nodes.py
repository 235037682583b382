"""`meshd nodes`: revoke a node's identity and list revocations (admin).

Rules:
- `revoke NODE` takes a member name or a 26-character node id; every node then refuses
  that identity's links and gossip, and new cluster secrets (`meshd keys install/use`) are
  no longer sent to it: roll the secret afterwards to shut it out for good.
- Output as everywhere: a table or one line for people, `--json` for programs.
"""

from __future__ import annotations

import json
import time

import click

from meshd_cli.client import Client, client_options
from meshd_cli.output import json_option, show


@click.group()
def nodes() -> None:
    """Node identities: revoke a compromised host."""


@nodes.command("revoke")
@click.argument("node")
@client_options
@json_option
def revoke(node: str, client: Client, as_json: bool) -> None:
    """Revoke NODE (member name or node id): every node refuses its links and gossip."""
    r = client.call("nodes.revoke", node=node)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"revoked node {r['name'] or '?'} ({r['id']}); roll the cluster secret "
               "(`meshd new-secret`, `meshd keys install/use/remove`) to shut it out for good")


@nodes.command("revocations")
@client_options
@json_option
def revocations(client: Client, as_json: bool) -> None:
    """Revoked node identities."""
    rows = client.call("nodes.revocations")
    show(rows, as_json, ("id", "name", "revoked", "by"),
         ((r["id"], r.get("name", ""),
           time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["revoked"])), r.get("by", ""))
          for r in rows))


COMMANDS: tuple[click.Command, ...] = (nodes,)

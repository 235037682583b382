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
from pathlib import Path

import click

from cli.main import Table, call, console, data_dir_option, json_option


@click.group()
def nodes() -> None:
    """Node identities: revoke a compromised host."""


@nodes.command("revoke")
@click.argument("node")
@data_dir_option
@json_option
def revoke(node: str, data_dir: Path | None, as_json: bool) -> None:
    """Revoke NODE (member name or node id): every node refuses its links and gossip."""
    r = call(data_dir, "nodes.revoke", node=node)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"revoked node {r['name'] or '?'} ({r['id']}); roll the cluster secret "
               "(`meshd new-secret`, `meshd keys install/use/remove`) to shut it out for good")


@nodes.command("revocations")
@data_dir_option
@json_option
def revocations(data_dir: Path | None, as_json: bool) -> None:
    """Revoked node identities."""
    rows = call(data_dir, "nodes.revocations")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("id", "name", "revoked", "by"):
        table.add_column(col)
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["revoked"]))
        table.add_row(r["id"], r.get("name", ""), when, r.get("by", ""))
    console.print(table)

"""`meshd namespaces`: each namespace of the mesh with what it holds.

Rules:
- A thin function over the `namespaces` op: one row per namespace the registry holds or
  that has accounts ("default" always) with its counts of services, instances and
  accounts; "store_keys" is null until store namespaces count them (the table shows "-").
- Output as everywhere: a table for people, `--json` for programs.
"""

from __future__ import annotations

from typing import Any

import click

from meshd_cli.client import Client, client_options
from meshd_cli.output import json_option, show


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


@click.command()
@client_options
@json_option
def namespaces(client: Client, as_json: bool) -> None:
    """List the namespaces with their counts of services, instances and accounts."""
    rows = client.call("namespaces")
    show(rows, as_json, ("namespace", "services", "instances", "store keys", "accounts"),
         ((r["name"], str(r["services"]), str(r["instances"]), _count(r["store_keys"]),
           _count(r["accounts"])) for r in rows))


COMMANDS: tuple[click.Command, ...] = (namespaces,)

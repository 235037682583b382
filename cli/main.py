"""The `meshd` command: the root group, its global options and the command groups.

Rules:
- One module per command group (cli/daemon.py, members.py, services.py, namespaces.py,
  store.py, config.py, broker.py, debug.py, auth.py, network.py, tunnel.py, nodes.py;
  `meshd proxy http` was replaced by the API gateway, `meshd up --api-listen`); this module only
  registers them. Each command is a thin function over a control op, reached through
  `cli.client` and printed through `cli.output`.
- Every command talking to a node takes --data-dir (or MESHD_DATA_DIR) to find it, or
  MESHD_ADDR, --token and --env; the root --token (MESHD_TOKEN) and --env (MESHD_ENV)
  apply to all of them. `meshd env` (cli/env.py) manages the environments.
- Output: rich tables for people; --json prints the control API's own field names.
- Any error is one line on stderr, "<status> <code>: <detail>" (e.g. "404 not found:
  service 'x' has no instances"), and exit status 1; never a traceback.
"""

from __future__ import annotations

import json

import click

from meshd_cli import (
    auth,
    bot,
    broker,
    completion,
    config,
    daemon,
    debug,
    doctor,
    env,
    members,
    namespaces,
    network,
    new,
    nodes,
    runtime,
    services,
    store,
    tunnel,
)
from meshd_cli.output import json_option


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshd")
    except PackageNotFoundError:
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--token", envvar="MESHD_TOKEN", help="Act with this token (or MESHD_TOKEN; "
              "default: the one saved by `meshd auth login`, else as the local operator).")
@click.option("--env", metavar="NAME", help="Act in this environment (`meshd env`; or "
              "MESHD_ENV; default: the one `meshd env set` chose, else local).")
def main(token: str | None, env: str | None) -> None:
    """meshd: one daemon per host; services, store, config, auth and routing over gossip."""


@main.command("version")
@json_option
def version_cmd(as_json: bool) -> None:
    """Print the meshd version."""
    from meshd import versions
    from meshd.membership.messages import VERSION

    info = {"version": _version(), "membership_protocol": VERSION,
            "protocols": versions.describe()}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"meshd {info['version']} (membership protocol {VERSION})")


def _register(group: click.Group) -> None:
    """Each module's COMMANDS on the root group (the help lists them by name)."""
    for module in (daemon, members, services, namespaces, store, config, broker, debug,
                   auth, network, tunnel, nodes, env, runtime, bot, new, completion, doctor):
        for command in module.COMMANDS:
            group.add_command(command)


_register(main)

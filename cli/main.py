"""The `meshd` command. Rules: one clear line and a non-zero exit on error; `--json` for
programs. The daemon commands (`up`, `join`, `members`...) arrive with the daemon."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

import click


def _version() -> str:
    try:
        return version("meshd")
    except PackageNotFoundError:
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """meshd: one daemon per host; services, store, config, auth and routing over gossip."""


@main.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def version_cmd(as_json: bool) -> None:
    """Print the meshd version."""
    from meshd.membership.messages import VERSION

    info = {"version": _version(), "membership_protocol": VERSION}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"meshd {info['version']} (membership protocol {VERSION})")

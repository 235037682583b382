"""`meshd run`, `meshd ps`, `meshd update`, `meshd kill`: managed services (the runtime).

Rules:
- Thin functions over the `runtime.*` control ops, in one namespace (--namespace,
  MESHD_NAMESPACE, the environment's, else default).
- `run SOURCE`: a folder (a relative path is made absolute here: the spec travels to every
  node), a git repository (path or URL, `@REF`), or `module:NAME`. The name defaults to the
  folder's, repository's or module's last part. `--command` is split like a shell would.
- `ps` prints one line per replica (name, slot, node, state, pid, restarts, uptime, version,
  revision, and why when it is not running), then a line per spec whose update is rolling
  out or failed; `--json` the op's answer.
- `logs NAME` is `meshd logs` (debug): a managed service's output is kept with its name.
- `run --env NAME=value` sets the service's environment; `--env NAME` (no '=') is still the
  environment to act in, as for every other command.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

import click

from meshd_cli.args import parse_pairs
from meshd_cli.client import (
    Client,
    _make_client,
    _node_options,
    _remember_env,
    client_options,
    namespace_option,
)
from meshd_cli.output import fail, json_option, print_table, say


def _source(text: str) -> str:
    """A local path made absolute (with its @REF kept); anything else as given."""
    if text.startswith("module:") or re.match(r"^[\w+.-]+://|^[\w.-]+@[\w.-]+:", text):
        return text
    path, ref = text, ""
    at = text.rfind("@")
    if at > 0 and "/" not in text[at:] and not os.path.exists(text):
        path, ref = text[:at], text[at:]
    return os.path.abspath(os.path.expanduser(path)) + ref


def _default_name(source: str) -> str:
    if source.startswith("module:"):
        base = source[len("module:"):].rsplit(".", 1)[-1]
    else:
        at = source.rfind("@")
        base = source[:at] if at > 0 and "/" not in source[at:] else source
        base = base.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        base = base[:-4] if base.endswith(".git") else base
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    return name if name and name[0].isalpha() else f"svc-{name}".strip("-")


@click.command("run")
@click.argument("source")
@click.option("--name", help="The service's name (default: from SOURCE).")
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option("--node", "placement", default="", metavar="SELECTOR",
              help="Where: a node's name, tag=value, or * for every node (default: any).")
@click.option("--env", "env", multiple=True, metavar="K=V",
              help="An environment variable of the service (repeatable). A value without "
              "'=' names the environment to act in, as --env does for other commands.")
@click.option("--env-from-config", "from_config", multiple=True, metavar="PATH",
              help="A config path whose value becomes an environment variable (repeatable).")
@click.option("--restart", type=click.Choice(["always", "on-failure", "never"]),
              default="always", show_default=True)
@click.option("--command", "command", metavar="CMD",
              help="What to run in the checkout (default: python main.py).")
@click.option("--memory", "memory_mb", type=int, default=0, metavar="MB",
              help="Address-space limit per process (0: none).")
@click.option("--cpu", "cpu_seconds", type=int, default=0, metavar="SECONDS",
              help="CPU-time limit per process (0: none).")
@namespace_option
@_node_options(_make_client, "client")
@json_option
def run_cmd(source: str, name: str | None, replicas: int, placement: str,
            env: tuple[str, ...], from_config: tuple[str, ...], restart: str,
            command: str | None, memory_mb: int, cpu_seconds: int, namespace: str | None,
            client: Client, as_json: bool) -> None:
    """Run SOURCE as a managed service, placed across the mesh and kept running."""
    environments = [e for e in env if "=" not in e]
    if len(environments) > 1:
        fail("400 bad request: --env without '=' names one environment to act in; "
             "service variables are NAME=value")
    if environments:
        _remember_env(click.get_current_context(), None, environments[0])
    src = _source(source)
    try:
        argv = shlex.split(command) if command else []
    except ValueError as exc:
        fail(f"400 bad request: --command: {exc}")
    r = client.call("runtime.run", namespace=client.namespace(namespace),
                    name=name or _default_name(src), source=src, replicas=replicas,
                    placement=placement,
                    env=parse_pairs(tuple(e for e in env if "=" in e), "--env"),
                    env_from_config=list(from_config),
                    restart=restart, command=argv, memory_mb=memory_mb,
                    cpu_seconds=cpu_seconds)
    say(r, as_json, f"{r['name']} v{r['version']} from {r['source']}: {r['replicas']} "
                    f"replica(s) on {r['placement']} (meshd ps {r['name']})")


@click.command("ps")
@click.argument("name", required=False)
@namespace_option
@client_options
@json_option
def ps(name: str | None, namespace: str | None, client: Client, as_json: bool) -> None:
    """Managed services' replicas: where, how they are doing, since when."""
    args: dict[str, Any] = {"namespace": client.namespace(namespace)}
    if name:
        args["name"] = name
    r = client.call("runtime.ps", **args)
    if as_json:
        say(r, True, "")
        return
    if not r["replicas"]:
        click.echo("no managed services" if not name else f"{name}: no replicas")
        return
    print_table(["NAME", "SLOT", "NODE", "STATE", "PID", "RESTARTS", "UPTIME", "VERSION",
                 "REVISION", "REASON"], [
        [x["name"], x["slot"], x.get("node") or "-", x["state"], str(x.get("pid") or "-"),
         str(x.get("restarts", 0)), _uptime(x.get("uptime")),
         str(x.get("version") or "-"), (x.get("revision") or "-")[:12],
         (x.get("reason") or "")[:80]] for x in r["replicas"]])
    for spec in r["specs"]:
        rollout = spec.get("rollout") or {}
        if rollout.get("state") == "rolling":
            mine = [x for x in r["replicas"] if x["name"] == spec["name"]]
            moved = sum(1 for x in mine if x.get("target") == rollout["version"])
            click.echo(f"{spec['name']}: rolling out v{rollout['version']} over "
                       f"v{rollout['stable']} ({moved} of {len(mine)} replicas moved)")
        elif rollout.get("state") == "failed":
            click.echo(f"{spec['name']}: v{rollout['version']} failed to roll out: "
                       f"{rollout.get('reason')}")


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@click.command("update")
@click.argument("name")
@click.argument("source", required=False)
@namespace_option
@client_options
@json_option
def update(name: str, source: str | None, namespace: str | None, client: Client,
           as_json: bool) -> None:
    """Replace NAME's replicas with a new version (of SOURCE, if given)."""
    args: dict[str, Any] = {"namespace": client.namespace(namespace), "name": name}
    if source:
        args["source"] = _source(source)
    r = client.call("runtime.update", **args)
    say(r, as_json, f"{name} v{r['version']} from {r['source']}")


@click.command("kill")
@click.argument("name")
@namespace_option
@client_options
@json_option
def kill(name: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Stop NAME everywhere and forget its spec."""
    r = client.call("runtime.kill", namespace=client.namespace(namespace), name=name)
    say(r, as_json, f"killed {name}")


COMMANDS = [run_cmd, ps, update, kill]

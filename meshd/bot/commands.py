"""The bot's commands: the built-in ones over the daemon's ops, and those services provide.

Rules:
- Each built-in is one or two daemon ops run as the user (`Mesh`): nothing here decides
  who may do what; the daemon's rules do, and a refusal comes back as the reply.
- `restart NAME` is a rolling update of a managed service to the same source
  (`runtime.update`).
- Service commands: an instance whose metadata has `bot.command=NAME` provides `NAME`; the bot
  calls its `Command.Help` (no request; answers {"usage", "help"}) for `help` and its
  `Command.Exec` ({"args": [...], "user": account}; answers {"text", "code"?}) to run it. A
  provided name never shadows a built-in.
"""

from __future__ import annotations

import json
import time
from typing import Any

from meshd.errors import MeshError

from .core import Command, Mesh, Reply, UsageError, json_arg, table

TIMEOUT = 10.0  # seconds a call the bot makes for a user may take


def _need(words: list[str], n: int, what: str) -> None:
    if len(words) < n:
        raise UsageError(f"name the {what}")


async def nodes(mesh: Mesh, words: list[str], raw: str) -> Reply:
    rows = await mesh.call("members")
    return Reply(f"{len(rows)} nodes", table(
        ("NAME", "STATUS", "ADDRESS", "RTT"),
        [(r.get("name"), r.get("status"), r.get("addr") or r.get("address", ""),
          f"{r['rtt_ms']:.1f} ms" if isinstance(r.get("rtt_ms"), int | float) else "-")
         for r in rows]))


async def services(mesh: Mesh, words: list[str], raw: str) -> Reply:
    rows = await mesh.call("services", namespace=mesh.namespace)
    return Reply(f"{len(rows)} services in namespace {mesh.namespace}", table(
        ("SERVICE", "INSTANCES", "NODES", "VERSIONS"),
        [(r["name"], r["instances"], ",".join(r.get("nodes", [])),
          ",".join(r.get("versions", []))) for r in rows]))


async def describe(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "service")
    info = await mesh.call("describe", service=words[0], namespace=mesh.namespace)
    lines = [f"instance {i['id']} on {i['node']} ({i.get('address', '')}) "
             f"version {i.get('version', '')}" for i in info.get("instances", [])]
    first = (info.get("instances") or [{}])[0]
    for ep in first.get("endpoints", []):
        kind = " (stream)" if ep.get("stream") else ""
        lines.append(f"  {ep['name']}{kind}: {json.dumps(ep.get('request'))} -> "
                     f"{json.dumps(ep.get('response'))}")
    return Reply(f"{info['name']}: {len(info.get('instances', []))} instances",
                 "\n".join(lines))


async def call(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 2, "service and the endpoint")
    body = json_arg(raw, "the request")
    result = await mesh.call("rpc.call", service=words[0], endpoint=words[1], body=body,
                             timeout=TIMEOUT, meta={}, namespace=mesh.namespace)
    return Reply(f"{words[0]} {words[1]} answered", json.dumps(result, indent=2))


async def health(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "service")
    rows = await mesh.call("health", service=words[0], namespace=mesh.namespace)
    bad = [r for r in rows if r["status"] != "ok"]
    head = f"{words[0]}: {len(rows) - len(bad)} of {len(rows)} instances ok"
    return Reply(head, table(("INSTANCE", "NODE", "STATUS", "LATENCY", "DETAIL"), [
        (r["id"], r["node"], r["status"], f"{r['latency_ms']:.1f} ms", r.get("detail", ""))
        for r in rows]), ok=not bad)


async def logs(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "service")
    n = 20
    if len(words) > 1:
        if not (words[1].isascii() and words[1].isdigit()) or not 1 <= int(words[1]) <= 500:
            raise UsageError("N is a number of lines, 1..500")
        n = int(words[1])
    found = await mesh.call("debug.logs", service=words[0], limit=n)
    records = found.get("records", [])
    lines = [f"{time.strftime('%H:%M:%S', time.gmtime(r['time']))} {r.get('level', '')[:4]} "
             f"{r.get('instance') or r.get('node', '')}: {r.get('message', '')}"
             for r in records]
    return Reply(f"last {len(records)} log lines of {words[0]}", "\n".join(lines))


async def stats(mesh: Mesh, words: list[str], raw: str) -> Reply:
    found = await mesh.call("debug.stats", **({"service": words[0]} if words else {}))
    if not words:
        return Reply(f"{len(found['nodes'])} nodes", table(
            ("NODE", "UPTIME", "CPU", "RSS", "SERVICES"),
            [(n["node"], f"{n['sample'].get('uptime', 0):.0f} s",
              f"{n['sample'].get('cpu_seconds', 0):.1f} s",
              f"{n['sample'].get('rss_bytes', 0) / 1e6:.0f} MB",
              n["sample"].get("services", 0)) for n in found["nodes"]]))
    rows = [(n["node"], inst["instance"], name, ep["count"], ep["errors"],
             f"{ep['mean_ms']:.2f} ms", f"<= {ep['p99_ms']:g} ms")
            for n in found["nodes"] for inst in n.get("instances", [])
            for name, ep in inst.get("endpoints", {}).items()]
    return Reply(f"{words[0]}: {len(rows)} endpoints called", table(
        ("NODE", "INSTANCE", "ENDPOINT", "REQUESTS", "ERRORS", "MEAN", "P99"), rows))


async def config_get(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "config path")
    r = await mesh.call("config.get", namespace=mesh.namespace, path=words[0])
    return Reply(f"config {words[0]}", json.dumps(r["value"], indent=2))


async def config_set(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "config path")
    if not raw.strip():
        raise UsageError("give the value as JSON")
    value = json_arg(raw, "the value")
    await mesh.call("config.set", namespace=mesh.namespace, path=words[0], value=value)
    return Reply(f"config {words[0]} set", json.dumps(value, indent=2))


async def ps(mesh: Mesh, words: list[str], raw: str) -> Reply:
    r = await mesh.call("runtime.ps", namespace=mesh.namespace,
                        **({"name": words[0]} if words else {}))
    rows = r.get("replicas", [])
    return Reply(f"{len(rows)} replicas of {len(r.get('specs', []))} managed services",
                 table(("NAME", "SLOT", "NODE", "STATE", "PID", "RESTARTS", "VERSION"), [
                     (x["name"], x["slot"], x.get("node") or "-", x["state"],
                      x.get("pid") or "-", x.get("restarts", 0), x.get("version") or "-")
                     for x in rows]))


async def restart(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "managed service")
    r = await mesh.call("runtime.update", namespace=mesh.namespace, name=words[0])
    return Reply(f"{words[0]}: rolling out v{r['version']} from {r['source']} "
                 f"(`ps {words[0]}` shows it)")


async def publish(mesh: Mesh, words: list[str], raw: str) -> Reply:
    _need(words, 1, "topic")
    body = json_arg(raw, "the message")
    r = await mesh.call("broker.publish", topic=words[0], body=body, headers={},
                        namespace=mesh.namespace)
    return Reply(f"published {r.get('id', '')} on {words[0]}")


BUILTINS: list[tuple[str, str, str, Any, int]] = [
    ("nodes", "nodes", "the members and their state", nodes, -1),
    ("services", "services", "the services of your namespace", services, -1),
    ("describe", "describe SERVICE", "a service's instances and endpoints", describe, -1),
    ("call", "call SERVICE ENDPOINT {json}", "call an endpoint", call, 2),
    ("health", "health SERVICE", "check every instance of a service", health, -1),
    ("logs", "logs SERVICE [N]", "a service's last N log lines (20)", logs, -1),
    ("stats", "stats [SERVICE]", "nodes' resources, or a service's endpoints", stats, -1),
    ("config get", "config get PATH", "a config value", config_get, -1),
    ("config set", "config set PATH JSON", "set a config value", config_set, 1),
    ("ps", "ps [NAME]", "managed services' replicas", ps, -1),
    ("restart", "restart NAME", "a rolling restart of a managed service", restart, -1),
    ("publish", "publish TOPIC {json}", "publish a message", publish, 1),
]


def builtins() -> list[Command]:
    commands = [Command(name, usage, text, fn, words)
                for name, usage, text, fn, words in BUILTINS]

    async def help_cmd(mesh: Mesh, words: list[str], raw: str) -> Reply:
        provided = await provided_commands(mesh, with_help=True)
        rows = [(c.usage, c.help) for c in commands] + [(c.usage, c.help) for c in provided]
        who = f"as account {mesh.account}" if mesh.account else "as nobody (not mapped)"
        return Reply(f"Mention me or DM me one of these (you act {who}, namespace "
                     f"{mesh.namespace}):", table(("COMMAND", "WHAT"), rows))

    return [Command("help", "help", "this list", help_cmd, -1), *commands]


async def provided_commands(mesh: Mesh, with_help: bool = False) -> list[Command]:
    """The commands services of the user's namespace provide (`bot.command=NAME` in their
    metadata); `with_help`: each asked for its usage and help (for `help`)."""
    try:
        rows = await mesh.call("services", namespace=mesh.namespace)
    except MeshError:
        return []
    taken = {name for name, *_ in BUILTINS} | {"help", "config"}
    out = []
    for row in rows:
        names = [t.split("=", 1)[1] for t in row.get("tags", [])
                 if t.startswith("bot.command=")]
        for name in (n.lower() for n in names[:1]):
            if not name or name in taken or not name.isidentifier():
                continue
            taken.add(name)
            out.append(await _provided(mesh, name, row["name"], with_help))
    return out


async def _provided(mesh: Mesh, name: str, service: str, with_help: bool) -> Command:
    usage, text = name, f"(from service {service})"
    if with_help:
        try:
            info = await mesh.call("rpc.call", service=service, endpoint="Command.Help",
                                   body={}, timeout=TIMEOUT, meta={},
                                   namespace=mesh.namespace)
        except MeshError:
            info = None
        if isinstance(info, dict):
            usage = str(info.get("usage") or name)[:200]
            text = f"{str(info.get('help') or '')[:200]} (from service {service})".strip()

    async def run(m: Mesh, words: list[str], raw: str) -> Reply:
        r = await m.call("rpc.call", service=service, endpoint="Command.Exec",
                         body={"args": words, "user": m.account}, timeout=TIMEOUT, meta={},
                         namespace=m.namespace)
        if not isinstance(r, dict):
            return Reply(f"{name}: {json.dumps(r)[:500]}")
        return Reply(str(r.get("text") or f"{name} done")[:2000], str(r.get("code") or ""))

    return Command(name, usage, text, run, -1)

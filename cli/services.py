"""Services in the registry: `meshd services`, `describe`, `call`, `stream`, `health`,
`watch`.

Rules:
- Thin functions over the control ops (`services`, `describe`, `rpc.call`, `health`,
  `services.watch`) and the SDK's streaming call; output as everywhere: a table or lines
  for people, `--json` for programs (one JSON line per event or reply when streaming).
- A request body is JSON from the argument, else stdin (`-` or no argument); JSON that does
  not parse, or a --meta without "=", is a "400 bad request" line.
- `call --via wss://HOST:PORT` calls from outside the cluster through a node's proxy
  endpoint with the user's own token.
- `health` exits with status 1 when any instance is not ok.
- `watch` follows registry changes as the local operator (it sends no token).
- Every command acts in one namespace (--namespace, MESHD_NAMESPACE, the environment's,
  else default); `watch` without --namespace or MESHD_NAMESPACE follows every namespace.
  JSON rows carry "namespace"; `describe` and `watch` show it when it is not default.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from meshd_cli.args import parse_meta
from meshd_cli.client import Client, call_via, client_options, namespace_option, via_options
from meshd_cli.output import console, fail, json_option, line, say, show


@click.command()
@namespace_option
@client_options
@json_option
def services(namespace: str | None, client: Client, as_json: bool) -> None:
    """List the services of a namespace in the registry."""
    rows = client.call("services", namespace=client.namespace(namespace))
    show(rows, as_json, ("service", "instances", "nodes", "versions"),
         ((r["name"], str(r["instances"]), ",".join(r["nodes"]), ",".join(r["versions"]))
          for r in rows))


@click.command()
@click.argument("service")
@namespace_option
@client_options
@json_option
def describe(service: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Show a service's instances, nodes and endpoints with their formats."""
    info = client.call("describe", service=service, namespace=client.namespace(namespace))
    if as_json:
        click.echo(json.dumps(info))
        return
    ns = info.get("namespace", "default")
    console.print(f"[bold]{info['name']}[/]" + (f" (namespace {ns})" if ns != "default"
                                                 else ""))
    for inst in info["instances"]:
        console.print(f"  instance {inst['id']} on {inst['node']} ({inst['address']}) "
                      f"version {inst.get('version') or '-'}")
    first = info["instances"][0]
    for ep in first["endpoints"]:
        console.print(f"  endpoint [bold]{ep['name']}[/]")
        console.print(f"    request  {json.dumps(ep.get('request'))}")
        console.print(f"    response {json.dumps(ep.get('response'))}")


@click.command("call")
@click.argument("service")
@click.argument("endpoint")
@click.argument("body", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option("--meta", multiple=True, metavar="K=V", help="Request metadata (repeatable).")
@click.option("--trace", is_flag=True, help="Trace this call whatever the sampling rate, and "
              "print its trace id (on stderr; `meshd trace ID` shows where the time went).")
@via_options("Call from outside the cluster through a node's proxy endpoint with your "
             "token (--token, MESHD_TOKEN or `auth login`).")
@namespace_option
@client_options
@json_option
def call_cmd(service: str, endpoint: str, body: str | None, timeout: float | None,
             meta: tuple[str, ...], trace: bool, via: str | None, ca_file: str | None,
             namespace: str | None, client: Client, as_json: bool) -> None:
    """Call ENDPOINT of SERVICE with a JSON BODY (or JSON on stdin)."""
    text = body if body is not None and body != "-" else (
        sys.stdin.read() if not sys.stdin.isatty() else "{}")
    try:
        request = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: the request is not valid JSON: {exc.msg} at line {exc.lineno} "
             f"column {exc.colno}")
    metadata = parse_meta(meta)
    trace_id = ""
    if trace:
        trace_id = os.urandom(16).hex()  # a sampled root: every hop keeps its span
        metadata["traceparent"] = f"00-{trace_id}-{os.urandom(8).hex()}-01"
    if ca_file and not via:
        fail("400 bad request: --ca-file goes with --via wss://HOST:PORT")
    if via:
        result = call_via(via, ca_file, "call", service=service, endpoint=endpoint,
                          body=request, timeout=timeout, meta=metadata,
                          namespace=namespace or "default")
    else:
        result = client.call("rpc.call", service=service, endpoint=endpoint, body=request,
                             timeout=timeout, meta=metadata,
                             namespace=client.namespace(namespace))
    say(result, as_json, json.dumps(result, indent=2))
    if trace_id:
        line(f"trace {trace_id}", err=True)


@click.command()
@click.argument("service")
@namespace_option
@client_options
@json_option
def health(service: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Check every instance of SERVICE."""
    rows = client.call("health", service=service, namespace=client.namespace(namespace))
    show(rows, as_json, ("instance", "node", "status", "latency", "detail"),
         ((r["id"], r["node"],
           f"[{'green' if r['status'] == 'ok' else 'red'}]{r['status']}[/]",
           f"{r['latency_ms']:.2f} ms", r["detail"]) for r in rows))
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


@click.command()
@namespace_option
@client_options
@json_option
def watch(namespace: str | None, client: Client, as_json: bool) -> None:
    """Stream registry changes (create, update, delete) until interrupted (of one namespace
    with --namespace or MESHD_NAMESPACE, else of every one)."""
    def show_event(ev: Any) -> None:
        if as_json:
            line(json.dumps(ev))
        else:
            inst = ev["instance"]
            ns = inst.get("namespace") or "default"
            line(f"{ev['kind']:7} {inst.get('service', '?')} {inst.get('id')} "
                 f"on {inst.get('node')}" + (f" in {ns}" if ns != "default" else ""))

    client.stream("services.watch", show_event,
                  namespace=client.namespace(namespace) if namespace else None)


@click.command("stream")
@click.argument("service")
@click.argument("endpoint")
@click.argument("body", required=False)
@namespace_option
@client_options
@json_option
def stream_cmd(service: str, endpoint: str, body: str | None, namespace: str | None,
               client: Client, as_json: bool) -> None:
    """Call a streaming ENDPOINT: send BODY (or each JSON line of stdin), print each reply."""
    lines: list[Any] = []
    try:
        if body is not None and body != "-":
            lines = [json.loads(body)]
        elif not sys.stdin.isatty():
            lines = [json.loads(text) for text in sys.stdin if text.strip()]
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: the request is not valid JSON: {exc.msg} at column "
             f"{exc.colno}")

    client.rpc_stream(service, endpoint, lines,
                      lambda msg: line(json.dumps(msg) if as_json else json.dumps(msg, indent=2)),
                      namespace=client.namespace(namespace))


COMMANDS: tuple[click.Command, ...] = (services, describe, call_cmd, health, watch, stream_cmd)

"""`meshd publish`, `meshd subscribe`, `meshd topics`: the broker from the command line.

Rules:
- Thin functions over the `broker.*` control ops, in one namespace (--namespace,
  MESHD_NAMESPACE, the environment's, else default).
- `publish TOPIC [BODY]`: BODY is JSON (a string needs quotes); without BODY (or with "-")
  the body is read from stdin; text that is not JSON is a 400 line, never sent as
  something else.
- `subscribe PATTERN` prints one line per message until Ctrl-C: with --json one JSON object
  (`topic`, `id`, `headers`, `body`, `published_at`, `publisher`, and for durable
  subscribers `durable` and `attempt`); a durable message is acked once its line is
  printed and flushed (so a subscriber killed mid-stream repeats only what it had not
  printed).
- Durations (--delay, --max-age) are written like 30s, 5m, 1h30m, 250ms, 2d.
- `topics create TOPIC --durable --backend nats --url-file F` keeps the topic in NATS
  JetStream; F holds the server's URL (it may hold a password, so it is read from a file,
  never taken on the command line, and never printed: a bad file is a 400 line naming the
  file, not its content).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from meshd_cli.args import parse_duration, parse_pairs
from meshd_cli.client import Client, client_options, namespace_option, run
from meshd_cli.output import fail, json_option, line, print_table, show_lines


def _parse_body(body: str | None) -> Any:
    text = sys.stdin.read() if body in (None, "-") else body
    assert text is not None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: BODY is not valid JSON: {exc.msg} at line {exc.lineno} "
             f"column {exc.colno} (strings need quotes: '\"text\"')")


@click.command("publish")
@click.argument("topic")
@click.argument("body", required=False)
@click.option("--header", "headers", multiple=True, metavar="K=V",
              help="A message header (repeatable).")
@click.option("--delay", metavar="DUR", help="Deliver no earlier than this from now "
              "(durable topics only), e.g. 30s.")
@click.option("--id", "msg_id", metavar="ID", help="Message id (republishing the same id "
              "within the dedup window is a duplicate).")
@click.option("--trace", is_flag=True, help="Trace this message (a traceparent header) and "
              "print its trace id on stderr (`meshd trace ID`: who published, who got it).")
@namespace_option
@client_options
@json_option
def publish(topic: str, body: str | None, headers: tuple[str, ...], delay: str | None,
            msg_id: str | None, trace: bool, namespace: str | None, client: Client,
            as_json: bool) -> None:
    """Publish BODY (JSON; stdin without it) on TOPIC."""
    hdrs = parse_pairs(headers, "--header")
    trace_id = ""
    if trace:
        trace_id = os.urandom(16).hex()
        hdrs["traceparent"] = f"00-{trace_id}-{os.urandom(8).hex()}-01"
    args: dict[str, Any] = {"topic": topic, "body": _parse_body(body), "headers": hdrs,
                            "namespace": client.namespace(namespace)}
    if delay is not None:
        args["delay"] = parse_duration(delay, "--delay")
    if msg_id is not None:
        args["id"] = msg_id
    r = client.call("broker.publish", **args)
    if as_json:
        click.echo(json.dumps(r))
    elif "seq" in r:
        dup = " (duplicate: already held)" if r.get("duplicate") else ""
        click.echo(f"published {r['id']} as #{r['seq']} on {r.get('node')}{dup}")
    else:
        click.echo(f"published {r['id']} to {r['nodes']} node(s)")
    if trace_id:
        line(f"trace {trace_id}", err=True)


@click.command("subscribe")
@click.argument("pattern")
@click.option("--queue", metavar="GROUP", help="Share messages within this queue group.")
@click.option("--durable", metavar="NAME", help="A durable subscriber: acks, redelivery, "
              "resumes after its last ack.")
@click.option("--buffer", type=click.IntRange(min=1, max=1_000_000), help="Messages held "
              "for this subscriber before --policy applies (default: broker setting).")
@click.option("--policy", type=click.Choice(["drop-oldest", "drop-newest", "block"]),
              help="When the buffer is full (default drop-oldest).")
@namespace_option
@client_options
@json_option
def subscribe(pattern: str, queue: str | None, durable: str | None, buffer: int | None,
              policy: str | None, namespace: str | None, client: Client,
              as_json: bool) -> None:
    """Print messages on PATTERN (wildcards * and >) until Ctrl-C."""
    from meshd.errors import MeshError
    from meshd_sdk.broker import Subscription

    control = client._control()

    async def go() -> None:
        try:
            info, conn = await control.session(
                "broker.subscribe", pattern=pattern, queue=queue, durable=durable,
                buffer=buffer, policy=policy, namespace=client.namespace(namespace))
            if not as_json:  # (with --json stdout and stderr carry nothing but messages)
                line(f"subscribed to {pattern} as {info['id']}"
                     + (f" (durable {durable})" if durable else "")
                     + (f" (queue {queue})" if queue and not durable else ""), err=True)
            sub = Subscription(conn, info)
            dropped = 0
            while True:
                try:
                    msg = await sub.receive()
                except MeshError as exc:
                    if exc.status == 503:
                        raise MeshError(503, "the daemon ended the subscription") from None
                    raise
                if as_json:
                    line(json.dumps(msg.to_json()))
                else:
                    if sub.dropped > dropped:
                        line(f"({sub.dropped - dropped} message(s) dropped: this subscriber "
                             f"fell behind; see --buffer and --policy)", err=True)
                    line(f"{msg.topic} {json.dumps(msg.body)}")
                dropped = sub.dropped
                await msg.ack()
        finally:
            await control.aclose()

    run(go, until_interrupted=True)


@click.group("topics", invoke_without_command=True)
@namespace_option
@client_options
@json_option
@click.pass_context
def topics(ctx: click.Context, namespace: str | None, client: Client, as_json: bool) -> None:
    """Topics: durable topics with their settings and counts (every node's summed), who
    subscribes where, and each subscription's buffer and drops."""
    if ctx.invoked_subcommand is not None:
        return
    r = client.call("broker.topics", namespace=client.namespace(namespace))
    if as_json:
        click.echo(json.dumps(r))
        return
    if r["durable"]:
        print_table(["durable topic", "messages", "settings", "durable subscribers"], [
            (t["topic"], str(t["messages"]),
             " ".join(f"{k}={v}" for k, v in sorted(t["settings"].items())),
             ", ".join(f"{n}: pending {s['pending']} waiting {s['waiting']} dead {s['dead']}"
                       for n, s in sorted(t["subscribers"].items())) or "-")
            for t in r["durable"]])
    if r["interest"]:
        print_table(["node", "pattern", "queue", "durable", "subscribers"], [
            (i["node"], i["pattern"], i["queue"] or "-", i["durable"] or "-",
             str(i["subscribers"])) for i in r["interest"]])
    if r.get("subscriptions"):
        print_table(["node", "subscription", "pattern", "policy", "buffered", "delivered",
                     "dropped"], [
            (s["node"], s["id"], s["pattern"], s["policy"], str(s["buffered"]),
             str(s["delivered"]), str(s["dropped"])) for s in r["subscriptions"]])
    if r.get("unanswered"):
        click.echo(f"(no answer from {', '.join(r['unanswered'])}: their logs and "
                   "subscriptions are not counted)", err=True)
    if not (r["durable"] or r["interest"]):
        click.echo(f"no topics or subscribers in namespace {r['namespace']}")


@topics.command("create")
@click.argument("topic")
@click.option("--durable", is_flag=True, required=True, help="Keep messages on disk (the "
              "only kind of topic that needs creating).")
@click.option("--max-age", metavar="DUR", help="Drop messages older than this (e.g. 7d).")
@click.option("--max-msgs", type=click.IntRange(min=1), help="Keep at most this many "
              "messages per node.")
@click.option("--replicas", type=click.IntRange(min=1), help="Nodes that hold each message "
              "before a publish is acknowledged.")
@click.option("--max-deliver", type=click.IntRange(min=1), help="Deliveries before a "
              "message goes to TOPIC.dead (default: broker setting, 5).")
@click.option("--ack-wait", metavar="DUR", help="Redeliver an unacked message after this "
              "(default 30s).")
@click.option("--backend", type=click.Choice(["embedded", "nats"]), default="embedded",
              show_default=True, help="Where the messages are kept: each node's embedded log, "
              "or a NATS JetStream server (needs --url-file).")
@click.option("--url-file", metavar="FILE", help="With --backend nats: a file holding the "
              "server's URL, nats://[user:password@]host[:port].")
@namespace_option
@client_options
@json_option
def topics_create(topic: str, durable: bool, max_age: str | None, max_msgs: int | None,
                  replicas: int | None, max_deliver: int | None, ack_wait: str | None,
                  backend: str, url_file: str | None, namespace: str | None, client: Client,
                  as_json: bool) -> None:
    """Create the durable topic TOPIC (and TOPIC.dead for its dead letters)."""
    args: dict[str, Any] = {"topic": topic, "durable": durable, "max_msgs": max_msgs,
                            "replicas": replicas, "max_deliver": max_deliver,
                            "namespace": client.namespace(namespace)}
    if backend == "nats":
        args["backend"], args["url"] = "nats", _read_url(url_file)
    elif url_file is not None:
        fail("400 bad request: --url-file is for --backend nats (the embedded log needs no "
             "server)")
    if max_age is not None:
        args["max_age"] = parse_duration(max_age, "--max-age")
    if ack_wait is not None:
        args["ack_wait"] = parse_duration(ack_wait, "--ack-wait")
    r = client.call("broker.topics.create", **{k: v for k, v in args.items()
                                               if v is not None})
    where = f" on NATS at {r['server']}" if r.get("backend") == "nats" else ""
    show_lines(r, as_json, [f"created durable topic {topic} (and {topic}.dead){where}"
                            if not topic.endswith(".dead") else
                            f"created durable topic {topic}{where}"])


def _read_url(path: str | None) -> str:
    """The NATS URL in the --url-file (checked here too, so a bad file is said at once);
    a 400 line naming the file, never its content."""
    from meshd.broker.jetstream import parse_url
    from meshd.errors import MeshError

    if path is None:
        fail("400 bad request: --backend nats needs --url-file FILE (a file holding the "
             "server's URL, nats://[user:password@]host[:port])")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"400 bad request: --url-file {path}: cannot read it "
             f"({getattr(exc, 'strerror', None) or type(exc).__name__})")
    try:
        parse_url(text)
    except MeshError as exc:
        fail(f"400 bad request: --url-file {path}: {exc.detail}")
    return text


@topics.command("delete")
@click.argument("topic")
@namespace_option
@client_options
@json_option
def topics_delete(topic: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Delete the durable topic TOPIC, its messages and its subscribers' state."""
    r = client.call("broker.topics.delete", topic=topic, namespace=client.namespace(namespace))
    left = r.get("streams_left")
    show_lines(r, as_json, [f"deleted durable topic {topic}"] + (
        [f"(NATS could not be reached: delete the streams {', '.join(left)} there)"]
        if left else []))


COMMANDS = [publish, subscribe, topics]

"""The Slack bot with a real daemon and a local stand-in for Slack (slackfake.py): every
command's reply is posted to the channel it came from; a bad signature or an old timestamp
gets 401 and runs nothing; a retried event runs once; users act with their mapped account's
rules (an unmapped one cannot `config set`); a service's command appears in `help` and
answers; every command is in the daemon's logs with its user; Socket Mode works the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster import Cluster, control, wait_for
from .slackfake import SECRET, FakeSlack, SocketModeServer, event, post, signed
from .test_broker import FAST, ready

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter" / "main.py"
DICE = ROOT / "examples" / "bot-command" / "main.py"


def start_bot(d, slack: FakeSlack, tmp: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    (tmp / "bot.token").write_text("xoxb-test-token\n")
    (tmp / "signing.secret").write_text(SECRET + "\n")
    (tmp / "app.token").write_text("xapp-test-token\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MESHD_ADDR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshd_cli", "bot", "slack", "--bot-token-file",
         str(tmp / "bot.token"),
         "--signing-secret-file", str(tmp / "signing.secret"), "--app-token-file",
         str(tmp / "app.token"), "--api-url", slack.api_url, "--data-dir", str(d.data_dir),
         "--json", *args],
        stdout=subprocess.PIPE, stderr=open(tmp / "bot.log", "ab"), env=env, cwd=ROOT)  # noqa: SIM115
    line = proc.stdout.readline()
    assert line, (tmp / "bot.log").read_text()[-3000:]
    return proc, json.loads(line)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("bot")
    c = Cluster(root)
    slack = FakeSlack()
    bot = None
    try:
        a = c.add("a", env=FAST)
        ready(a)
        c.service(a, "greeter", script=GREETER)
        c.service(a, "dice", script=DICE)
        c.service(a, "testsvc")
        wait_for(lambda: {"greeter", "dice", "testsvc"} <= {
            s["name"] for s in control(a.data_dir, "services")}, 20, "services registered")
        control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1",
                scopes=["admin"])
        control(a.data_dir, "auth.accounts.create", id="viewer", secret="viewer-secret-1",
                scopes=["viewer"])
        control(a.data_dir, "auth.rules.create", id="viewer-public-config",
                resource="config:default:public.*", scope="viewer", access="granted",
                priority=10)
        control(a.data_dir, "config.set", path="public.motd", value="hello")
        control(a.data_dir, "bot.map", user="U0ALICE", account="ops")
        control(a.data_dir, "bot.map", user="U0VIEW", account="viewer")
        bot, status = start_bot(a, slack, root, "--listen", "127.0.0.1:0")
        yield {"a": a, "slack": slack, "url": status["events"], "root": root}
    finally:
        if bot is not None:
            bot.terminate()
            bot.wait(10)
        slack.close()
        c.close()


def ask(m, text: str, user: str = "U0ALICE", **kw) -> dict:
    """Mention the bot with `text`; the reply it posts."""
    status, _ = post(m["url"], event(f"<@UBOTBOT> {text}", user=user, **kw))
    assert status == 200
    return m["slack"].wait_post()


def test_each_command_is_answered_in_its_channel(mesh):
    r = ask(mesh, "help", channel="C0HELP")
    assert r["channel"] == "C0HELP"
    for word in ("nodes", "services", "describe SERVICE", "call SERVICE ENDPOINT {json}",
                 "health SERVICE", "logs SERVICE [N]", "stats [SERVICE]", "config get PATH",
                 "config set PATH JSON", "ps [NAME]", "restart NAME", "publish TOPIC {json}"):
        assert word in r["text"], word
    # a service's command is listed, with its usage and help
    assert "roll [NdM]" in r["text"] and "roll dice" in r["text"]
    assert r["blocks"][0]["type"] == "section"

    assert "a  " in ask(mesh, "nodes")["text"] and "alive" in ask(mesh, "nodes")["text"]
    r = ask(mesh, "services")
    assert "greeter" in r["text"] and "dice" in r["text"]
    assert "Greeter.Hello" in ask(mesh, "describe greeter")["text"]
    r = ask(mesh, 'call greeter Greeter.Hello {"name": "Ada"}')
    assert "Hello Ada" in r["text"], r["text"]
    # Slack's smart quotes and a code fence around the JSON are undone
    r = ask(mesh, "call greeter Greeter.Hello ```{\u201cname\u201d: \u201cBo\u201d}```")
    assert "Hello Bo" in r["text"], r["text"]
    assert "1 of 1 instances ok" in ask(mesh, "health greeter")["text"]
    assert "registered greeter" in ask(mesh, "logs greeter 50")["text"]
    assert "Greeter.Hello" in ask(mesh, "stats greeter")["text"]
    assert "1 nodes" in ask(mesh, "stats")["text"]
    r = ask(mesh, 'config set shop.currency "EUR"')
    assert "config shop.currency set" in r["text"], r["text"]
    assert '"EUR"' in ask(mesh, "config get shop.currency")["text"]
    assert "replicas of" in ask(mesh, "ps")["text"]
    assert "404" in ask(mesh, "restart nosuch")["text"]
    assert "published" in ask(mesh, 'publish orders.new {"id": 7}')["text"]
    # the service command runs as the user's account
    r = ask(mesh, "roll 3d6")
    assert "ops rolled" in r["text"], r["text"]
    # bad input: a clear reply, never silence
    assert "help" in ask(mesh, "frobnicate")["text"]
    assert "not JSON" in ask(mesh, "call greeter Greeter.Hello {nope")["text"]
    assert "Usage" in ask(mesh, "describe")["text"]
    # a direct message is answered too; the bot's own messages are not
    status, _ = post(mesh["url"], event("services", kind="message", channel="D0DM",
                                        channel_type="im"))
    assert status == 200 and mesh["slack"].wait_post()["channel"] == "D0DM"
    post(mesh["url"], event("services", kind="message", channel="D0DM", channel_type="im",
                            user="UBOTBOT", bot_id="BBOTBOT"))
    assert mesh["slack"].no_post(1.0)


def test_slack_gets_its_ack_at_once_and_a_slow_command_answers_afterwards(mesh):
    """Slack wants an answer within 3 s: the event is acked before the command runs (here
    before a 4 s call could end), its reply posted afterwards."""
    t0 = time.monotonic()
    status, _ = post(mesh["url"], event('<@UBOTBOT> call testsvc Test.Sleep {"seconds": 4}'))
    acked = time.monotonic() - t0
    assert status == 200 and acked < 4.0, acked  # not held until the command ended
    r = mesh["slack"].wait_post(timeout=20)
    assert "slept" in r["text"] and time.monotonic() - t0 >= 4.0


def test_long_output_is_cut_with_a_note(mesh):
    big = {f"k{i}": "x" * 50 for i in range(200)}
    control(mesh["a"].data_dir, "config.set", path="big", value=big)
    r = ask(mesh, "config get big")
    assert "more lines" in r["text"] and "not shown" in r["text"]
    assert all(len(b["text"]["text"]) <= 3000 for b in r["blocks"])


def test_users_act_with_their_accounts_rules(mesh):
    # unmapped: nobody, who may not set config; the reply says why and who it acted as
    r = ask(mesh, 'config set shop.currency "USD"', user="U0EVE")
    assert "denied" in r["text"] and "not mapped" in r["text"], r["text"]
    # a viewer has config under public.* only: the refusal names the resource and account
    assert '"hello"' in ask(mesh, "config get public.motd", user="U0VIEW")["text"]
    r = ask(mesh, 'config set shop.currency "USD"', user="U0VIEW")
    assert "403" in r["text"] and "config:default:shop.currency" in r["text"], r["text"]
    assert "account `viewer`" in r["text"]
    value = control(mesh["a"].data_dir, "config.get", path="shop.currency")["value"]
    assert value == "EUR"
    # every command is in the daemon's logs with its user
    def logged() -> str:
        found = control(mesh["a"].data_dir, "debug.logs", service="meshd-bot", limit=500)
        return "\n".join(r["message"] for r in found["records"])
    wait_for(lambda: "U0VIEW as viewer: config set shop.currency" in logged(), 10,
             "the bot's log in the daemon")
    assert "U0EVE as nobody: config set" in logged()


def test_bad_signatures_old_timestamps_and_retries(mesh):
    url, slack = mesh["url"], mesh["slack"]
    payload = event("<@UBOTBOT> services")
    body = json.dumps(payload).encode()
    # a bad signature, a missing one, an old timestamp: 401 and nothing runs
    for headers in ({**signed(body), "X-Slack-Signature": "v0=" + "0" * 64},
                    {"Content-Type": "application/json"},
                    signed(body, ts=int(time.time()) - 6 * 60),
                    signed(body, secret="another-secret")):
        status, _ = post(url, payload, headers=headers, body=body)
        assert status == 401
    assert slack.no_post(1.5)
    # a retried event (Slack did not see the ack in time) runs once
    status, _ = post(url, payload)
    assert status == 200
    assert "greeter" in slack.wait_post()["text"]
    retry = {**signed(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    status, _ = post(url, payload, headers=retry, body=body)
    assert status == 200
    assert slack.no_post(1.5)
    # Slack's URL check is answered
    challenge = {"type": "url_verification", "challenge": "abc123", "token": "x"}
    status, out = post(url, challenge)
    assert status == 200 and b"abc123" in out
    # only POST /slack/events
    status, _ = post(url.replace("/slack/events", "/other"), payload)
    assert status == 404


def test_socket_mode(mesh, tmp_path):
    ws = SocketModeServer()
    slack = FakeSlack()
    slack.socket_url = ws.url
    proc = None
    try:
        proc, status = start_bot(mesh["a"], slack, tmp_path, "--socket-mode")
        assert status == {"events": None, "socket_mode": True}
        assert ws.connected.wait(10)
        ws.push(event("<@UBOTBOT> services", event_id="EvSOCK1"), "env-1")
        r = slack.wait_post()
        assert "greeter" in r["text"] and r["channel"] == "C0OPS"
        wait_for(lambda: "env-1" in ws.acks, 10, "the envelope acknowledged")
        # the same event again (Slack redelivers): acknowledged, run once
        ws.push(event("<@UBOTBOT> services", event_id="EvSOCK1"), "env-2")
        wait_for(lambda: "env-2" in ws.acks, 10, "the second envelope acknowledged")
        assert slack.no_post(1.5)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        slack.close()
        ws.close()


def test_bad_input_to_the_command(tmp_path):
    env = {**os.environ, "SLACK_BOT_TOKEN": "", "PYTHONPATH": os.pathsep.join(sys.path)}
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshd_cli", "bot", "slack", *args],
                              capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    out = run("--listen", "127.0.0.1:0")
    assert out.returncode == 1 and "bot token" in out.stderr
    out = run("--listen", "127.0.0.1:0", "--socket-mode")
    assert out.returncode == 1 and "--listen" in out.stderr
    out = run("--listen", "127.0.0.1:0", "--bot-token-file", str(tmp_path / "missing"))
    assert out.returncode == 1 and "missing" in out.stderr
    assert "Traceback" not in out.stderr

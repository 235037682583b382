"""The bot's chat-agnostic core: a chat message's text cleaned into a command line, the
command found (two words before one, any case, unknown -> a pointer at `help`), its JSON
argument parsed, a refusal of the mesh turned into a reply naming the account, and replies
cut to fit as text and as Slack blocks (which cannot mention @channel)."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.bot.commands import builtins
from meshd.bot.core import (
    MAX_CHARS,
    MAX_INPUT,
    MAX_LINES,
    Bot,
    Command,
    Reply,
    UsageError,
    clean,
    denied,
    json_arg,
    table,
)
from meshd.errors import MeshError


class FakeMesh:
    """A Mesh without a daemon: records (op, args); answers from `answers` by op (or by
    (op, endpoint) for rpc.call); an answer that is an exception is raised."""

    def __init__(self, answers: dict[Any, Any] | None = None, account: str = "alice",
                 namespace: str = "team", fail: MeshError | None = None) -> None:
        self.answers = {"services": [], **(answers or {})}
        self.account = account
        self.namespace = namespace
        self.fail = fail  # raised by every op
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, op: str, /, **args: Any) -> Any:
        self.calls.append((op, args))
        if self.fail is not None:
            raise self.fail
        key = (op, args.get("endpoint"))
        answer = self.answers[key] if key in self.answers else self.answers[op]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def bot(**kw: Any) -> Bot:
    return Bot(builtins(), **kw)


# --- clean() -------------------------------------------------------------------------------

def test_clean_strips_mentions_at_the_start_the_middle_and_the_end():
    assert clean("<@U123> config get <@U456|bob> a.b <@W9>") == "config get a.b"
    assert clean("<@U123>") == ""


def test_clean_decodes_slacks_three_escapes():
    assert clean('call s E {"a": "&lt;b&gt; &amp; c"}') == 'call s E {"a": "<b> & c"}'
    # decoded once: a user who typed "&lt;" literally (sent as "&amp;lt;") keeps it
    assert clean("publish t &amp;lt;") == "publish t &lt;"


def test_clean_straightens_smart_quotes():
    assert clean("call s E {\u201ca\u201d: \u2018x\u2019}") == "call s E {\"a\": 'x'}"


def test_clean_cuts_input_over_max_input():
    assert len(clean("x" * (MAX_INPUT + 5000))) == MAX_INPUT
    assert clean("y" * MAX_INPUT + " tail") == "y" * MAX_INPUT


async def test_a_mention_anywhere_in_the_message_does_not_change_the_command():
    for text in ("<@UBOT> nodes", "nodes <@UBOT>", "<@UBOT> <@UOTHER> nodes"):
        mesh = FakeMesh({"members": []})
        reply = await bot().handle("U1", text, mesh)
        assert reply.ok and mesh.ops() == ["members"], text


async def test_a_mention_followed_by_punctuation_is_stripped():
    mesh = FakeMesh({"members": []})
    reply = await bot().handle("U1", "<@UBOT>: nodes", mesh)
    assert reply.ok and mesh.ops() == ["members"]


async def test_spaces_inside_a_json_string_reach_the_mesh_unchanged():
    mesh = FakeMesh({"broker.publish": {"id": "m1"}})
    await bot().handle("U1", 'publish t {"m": "a  b"}', mesh)
    assert mesh.calls[0][1]["body"] == {"m": "a  b"}


# --- finding the command -------------------------------------------------------------------

def recorder(seen: list[tuple[str, list[str], str]], name: str) -> Any:
    async def run(mesh: Any, words: list[str], raw: str) -> Reply:
        seen.append((name, words, raw))
        return Reply(name)
    return run


def group_bot(seen: list[tuple[str, list[str], str]]) -> Bot:
    return Bot([Command("help", "help", "", recorder(seen, "help"), -1),
                Command("config", "config X", "", recorder(seen, "config"), -1),
                Command("config get", "config get P", "", recorder(seen, "config get"), -1),
                Command("config set", "config set P J", "", recorder(seen, "config set"), 1)])


async def test_two_word_commands_are_found_before_one_word_ones():
    seen: list[tuple[str, list[str], str]] = []
    b = group_bot(seen)
    await b.handle("U1", "config get a.b", FakeMesh())
    await b.handle("U1", 'config set a.b {"x": 1}', FakeMesh())
    await b.handle("U1", "config other a.b", FakeMesh())
    assert seen == [("config get", ["a.b"], ""), ("config set", ["a.b"], '{"x": 1}'),
                    ("config", ["other", "a.b"], "")]


async def test_the_command_word_is_found_in_any_case():
    seen: list[tuple[str, list[str], str]] = []
    b = group_bot(seen)
    await b.handle("U1", "CONFIG Get a.B", FakeMesh())
    assert seen == [("config get", ["a.B"], "")]  # the arguments keep their case
    mesh = FakeMesh({"members": []})
    assert (await bot().handle("U1", "NoDeS", mesh)).ok
    assert mesh.ops() == ["members"]


async def test_an_unknown_command_points_at_help():
    mesh = FakeMesh()
    reply = await bot().handle("U1", "frobnicate the mesh", mesh)
    assert not reply.ok
    assert "`frobnicate`" in reply.text and "`help`" in reply.text
    long = await bot().handle("U1", "z" * 300, FakeMesh())
    assert "z" * 40 in long.text and "z" * 41 not in long.text


async def test_empty_text_or_a_bare_mention_is_help():
    for text in ("", "   ", "<@UBOT>"):
        mesh = FakeMesh(account="alice", namespace="team")
        reply = await bot().handle("U1", text, mesh)
        assert reply.ok, text
        assert "account alice" in reply.text and "namespace team" in reply.text
        assert "call SERVICE ENDPOINT {json}" in reply.code
        assert "config set PATH JSON" in reply.code


async def test_every_command_is_logged_with_user_account_and_outcome():
    logged: list[tuple[str, str, str, str]] = []
    b = bot(log=lambda *a: logged.append(a))
    await b.handle("U1", "<@UBOT> nodes", FakeMesh({"members": []}, account="alice"))
    await b.handle("U2", "nope", FakeMesh(account=""))
    assert logged[0] == ("U1", "alice", "nodes", "ok")
    assert logged[1][:3] == ("U2", "", "nope") and "help" in logged[1][3]


# --- JSON arguments ------------------------------------------------------------------------

async def test_call_passes_the_parsed_json_body():
    mesh = FakeMesh({"rpc.call": {"ok": True}})
    reply = await bot().handle("U1", 'call svc Ep {"a": 1}', mesh)
    assert reply.ok
    assert mesh.calls[0][0] == "rpc.call"
    assert mesh.calls[0][1]["body"] == {"a": 1}
    assert (mesh.calls[0][1]["service"], mesh.calls[0][1]["endpoint"]) == ("svc", "Ep")


async def test_json_with_spaces_and_in_a_code_fence():
    for text in ('call svc Ep {"a": [1, 2], "b": {"c": "x y"}}',
                 'call svc Ep ```{"a": [1, 2], "b": {"c": "x y"}}```',
                 'call svc Ep\n```\n{"a": [1, 2],\n "b": {"c": "x y"}}\n```'):
        mesh = FakeMesh({"rpc.call": None})
        reply = await bot().handle("U1", text, mesh)
        assert reply.ok, (text, reply)
        assert mesh.calls[0][1]["body"] == {"a": [1, 2], "b": {"c": "x y"}}, text


def test_json_arg():
    assert json_arg("", "x") is None
    assert json_arg("  ```[1, 2]```  ", "x") == [1, 2]
    assert json_arg("``````", "x") is None
    with pytest.raises(UsageError, match="the thing is not JSON"):
        json_arg("{a: 1}", "the thing")


async def test_invalid_json_is_a_usage_reply_and_calls_nothing():
    mesh = FakeMesh()
    reply = await bot().handle("U1", "call svc Ep {a: 1}", mesh)
    assert not reply.ok
    assert "not JSON" in reply.text and "`call SERVICE ENDPOINT {json}`" in reply.text
    assert mesh.calls == []


async def test_config_set_without_a_value_is_a_usage_reply():
    mesh = FakeMesh()
    reply = await bot().handle("U1", "config set a.b", mesh)
    assert not reply.ok and "`config set PATH JSON`" in reply.text
    assert mesh.calls == []


async def test_an_unbalanced_quote_is_a_usage_reply():
    mesh = FakeMesh()
    reply = await bot().handle("U1", 'describe "svc', mesh)
    assert not reply.ok and "`describe SERVICE`" in reply.text and mesh.calls == []


async def test_deeply_nested_json_is_a_reply_not_an_exception():
    mesh = FakeMesh({"rpc.call": None})
    reply = await bot().handle("U1", "call svc Ep " + "[" * 3000 + "]" * 3000, mesh)
    assert isinstance(reply, Reply)


# --- refusals and errors -------------------------------------------------------------------

async def test_a_denial_names_the_account():
    for status in (401, 403):
        mesh = FakeMesh(account="alice", fail=MeshError(status, "rule r1 denies rpc:svc"))
        reply = await bot().handle("U1", "call svc Ep {}", mesh)
        assert not reply.ok
        assert reply.text.startswith(f"{status} denied: rule r1 denies rpc:svc")
        assert "account `alice`" in reply.text


async def test_a_denial_of_an_unmapped_user_says_not_mapped():
    mesh = FakeMesh(account="", fail=MeshError(403, "public scope may not"))
    reply = await bot().handle("U1", "services", mesh)
    assert not reply.ok and "not mapped" in reply.text and "meshd bot map" in reply.text
    assert "account `" not in reply.text
    assert "not mapped" in denied(MeshError(401, "x"), FakeMesh(account=""))


async def test_other_errors_are_status_and_detail():
    mesh = FakeMesh(fail=MeshError(404, "service 'svc' has no instances"))
    reply = await bot().handle("U1", "describe svc", mesh)
    assert reply == Reply("404 service 'svc' has no instances", ok=False)


LINES = ["nodes", "services", "describe svc", "call svc Ep {}", "health svc", "logs svc 5",
         "stats", "stats svc", "config get a", "config set a 1", "ps", "ps web",
         "restart web", "publish t {}", "help", "roll 1"]


async def test_no_exception_leaves_handle_whatever_the_mesh_answers():
    for status in (400, 401, 403, 404, 429, 500, 503):
        for line in LINES:
            mesh = FakeMesh(fail=MeshError(status, "no"))
            reply = await bot().handle("U1", line, mesh)
            assert isinstance(reply, Reply), line
            # help still answers (without the services' commands), the rest refuse
            assert reply.ok == (line == "help"), (status, line, reply)


async def test_a_usage_error_is_a_reply_for_every_command_missing_its_words():
    for line in ("describe", "call", "call svc", "health", "logs", "config get",
                 "config set", "restart", "publish", "logs svc x"):
        mesh = FakeMesh()
        reply = await bot().handle("U1", line, mesh)
        assert not reply.ok and "Usage: `" in reply.text, line
        assert mesh.calls == [], line


async def test_a_digit_like_line_count_is_a_usage_reply():
    mesh = FakeMesh({"debug.logs": {"records": []}})
    reply = await bot().handle("U1", "logs svc ²", mesh)
    assert not reply.ok and "1..500" in reply.text


# --- replies -------------------------------------------------------------------------------

def test_a_short_body_is_shown_whole():
    r = Reply("head", "a\nb")
    assert r.body() == "a\nb"
    assert r.plain() == "head\n```\na\nb\n```"
    assert Reply("only").plain() == "only" and Reply("only").body() == ""


def test_body_is_cut_at_max_lines_with_a_note():
    code = "\n".join(f"line {i}" for i in range(MAX_LINES + 60))
    body = Reply("h", code).body().splitlines()
    assert body[:MAX_LINES] == [f"line {i}" for i in range(MAX_LINES)]
    assert len(body) == MAX_LINES + 1
    shown = "\n".join(body[:MAX_LINES])
    assert body[-1] == f"… 60 more lines ({len(code) - len(shown)} characters) not shown"


def test_body_is_cut_at_max_chars_on_a_line_boundary_with_a_note():
    code = "\n".join(str(i % 10) * 200 for i in range(30))  # 30 lines, 6029 characters
    body = Reply("h", code).body()
    shown, note = body.rsplit("\n", 1)
    assert len(shown) <= MAX_CHARS and code.startswith(shown + "\n")
    assert all(len(line) == 200 for line in shown.splitlines())  # no line cut in half
    n = len(shown.splitlines())
    assert note == f"… {30 - n} more lines ({len(code) - len(shown)} characters) not shown"


def test_one_long_line_is_cut_at_max_chars():
    body = Reply("h", "x" * 10_000).body()
    shown, note = body.split("\n")
    assert shown == "x" * MAX_CHARS
    assert f"({10_000 - MAX_CHARS} characters) not shown" in note


def test_a_body_shown_whole_has_no_note_even_with_a_trailing_newline():
    assert Reply("h", "a\nb\n").body() == "a\nb"


def test_blocks_stay_within_slacks_section_limit_for_huge_replies():
    huge = "\n".join("y" * 1000 for _ in range(1000))  # ~1 MB
    for r in (Reply("t" * 1_000_000, "x" * 1_000_000), Reply("t" * 1_000_000, huge),
              Reply("h", "\n".join(["short"] * 100_000))):
        blocks = r.blocks()
        assert len(blocks) == 2
        assert all(b["type"] == "section" and b["text"]["type"] == "mrkdwn" for b in blocks)
        assert all(len(b["text"]["text"]) <= 3000 for b in blocks)
        assert blocks[1]["text"]["text"].startswith("```")
        assert "not shown" in blocks[1]["text"]["text"]


def test_blocks_stay_within_the_limit_when_the_body_is_all_control_characters():
    for r in (Reply("h", "&<>" * 350_000), Reply("&" * 1_000_000)):
        assert all(len(b["text"]["text"]) <= 3000 for b in r.blocks())


def test_blocks_escape_mrkdwn_so_a_reply_cannot_mention_channel():
    r = Reply("<!channel> & <@U1>", "<!here> <!channel|x> a&b <https://x|y>")
    blocks = r.blocks()
    texts = [b["text"]["text"] for b in blocks]
    assert all("<" not in t and ">" not in t for t in texts)
    assert texts[0] == "&lt;!channel&gt; &amp; &lt;@U1&gt;"
    assert texts[1] == "```&lt;!here&gt; &lt;!channel|x&gt; a&amp;b &lt;https://x|y&gt;```"
    assert len(Reply("only").blocks()) == 1


def test_table_aligns_columns():
    out = table(("NAME", "N", "X"), [("a", 1, "p"), ("longer-name", 22, ""), ("b", 333, "q")])
    assert out.splitlines() == [
        "NAME         N    X",
        "a            1    p",
        "longer-name  22",
        "b            333  q",
    ]
    assert table(("A",), []) == "A"

"""A service's bot command (sdk/bot.py): Command.Exec is told the verified caller, never the
user a request's body names."""

from __future__ import annotations

from meshd_sdk import Service
from meshd_sdk.bot import CommandReply, CommandRequest, bot_command
from meshd_sdk.service import _CURRENT, CallInfo


def dice() -> Service:
    service = Service("dice")

    @bot_command(service, "roll", usage="roll [NdM]", help="roll dice")
    async def roll(req: CommandRequest) -> CommandReply:
        return CommandReply(text=f"{req.user or 'nobody'} rolled")

    return service


async def exec_as(caller: str | None, body_user: str) -> str:
    fn = dice().endpoints["Command.Exec"].fn
    token = _CURRENT.set(None if caller is None else
                         CallInfo("Command.Exec", {} if caller == "" else {"caller": caller}))
    try:
        reply = await fn(CommandRequest(args=["1d6"], user=body_user))
    finally:
        _CURRENT.reset(token)
    return reply.text


async def test_the_command_is_told_the_caller_the_daemon_verified():
    assert await exec_as("dev", "ops") == "dev rolled"
    assert await exec_as("service:deploys", "") == "service:deploys rolled"


async def test_a_caller_without_a_token_is_nobody_whatever_the_body_says():
    for caller in ("anonymous", "node:a", "", None):
        assert await exec_as(caller, "ops") == "nobody rolled", caller


def test_the_service_declares_its_command_and_both_endpoints():
    service = dice()
    assert service.metadata["bot.command"] == "roll"
    assert {"Command.Help", "Command.Exec"} <= set(service.endpoints)

"""A service for integration tests: `python testsvc.py NAME` next to a daemon."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import trio

from meshd_sdk import Service, current_call


@dataclass
class Text:
    text: str


@dataclass
class Seconds:
    seconds: float


# TESTSVC_META="team=payments,tier=web": the instance's metadata (its tags)
_META = dict(kv.split("=", 1) for kv in os.environ.get("TESTSVC_META", "").split(",") if kv)
service = Service(sys.argv[1] if len(sys.argv) > 1 else "testsvc", metadata=_META)


@service.handler("Test.Echo")
async def echo(req: Text) -> Text:
    return Text(req.text)


@service.handler("Test.Whoami")
async def whoami(req: Text) -> Text:
    return Text(f"{os.environ.get('MESHD_NODE_NAME', '?')}:{os.getpid()}")


@service.handler("Test.Meta")
async def meta(req: Text) -> dict[str, str]:
    info = current_call()
    assert info is not None
    return {"trace": info.trace_id, "caller": info.caller_node,
            "user": str(info.meta.get(req.text, ""))}


@service.handler("Test.Caller")
async def caller(req: Text) -> Text:
    info = current_call()
    return Text(info.caller if info else "")


@service.handler("Test.Relay")
async def relay(req: Text) -> Text:
    # call another service from inside a handler: it carries this service's identity
    from meshd_sdk import Client

    async with Client() as client:
        return Text((await client.call(req.text, "Test.Caller", {"text": ""}))["text"])


@service.handler("Test.Log")
async def log_line(req: Text) -> Text:
    logging.getLogger("testsvc").info("%s", req.text)  # shipped to the daemon (meshd logs)
    return Text(req.text)


@service.handler("Test.Boom")
async def boom(req: Text) -> Text:
    raise RuntimeError(f"boom: {req.text}")


@service.handler("Test.Sleep")
async def sleep(req: Seconds) -> Text:
    await trio.sleep(req.seconds)
    return Text("slept")


@service.handler("Test.Die")
async def die(req: Text) -> Text:
    os._exit(3)


@dataclass
class Count:
    n: int
    pad: int = 0


PRODUCED = {"count": 0}


@service.stream("Test.Count")
async def count(req: Count):  # server streaming: one request, n replies
    for i in range(req.n):
        PRODUCED["count"] = i + 1
        yield Text(str(i) + "." * req.pad if req.pad else str(i))


@service.handler("Test.Produced")
async def produced(req: Text) -> Count:
    return Count(PRODUCED["count"])


@service.stream("Test.Upper", request=Text, response=Text)
async def upper(stream):  # bidirectional: one reply per message, until the caller ends
    async for msg in stream:
        await stream.send(Text(msg.text.upper()))


if __name__ == "__main__":
    trio.run(service.run)

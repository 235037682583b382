"""A service for the namespace tests: `python nssvc.py NAME [NAMESPACE]` next to a daemon.

Registers in NAMESPACE if given, else in MESHD_NAMESPACE (the SDK's default), and answers
with the namespace it runs in, its MESHD_NAMESPACE and its node, so a test sees which of
several same-named services a call reached. Ns.Caller answers who the daemon says called it;
Ns.ForwardCaller asks another service's Ns.Caller (so a test sees which identity a service's
own outgoing calls carry).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from meshd_sdk import Client, Service, current_call


@dataclass
class Which:
    namespace: str
    env: str
    node: str


@dataclass
class Caller:
    caller: str


@dataclass
class Target:
    service: str
    namespace: str = ""  # "" = the Client's default (this service's namespace)


service = Service(sys.argv[1] if len(sys.argv) > 1 else "nssvc",
                  namespace=sys.argv[2] if len(sys.argv) > 2 else None)


def which() -> Which:
    return Which(service.namespace, os.environ.get("MESHD_NAMESPACE", ""),
                 os.environ.get("MESHD_NODE_NAME", "?"))


@service.handler("Ns.Which")
async def who(req: dict[str, str]) -> Which:
    return which()


@service.stream("Ns.Stream")
async def stream(req: dict[str, str]) -> AsyncIterator[Which]:
    for _ in range(2):
        yield which()


@service.handler("Ns.Forward")
async def forward(req: Target) -> Which:
    # an outgoing call from a handler: in this service's namespace unless it names another
    async with Client() as client:
        return await client.call(req.service, "Ns.Which", {}, response=Which,
                                 namespace=req.namespace or None)


@service.handler("Ns.Caller")
async def caller(req: dict[str, str]) -> Caller:
    info = current_call()
    return Caller(info.caller if info else "")


@service.handler("Ns.ForwardCaller")
async def forward_caller(req: Target) -> Caller:
    async with Client() as client:
        return await client.call(req.service, "Ns.Caller", {}, response=Caller,
                                 namespace=req.namespace or None)


if __name__ == "__main__":
    trio.run(service.run)

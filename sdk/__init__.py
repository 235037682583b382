"""The meshd SDK: write services and call them through the local daemon.

    service = Service("greeter")

    @service.handler("Greeter.Hello")
    async def hello(req: HelloRequest) -> HelloResponse: ...

    trio.run(service.run)

    async with Client() as client:
        reply = await client.call("greeter", "Greeter.Hello", {"name": "Ada"})
"""

from meshd.errors import MeshError

from .auth import Auth
from .client import Client
from .schema import SchemaError, describe
from .service import CallInfo, Service, current_call
from .store import Config, Store

__all__ = ["Auth", "CallInfo", "Client", "Config", "MeshError", "SchemaError", "Service", "Store",
           "current_call", "describe"]

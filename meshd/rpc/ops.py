"""Control operations of RPC: one call, and a bidirectional stream (a session).

Rules:
- Both act with the caller's token (none: the local operator acts as this node); the rules
  are checked where the instance runs, as for any in-cluster caller ("checked").
- A call's timeout defaults to rpc.default_timeout; metadata must be a map.
- Both take `namespace` ("default" when absent; an invalid name is a 400): only instances
  of that namespace are candidates.
- On a multiplexed control connection a call goes by RpcService.call_fast (no task per
  call) when its picked instance is ready here or its node's call channel takes the
  request at once (rpc/remote.py); anything else, and anything
  the fast path does not take (bad input, a refusal, no ready instance), runs the ordinary
  way, which gives the same answers.
"""

from __future__ import annotations

from typing import Any

from meshd import namespaces
from meshd.errors import MeshError, bad_request
from meshd.ops import REQUEST_TOKEN, Finish, Op

from .service import RpcService
from .streams import StreamService


class RpcOps:
    def __init__(self, rpc: RpcService, streams: StreamService, default_timeout: float) -> None:
        self.rpc = rpc
        self.streams = streams
        self.default_timeout = default_timeout

    def ops(self) -> list[Op]:
        return [Op("rpc.call", self.call, "checked", fast=self.fast, anonymous=True),
                Op("rpc.stream", self.streams.serve_session, "checked", "session")]

    async def call(self, args: dict[str, Any]) -> Any:
        service, endpoint = args.get("service"), args.get("endpoint")
        if not isinstance(service, str) or not isinstance(endpoint, str):
            raise bad_request("call needs a service and an endpoint")
        timeout = args.get("timeout") or self.default_timeout
        meta = args.get("meta") or {}
        if not isinstance(meta, dict):
            raise bad_request("meta must be a map")
        ns = namespaces.check(args.get("namespace"))
        version = args.get("version") or ""
        if not isinstance(version, str) or not (version == "" or version.isdigit()):
            raise bad_request("version must be a number (a prefix: 1 reaches 1.x)")
        return await self.rpc.call(service, endpoint, args.get("body"), timeout, meta,
                                   args.get("selector"), token=REQUEST_TOKEN.get(),
                                   namespace=ns, version=version)

    def fast(self, args: dict[str, Any], token: str | None, finish: Finish, size: int) -> bool:
        service, endpoint = args.get("service"), args.get("endpoint")
        meta = args.get("meta") or {}
        if not isinstance(service, str) or not isinstance(endpoint, str) \
                or not isinstance(meta, dict) or args.get("version"):
            return False
        try:
            ns = namespaces.check(args.get("namespace"))
        except MeshError:
            return False
        return self.rpc.call_fast(service, endpoint, args.get("body"),
                                  args.get("timeout") or self.default_timeout, meta,
                                  args.get("selector"), token, ns, finish, size)

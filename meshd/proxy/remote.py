"""The node's control API from elsewhere: the same operations as the local control socket,
carried over a WebSocket to a node's proxy endpoint (a remote environment).

Rules:
- Same interface as control.ControlClient (call, stream, session, aclose); every failure is
  a MeshError with one line (Via says why a connection cannot be made).
- The token given is sent with every request; without one only public operations (login,
  refresh) are served. It is never a token found on this machine's data dir: a remote
  environment acts as the user, never as a local node.
- One WebSocket per client, opened on first use and closed by aclose(). Its tasks live in
  the nursery given (the SDK client's, so pooled connections may be used from any task);
  without one, in the task that first uses the client, which must also close it (the CLI).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import trio

from meshd import versions
from meshd.control import ControlClient
from meshd.errors import MeshError

from .via import CONNECT_TIMEOUT, Via
from .wsframing import WsFraming

MAX_REPLY = 64 << 20  # a reply or event from the proxy (member and key listings can be big)


class RemoteControlClient(ControlClient):
    def __init__(self, via: Via, token: str | None = None,
                 nursery: trio.Nursery | None = None) -> None:
        super().__init__(Path(via.url), token)
        self.via = via
        self.nursery = nursery
        self._stack: contextlib.AsyncExitStack | None = None
        self._done: trio.Event | None = None

    async def _hold(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The connection, kept open by a task of the owner's nursery until aclose()."""
        done = trio.Event()
        async with self.via.connect(MAX_REPLY) as ws:
            framed = await _hello(ws)
            self._done = done
            task_status.started(framed)
            await done.wait()

    async def _connect(self) -> Any:
        if self._framed is None and self.nursery is not None:
            self._framed = await self.nursery.start(self._hold)
        if self._framed is None:
            stack = contextlib.AsyncExitStack()
            try:
                ws = await stack.enter_async_context(self.via.connect(MAX_REPLY))
            except BaseException:
                await stack.aclose()
                raise
            try:
                framed = await _hello(ws)
            except BaseException:
                await stack.aclose()
                raise
            self._stack = stack
            self._framed = framed  # type: ignore[assignment]
        return self._framed

    async def aclose(self) -> None:
        stack, self._stack, self._framed = self._stack, None, None
        done, self._done = self._done, None
        if done is not None:
            done.set()
        if stack is not None:
            await stack.aclose()


async def _hello(ws: Any) -> WsFraming:
    """Open the control session: the proxy answers {"ok": true, "node"} (an older or
    hostile endpoint: a clear error, not a hang)."""
    framed = WsFraming(ws, MAX_REPLY)
    await framed.write({"op": "control", "v": versions.mine("proxy")})
    with trio.move_on_after(CONNECT_TIMEOUT) as scope:
        try:
            reply = await framed.read()
        except EOFError:
            reply = None
    if scope.cancelled_caught:
        raise MeshError(503, f"no answer from the proxy at {ws_where(ws)} within "
                             f"{CONNECT_TIMEOUT:g} s", id="meshd.proxy.via")
    if isinstance(reply, dict) and reply.get("ok") is False:
        raise MeshError.from_dict(reply.get("error"))
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise MeshError(503, f"the proxy at {ws_where(ws)} does not serve control sessions "
                             "(an older meshd?)", id="meshd.proxy.via")
    return framed


def ws_where(ws: Any) -> str:
    remote = getattr(ws, "remote", None)
    return f"{getattr(remote, 'address', '?')}:{getattr(remote, 'port', '?')}"

"""One table of control operations, served on the control socket and through the proxy.

Theory of operation: every component owns its operations and hands them to the node as a
list of `Op`; node.py adds them all to one `OpTable` and nothing more. The table is served by
two transports that speak the same messages (a CBOR map per request, reply or event):
- the local control socket (control.py): the caller is the node's operator; a token, when
  it sends one, is the identity it acts with;
- the proxy endpoint (proxy/edge.py, op "control"): a remote caller in an environment; it
  always acts with its own token, never as the node.
`serve_request` runs one request either way, so an operation written once behaves the same
locally and remotely and is checked in one place.

Rules:
- An op is a `call` (one request, one reply), a `stream` (one request, then events until
  either side closes) or a `session` (the connection becomes a two-way conversation: a
  service registration, an RPC stream, a tunnel listener).
- `access` says who may run it:
  - "operator": the local operator only (the node's own settings, keyring, invite, join,
    leave). A remote caller gets 403: being a cluster user never makes one a node's operator.
  - "checked": the handler checks the caller itself against the rules (the store, config,
    RPC, auth, tunnels: their resource depends on the request).
  - "public": anyone, even a remote caller without a token (log in, refresh a token, revoke
    a token one holds: the request itself carries the proof).
  - a `resource(args)` function (`mesh_resource`): the table checks a remote caller's token
    against the rules for that resource before the handler runs (reads of the mesh). Where:
    - a read of one namespace's state (services, store listings: `per_namespace`) in the
      namespace the request names ("default" when none);
    - a read of the cluster's own state (status, members, routes, the graph, ping, tunnels,
      the list of namespaces) in "default", whatever namespace the request names: it is
      nobody's namespace, so a namespace's own rules (an admin of team-a may do everything
      in team-a) never open it.
    An invalid namespace name is a 400 either way. The local operator reads them without a
    token, as before.
- A remote request without a token is refused with 401 before anything else (but for
  "public" ops); a token that
  does not verify, 401; one the rules refuse, 403 naming the rule.
- A stream keeps reading its connection while it runs: the client closing it (or sending
  anything unreadable) cancels the stream at once, and the handler's `finally` lets go of
  what it watched, so a hung-up watcher holds nothing until the next event would be written.
  Handlers release what they subscribe to in `finally` (or a `with` block).
- Streams and sessions held at once are capped per token where the transport asks for it
  (`StreamSlots`: the proxy, limits.max_remote_streams): one more is a 429 before anything
  runs. The local operator is not capped.
- Every failure inside a handler becomes a structured error reply; a malformed request gets
  a 400 and the connection stays usable. Nothing a caller sends can crash the node.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio

from . import namespaces, versions
from .errors import MeshError, bad_request, not_found, too_many

log = logging.getLogger("meshd.ops")

Kind = Literal["call", "stream", "session"]
Resource = tuple[str, str, str]
Emit = Callable[[Any], Awaitable[None]]
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any], Emit], Awaitable[None]]

# The token the current request carries (None: the local operator, no token).
REQUEST_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshd_request_token", default=None)
# Who the transport says the caller is ("uid:1000" on the control socket, from the kernel's
# peer credentials; "remote:ADDRESS" through the proxy): rate limits key on it, never on
# anything the client sends.
REQUEST_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "meshd_request_source", default="local")
# The process group of the process at the other end of the control socket (from the
# kernel's peer credentials; 0 when unknown or remote): the runtime knows its managed
# processes' registrations by it.
REQUEST_PGID: contextvars.ContextVar[int] = contextvars.ContextVar("meshd_request_pgid",
                                                                   default=0)
# Whether the current request came from outside the node (a remote environment through the
# proxy, or the API gateway): it acts with its token, or as nobody, never as this node.
REQUEST_REMOTE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "meshd_request_remote", default=False)


def acting_node(node: str) -> str | None:
    """The node the current request may act as when it has no token: `node` for a local
    caller (the operator, a service on this node), None (anonymous, the public scope) for a
    remote one."""
    return None if REQUEST_REMOTE.get() else node


class RemoteRequest:
    """Runs a block as a remote request of `token` (None: nobody, the public scope) from
    `source`: how the API gateway and the web dashboard hand a request to the op table."""

    def __init__(self, token: str | None, source: str) -> None:
        self.values = (token, source)
        self.resets: list[Any] = []

    def __enter__(self) -> RemoteRequest:
        token, source = self.values
        self.resets = [REQUEST_TOKEN.set(token), REQUEST_REMOTE.set(True),
                       REQUEST_SOURCE.set(source)]
        return self

    def __exit__(self, *exc: object) -> None:
        for var, reset in zip((REQUEST_TOKEN, REQUEST_REMOTE, REQUEST_SOURCE), self.resets,
                              strict=True):
            var.reset(reset)


class Framing(Protocol):
    """One side of a connection that carries whole CBOR values (control socket frames, or
    WebSocket messages)."""

    async def read(self, limit: int = ...) -> Any: ...

    async def write(self, value: Any) -> None: ...

    async def aclose(self) -> None: ...


class Conn:
    """A connection turned into a two-way session (a service process's link)."""

    def __init__(self, framed: Framing, rid: Any) -> None:
        self.framed = framed
        self.rid = rid
        # a framing that takes writes from many tasks at once (control.Framed) needs no lock
        self._lock = None if getattr(framed, "concurrent_writes", False) else trio.Lock()

    async def reply(self, result: Any) -> None:
        await self.send({"id": self.rid, "ok": True, "result": result})

    async def send(self, item: Any) -> None:
        if self._lock is None:
            await self.framed.write(item)
            return
        async with self._lock:
            await self.framed.write(item)

    def send_nowait(self, item: Any) -> bool:
        """Queue `item` without waiting, where the framing has a flusher running (control
        connections: Framed.run_flusher); False when it has not (then use send)."""
        if not getattr(self.framed, "flushing", False):
            return False
        self.framed.write_nowait(item)  # type: ignore[attr-defined]
        return True

    async def receive(self) -> Any:
        """The next frame; EOFError when the other side is gone."""
        try:
            return await self.framed.read()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EOFError from None

    async def aclose(self) -> None:
        await self.framed.aclose()


SessionHandler = Callable[[dict[str, Any], Conn], Awaitable[None]]
Access = Literal["operator", "checked", "public"] | Callable[[dict[str, Any]], Resource]


# A call's fast path: (args, token, finish, size) -> whether it took the call; if it did,
# it calls finish(result, None) or finish(None, error) exactly once, later (a local RPC
# answered when the service replies, without a task). `size`: the request's encoded bytes.
# If it did not, the ordinary handler runs (and says what is wrong, if anything is).
Finish = Callable[[Any, "MeshError | None"], None]
Fast = Callable[[dict[str, Any], "str | None", Finish, int], bool]


@dataclass(frozen=True)
class Op:
    name: str
    handler: Callable[..., Awaitable[Any]]
    access: Access
    kind: Kind = "call"
    fast: Fast | None = None  # only on multiplexed control connections (control.mux)
    # a "checked" op whose handler checks a remote caller without a token as anonymous
    # (acting_node), so the public scope's rules decide; others refuse such a caller (401)
    anonymous: bool = False


def calls(access: Access, table: dict[str, Handler]) -> list[Op]:
    """Ops of one access from a name -> handler map (how components list their calls)."""
    return [Op(name, fn, access) for name, fn in table.items()]


@dataclass(frozen=True)
class MeshResource:
    """The resource of a read of the mesh's own state ("mesh:members:", ...), and the
    namespace whose rules decide: the one the request names (`per_namespace`), else
    "default" (the cluster's state)."""

    what: str
    per_namespace: bool = False

    def __call__(self, args: dict[str, Any]) -> Resource:
        return ("mesh", self.what, "")

    def namespace(self, args: dict[str, Any]) -> str:
        named = namespaces.check(args.get("namespace"))  # a bad name is a 400 either way
        return named if self.per_namespace else namespaces.DEFAULT


def mesh_resource(what: str, per_namespace: bool = False) -> MeshResource:
    """The access of a read of the mesh: of one namespace's state (`per_namespace`), or of
    the cluster's, checked in "default"."""
    return MeshResource(what, per_namespace)


class Authorizer(Protocol):
    def check(self, token: str | None, node: str | None, resource: Resource,
              namespace: str = ...) -> Any: ...

    def identify(self, token: str | None, node: str | None) -> Any: ...


class OpTable:
    """Every control operation of the node, by name."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}
        self.auth: Authorizer | None = None  # set by the node once auth exists
        self.node = ""

    def add(self, ops: Iterable[Op]) -> None:
        for op in ops:
            if op.name in self._ops:
                raise ValueError(f"control operation {op.name!r} registered twice")
            self._ops[op.name] = op

    def get(self, name: str) -> Op | None:
        return self._ops.get(name)

    def names(self, kinds: tuple[Kind, ...] = ("call", "stream")) -> list[str]:
        return sorted(n for n, op in self._ops.items() if op.kind in kinds)

    def __len__(self) -> int:
        return len(self._ops)

    def admit(self, op: Op, args: dict[str, Any]) -> None:
        """Whether the caller may run `op` at all (the handler may check more)."""
        if not REQUEST_REMOTE.get() or op.access == "public":
            return  # the local operator: handlers check a token it sends
        token = REQUEST_TOKEN.get()
        if not token and (op.access == "operator"
                          or (op.access == "checked" and not op.anonymous)):
            raise no_token()
        if op.access == "operator":
            raise MeshError(403, f"{op.name} is for the node's operator: run it on the node "
                                 "(its control socket), not through an environment",
                            id="meshd.auth")
        if self.auth is None:
            raise MeshError(503, "auth is not ready on this node", id="meshd.auth")
        if op.access == "checked":
            if token:
                self.auth.identify(token, None)  # a bad token is a 401 before anything runs
            return
        ns = op.access.namespace(args) if isinstance(op.access, MeshResource) \
            else namespaces.check(args.get("namespace"))
        try:  # without a token: anonymous, what the public scope's rules grant
            self.auth.check(token or None, None, op.access(args), namespace=ns)
        except MeshError as exc:
            if not token and exc.status == 401:
                raise no_token() from None
            raise


def no_token() -> MeshError:
    return MeshError(401, "a remote environment acts with a token: log in with "
                          "`meshd auth login --env NAME` or set MESHD_TOKEN", id="meshd.auth")


class StreamSlots:
    """Streams and sessions each caller (its token; without one, its source) holds open at
    once, at most `cap`; `{name}_streams` in `stats` counts those open now and
    `{name}_streams_refused` the ones refused (429)."""

    def __init__(self, cap: int, stats: dict[str, int], name: str) -> None:
        self.cap = cap
        self.stats = stats
        self.open_key, self.refused_key = f"{name}_streams", f"{name}_streams_refused"
        stats.setdefault(self.open_key, 0)
        stats.setdefault(self.refused_key, 0)
        self.held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot of the current request's caller, for the block; 429 if it has none."""
        key = REQUEST_TOKEN.get() or REQUEST_SOURCE.get()
        if self.held.get(key, 0) >= self.cap:
            self.stats[self.refused_key] += 1
            raise too_many(f"this token already holds {self.cap} streams and sessions "
                           "(watches, RPC streams) through this node's proxy "
                           "(limits.max_remote_streams): close one first")
        self.held[key] = self.held.get(key, 0) + 1
        self.stats[self.open_key] += 1
        try:
            yield
        finally:
            self.stats[self.open_key] -= 1
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]


async def _until_hangup(framed: Framing, run: Callable[[], Awaitable[None]]) -> None:
    """`run()`, cancelled as soon as the other side of `framed` closes (or sends something
    unreadable): a stream's client says nothing more once it asked."""
    async def hangup(scope: trio.CancelScope) -> None:
        with contextlib.suppress(EOFError, MeshError, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            while True:
                await framed.read()  # nothing a client sends during a stream means anything
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hangup, nursery.cancel_scope)
            await run()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # strict nurseries wrap the handler's own failure
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def serve_request(table: OpTable, framed: Framing, req: Any,
                        slots: StreamSlots | None = None) -> bool:
    """Run one request from `framed`; whether the connection can carry another (a stream or
    session keeps it to the end). `slots` caps the streams and sessions of one caller."""
    rid = req.get("id") if isinstance(req, dict) else None
    try:
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise bad_request("request must be a map with an op")
        args = req.get("args") or {}
        if not isinstance(args, dict):
            raise bad_request("args must be a map")
        if "v" in req:  # a client naming the control protocol versions it speaks
            versions.offered("control", req["v"])
        token = req.get("token")
        REQUEST_TOKEN.set(token if isinstance(token, str) and token else None)
        if req.get("remote") is True:  # a local client acting for someone outside (the
            REQUEST_REMOTE.set(True)  # bot): as the gateway does; it only loses rights
        op = table.get(req["op"])
        if op is None:
            raise not_found(f"unknown operation {req['op'][:64]!r}; known: "
                            f"{', '.join(table.names())}")
        table.admit(op, args)
        if op.kind == "call":
            result = await op.handler(args)
            await framed.write({"id": rid, "ok": True, "result": result})
            return True
        with slots.hold() if slots is not None else contextlib.nullcontext():
            if op.kind == "session":
                await op.handler(args, Conn(framed, rid))
                return False

            async def emit(item: Any) -> None:
                await framed.write({"id": rid, "event": item})
            await framed.write({"id": rid, "ok": True, "result": "streaming"})
            await _until_hangup(framed, lambda: op.handler(args, emit))
            return False
    except MeshError as exc:
        reply = {"id": rid, "ok": False, "error": exc.to_dict()}
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        return False
    except Exception as exc:
        log.exception("control operation failed")
        reply = {"id": rid, "ok": False,
                 "error": MeshError(500, f"{type(exc).__name__}: {exc}").to_dict()}
    try:
        await framed.write(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True

"""Link channel "auth": nodes without a current issuer key ask a signer, with proof.

Theory of operation
-------------------
Only a node holding an issuer key signs tokens and writes auth records. Any other node
sends its request to a live signer (newest key first, the next one if it does not answer)
and the signer decides from what the request proves, never from what it claims:

    op        carries                         the signer checks
    service   service name, namespace         that service is registered in that namespace
                                              on the asking node (the node its link
                                              proved); the token has sub service:NAME,
                                              scope "service" only, and that namespace
    login     account id, secret, namespace   the secret of that namespace's account
                                              (rate-limited per account and per asking
                                              node), like a local login
    refresh   refresh token                   the refresh token, the account's state now
    revoke    the token to revoke             that the token is signed by a trusted key
                                              (holding a token is the right to revoke it)
    admin     op name, args, admin proof      an admin token, or a signature by an issuer
                                              key the asking node holds (retired keys too);
                                              the op checks that admin may administer the
                                              namespace its args name
A request without "namespace" is of "default" (what nodes from before namespaces send).
There is no "sign these claims": a member can get from a signer only what a node of its
own would be entitled to.

Rules:
- Requests and replies are bounded CBOR maps (meshd.wire). A reply is {"ok": true,
  "result"} or {"ok": false, "error": {...}} (a MeshError map).
- One request per channel; the signer's failure on one request is that request's error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import cbor2
import trio

from meshd import namespaces, wire
from meshd.errors import MeshError, bad_request
from meshd.identity import node_id_from_public
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from . import records

if TYPE_CHECKING:
    from .service import AuthService, Principal

log = logging.getLogger("meshd.auth")
CHANNEL = "auth"
ASK_TIMEOUT = 8.0
# an admin operation: op(args, principal, node it runs for) -> result
AdminOp = Callable[[dict[str, Any], "Principal", str], Awaitable[Any]]


def proof_payload(request: dict[str, Any]) -> bytes:
    body = {k: v for k, v in request.items() if k != "proof"}
    return cbor2.dumps(["meshd-auth-request-v1", body], canonical=True)


class SignerChannel:
    def __init__(self, auth: AuthService, links: LinkManager) -> None:
        self.auth = auth
        self.links = links
        # admin operations a signer runs for a proven admin: name -> op(args, principal)
        self.admin_ops: dict[str, AdminOp] = {}
        links.handlers[CHANNEL] = self._serve

    # --- asking ----------------------------------------------------------------------------

    def _prove(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sign an admin request with an issuer key held here, if any (retired ones too)."""
        held = self.auth._held_keys()
        if held:
            info, pem = held[0]
            private = records.load_private(pem)
            request = {**request, "proof": {"kid": info.kid,
                                            "sig": private.sign(proof_payload(request))}}
        return request

    async def ask(self, request: dict[str, Any], to: str | None = None) -> Any:
        """Send a request to the first live signer that answers (or to node `to` only);
        its result, or its MeshError; 503 when no signer can be reached."""
        if request.get("op") == "admin":
            request = self._prove(request)
        members = {m.name: m.addr for m in self.auth.store.core.member_list()
                   if m.state == 0 and m.name != self.auth.node}
        signers = [s for s in ([to] if to else self.auth.signers()) if s in members]
        errors = []
        for signer in signers:
            try:
                with trio.fail_after(ASK_TIMEOUT):
                    async with await self.links.open_channel(members[signer], CHANNEL) as ch:
                        await ch.send(wire.dumps(request))
                        reply = wire.loads(await ch.receive(), max_depth=16)
            except (LinkError, ChannelClosed, trio.TooSlowError, wire.WireError) as exc:
                errors.append(f"{signer}: {exc or 'no answer'}")
                continue
            if not isinstance(reply, dict):
                errors.append(f"{signer}: malformed reply")
                continue
            if reply.get("ok"):
                return reply.get("result")
            raise MeshError.from_dict(reply.get("error"))
        why = "; ".join(errors) if errors else "no live node holds a current issuer key"
        raise MeshError(503, f"no signer reachable for this auth request ({why})",
                        id="meshd.auth")

    # --- serving ---------------------------------------------------------------------------

    async def _serve(self, ch: Channel) -> None:
        try:
            request = wire.loads(await ch.receive(), max_depth=16, max_bytes=1 << 20)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise bad_request("an auth request is a map with an op", id="meshd.auth")
            result = await self._answer(request, ch.peer_node, ch.peer_public)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except wire.WireError as exc:
            reply = {"ok": False, "error": bad_request(str(exc), id="meshd.auth").to_dict()}
        except MeshError as exc:
            reply = {"ok": False, "error": exc.to_dict()}
        await ch.send(wire.dumps(reply))

    async def _answer(self, request: dict[str, Any], peer: str | None,
                      peer_key: bytes = b"") -> Any:
        auth = self.auth
        if peer is None:
            raise MeshError(403, "auth requests come from members only", id="meshd.auth")
        op = request["op"]
        if op == "service":
            from .service import wait_for_service

            service = _text(request, "service")
            ns = namespaces.check(request.get("namespace"))
            if not await wait_for_service(auth, service, peer, ns):
                where = "" if ns == namespaces.DEFAULT else f" in namespace {ns!r}"
                raise MeshError(403, f"service {service!r} is not registered{where} on node "
                                     f"{peer}", id="meshd.auth")
            return {"token": await auth.service_token_for(service, peer,
                                                          node_id_from_public(peer_key), ns)}
        if op == "login":
            # limited per account and per asking node (what the asker says of its own
            # caller is not ours to trust)
            ns = namespaces.check(request.get("namespace"))
            scopes = auth.check_login(_text(request, "id"), _text(request, "secret"),
                                      f"node:{peer}", per_node=True, namespace=ns)
            return await auth.tokens_for(request["id"], scopes, ns)
        if op == "refresh":
            return await auth.tokens_for(*auth.check_refresh(_text(request, "refresh_token")))
        if op == "revoke":
            token = _text(request, "token")
            if not auth.signed_here(token):
                raise MeshError(403, "only a token this cluster signed can be revoked this "
                                     "way", id="meshd.auth")
            return await auth.revoke(token)
        if op == "admin":
            name = _text(request, "name")
            fn = self.admin_ops.get(name)
            args = request.get("args")
            if fn is None or not isinstance(args, dict):
                raise bad_request(f"no admin operation {name!r}", id="meshd.auth")
            who = self._admin_proof(request, peer)
            log.info("admin operation %s for %s from node %s", name, who.id, peer)
            return await fn(args, who, peer)
        raise bad_request(f"unknown auth request {op!r}", id="meshd.auth")

    def _admin_proof(self, request: dict[str, Any], peer: str) -> Principal:
        from .service import Principal

        token = request.get("token")
        if isinstance(token, str) and token:
            who = self.auth.admin_token(token)
            assert who is not None
            return who
        proof = request.get("proof")
        if isinstance(proof, dict) and isinstance(proof.get("kid"), str) \
                and isinstance(proof.get("sig"), bytes):
            info = self.auth._trusted().usable(proof["kid"])
            if info is not None:
                try:
                    info.public.verify(proof["sig"], proof_payload(request))
                except Exception:  # InvalidSignature
                    pass
                else:
                    return Principal(f"node:{peer}", ["admin"], "key")
        raise MeshError(403, "admin operations need an admin token (--token) or a node "
                             "holding an issuer key", id="meshd.auth")


def _text(request: dict[str, Any], key: str) -> str:
    v = request.get(key)
    if not isinstance(v, str) or not v or len(v) > 16384:
        raise bad_request(f"{key} is required", id="meshd.auth")
    return v

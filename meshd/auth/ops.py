"""Control operations of auth and node revocation, served on the control socket and to
remote environments.

Rules:
- Reads of auth state (accounts, rules, keys, revocations) are open to the local operator
  of any node (it holds the replicated state on disk anyway) and to admin tokens.
- Writes (accounts, rules, tokens for others, issuer keys, node revocations) need an admin:
  an admin token, or the local operator of a node holding an issuer key. The local
  operator of any other node is a member's operator: it acts as a node, never as admin.
  Rotating issuer keys makes a private key on the node it runs on, so it is also the
  operator's (the control socket, with an admin token where the node holds no key): never
  through a remote environment.
- A write that needs an issuer key this node does not hold goes to a signer
  (remote.py, "admin"), with the admin token or this node's key as proof; the signer runs
  the same operation from this table. Revoking issuer keys (also those of a revoked node)
  goes to the node holding the root key: revocation is the root's word.
- Anyone may revoke a token they hold (the token proves it); login and refresh work on any
  node (a signer checks the secret or the refresh token).
- Login's rate-limit source comes from the transport (control.REQUEST_SOURCE: the unix
  user on the control socket), never from the request.
- Namespaces: every op takes `namespace` ("default" when absent; an invalid name is a 400).
  Login issues a token of that namespace's account; accounts, rules and tokens are listed,
  created and deleted in it. An admin token administers its own namespace, and an admin of
  default (or the local operator of a node holding an issuer key) every namespace: a team-a
  admin acting in team-b is a 403 naming why. The check runs where the op runs, so also on
  a signer answering for another node. Issuer keys and node revocations are the cluster's:
  only admins of default change them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from meshd import namespaces
from meshd.errors import MeshError, bad_request, not_found
from meshd.ops import REQUEST_SOURCE, REQUEST_TOKEN, Op, calls

from .service import DEFAULT, EVERY, AuthService, NoIssuerKey, Principal

log = logging.getLogger("meshd.auth")
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Members = Callable[[], list[dict[str, Any]]]


def _text(args: dict[str, Any], key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v:
        raise bad_request(f"{key} is required")
    return v


class AuthOps:
    def __init__(self, auth: AuthService, node: str, members: Members) -> None:
        self.auth = auth
        self.node = node
        self.members = members  # rows of `meshd members` (name, id, ...)
        auth.remote.admin_ops.update({
            "accounts.create": self._accounts_create, "accounts.delete": self._accounts_delete,
            "rules.create": self._rules_create, "rules.delete": self._rules_delete,
            "token.create": self._token_create, "keys.endorse": self._keys_endorse,
            "keys.revoke": self._keys_revoke, "nodes.revoke": self._nodes_revoke})

    def ops(self) -> list[Op]:
        """Login, refresh and revoking a token one holds are open to anyone (the request is
        its own proof); bootstrap and rotating issuer keys (a new private key in this node's
        data dir) are the operator's; the rest check the caller's token themselves (an
        admin, or the local operator of a node holding an issuer key)."""
        return [*calls("public", {"auth.login": self.login, "auth.refresh": self.refresh,
                                  "auth.token.revoke": self.token_revoke}),
                *calls("operator", {"auth.bootstrap": self.bootstrap,
                                    "auth.keys.rotate": self.keys_rotate}),
                *calls("checked", self._checked())]

    def _checked(self) -> dict[str, Handler]:
        a = self.auth
        return {
            "auth.whoami": self.whoami,
            "auth.accounts.list": self._reader(lambda ns: a.accounts(ns)),
            "auth.rules.list": self._reader(lambda ns: a.list_rules(ns)),
            "auth.keys.list": self._reader(lambda ns: a.list_keys(), cluster=True),
            "nodes.revocations": self._reader(lambda ns: a.revocations(), cluster=True),
            "auth.accounts.create": self._writer("accounts.create", self._accounts_create),
            "auth.accounts.delete": self._writer("accounts.delete", self._accounts_delete),
            "auth.rules.create": self._writer("rules.create", self._rules_create),
            "auth.rules.delete": self._writer("rules.delete", self._rules_delete),
            "auth.token.create": self._writer("token.create", self._token_create),
            "auth.keys.revoke": self._writer("keys.revoke", self._keys_revoke, cluster=True),
            "nodes.revoke": self.nodes_revoke,
        }

    # --- who may do what -------------------------------------------------------------------

    def require_admin(self, namespace: str = DEFAULT) -> Principal:
        """The admin behind this control request, one that administers `namespace`; or
        401/403."""
        who = self.auth.admin_token(REQUEST_TOKEN.get(), namespace)
        if who is not None:
            return who
        if self.auth.holds_key():
            return Principal(f"node:{self.node}", ["admin"], "node")
        raise MeshError(403, f"node {self.node} holds no issuer key: cluster-wide auth "
                             "changes need an admin token (--token or MESHD_TOKEN)",
                        id="meshd.auth")

    def _reader(self, fn: Callable[[str], Any], cluster: bool = False) -> Handler:
        """A read: the local operator, or an admin token (of the namespace read, or any
        admin for the cluster's own state: keys and revocations)."""
        async def op(args: dict[str, Any]) -> Any:
            ns = namespaces.check(args.get("namespace"))
            token = REQUEST_TOKEN.get()
            if token:
                self.auth.admin_token(token, None if cluster else ns)
            return fn(ns)
        return op

    def _writer(self, name: str, fn: Callable[[dict[str, Any], Principal, str],
                                              Awaitable[Any]],
                cluster: bool = False) -> Handler:
        """A write by an admin of the namespace it names (of default: `cluster`), done here
        or by a signer (which checks the admin again)."""
        async def op(args: dict[str, Any]) -> Any:
            who = self.require_admin(DEFAULT if cluster else
                                     namespaces.check(args.get("namespace")))
            try:
                return await fn(args, who, self.node)
            except NoIssuerKey as exc:  # a signer (the root's holder if it must be) does it
                return await self.auth.remote.ask({"op": "admin", "name": name, "args": args,
                                                   "token": REQUEST_TOKEN.get()},
                                                  to=exc.holder)
        return op

    # --- open to everyone --------------------------------------------------------------------

    async def login(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        return await self.auth.login(_text(args, "id"), _text(args, "secret"),
                                     REQUEST_SOURCE.get(), ns)

    async def refresh(self, args: dict[str, Any]) -> Any:
        return await self.auth.refresh(_text(args, "refresh_token"))

    async def whoami(self, args: dict[str, Any]) -> Any:
        """Who the daemon takes the caller for; "namespace" is its token's (a node's: the
        namespace asked about, as it acts in every one)."""
        ns = namespaces.check(args.get("namespace"))
        row = self.auth.identify(REQUEST_TOKEN.get(), self.node).to_dict()
        if row["namespace"] == EVERY:
            row["namespace"] = ns
        return row

    async def token_revoke(self, args: dict[str, Any]) -> Any:
        """Revoke a token: whoever holds it may (the token is the proof)."""
        token = _text(args, "token")
        self.auth.revocation_of(token)  # 400 for what is not a token
        try:
            return await self.auth.revoke(token)
        except NoIssuerKey:
            return await self.auth.remote.ask({"op": "revoke", "token": token})

    # --- admin ---------------------------------------------------------------------------------

    async def bootstrap(self, args: dict[str, Any]) -> Any:
        if REQUEST_TOKEN.get():
            self.require_admin()
        return await self.auth.bootstrap()

    def _namespace(self, args: dict[str, Any], who: Principal) -> str:
        """The namespace an admin op acts in, which `who` must administer (checked again
        here: on a signer, `who` is what the asking node's request proved)."""
        ns = namespaces.check(args.get("namespace"))
        self.auth.may_administer(who, ns)
        return ns

    async def _accounts_create(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        ns = self._namespace(args, who)
        scopes = args.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
            raise bad_request("scopes must be a list of text")
        return await self.auth.create_account(_text(args, "id"), _text(args, "secret"),
                                              scopes, str(args.get("type") or "user"),
                                              namespace=ns)

    async def _accounts_delete(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        ns = self._namespace(args, who)
        await self.auth.delete_account(_text(args, "id"), ns)
        return {"deleted": args["id"], "namespace": ns}

    async def _rules_create(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        ns = self._namespace(args, who)
        priority = args.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise bad_request("priority must be an integer")
        scope = args.get("scope", "")
        if not isinstance(scope, str):
            raise bad_request("scope must be text")
        return await self.auth.create_rule(_text(args, "id"), _text(args, "resource"), scope,
                                           _text(args, "access"), priority, ns)

    async def _rules_delete(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        ns = self._namespace(args, who)
        await self.auth.delete_rule(_text(args, "id"), ns)
        return {"deleted": args["id"], "namespace": ns}

    async def _token_create(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        ns = self._namespace(args, who)
        ttl = args.get("ttl", self.auth.access_ttl)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise bad_request("ttl must be a number of seconds")
        return await self.auth.create_token(_text(args, "account"), float(ttl), ns)

    async def keys_rotate(self, args: dict[str, Any]) -> Any:
        """A new issuer key on this node; the others retire (they verify what they signed
        until it expires). Without a key of our own, a signer endorses the new one."""
        who = self.require_admin()
        kid, public = self.auth.new_key_here()
        request = {"kid": kid, "public": public}
        try:
            return await self._keys_endorse(request, who, self.node)
        except NoIssuerKey:
            return await self.auth.remote.ask({"op": "admin", "name": "keys.endorse",
                                               "args": request,
                                               "token": REQUEST_TOKEN.get()})

    async def _keys_endorse(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        self.auth.may_administer(who, DEFAULT)  # the cluster's keys: default's admins only
        return await self.auth.endorse_key(_text(args, "kid"), _text(args, "public"), node)

    async def _keys_revoke(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        self.auth.may_administer(who, DEFAULT)
        return await self.auth.revoke_key(_text(args, "kid"))

    async def nodes_revoke(self, args: dict[str, Any]) -> Any:
        """Revoke a node by member name or node id: every node refuses its links and
        gossip from then on."""
        self.require_admin()  # an admin of default: nodes are the cluster's
        ref = _text(args, "node")
        rows = self.members()
        match = [r for r in rows if ref in (r.get("name"), r.get("id"))]
        if match:
            node_id, name = str(match[0]["id"]), str(match[0]["name"])
        elif len(ref) == 26 and ref.isalnum():
            node_id, name = ref, ""
        else:
            raise not_found(f"no member named {ref!r}; give its 26-character node id "
                            "(`meshd members --json` shows it)")
        if node_id == self.auth.links.identity.node_id:
            raise bad_request("a node cannot revoke itself")
        request = {"id": node_id, "name": name}
        return await self._writer("nodes.revoke", self._nodes_revoke)(request)

    async def _nodes_revoke(self, args: dict[str, Any], who: Principal, node: str) -> Any:
        """Revoke the node, and the issuer keys it holds (that takes the root's holder)."""
        self.auth.may_administer(who, DEFAULT)
        name = str(args.get("name") or "")
        held = [k["kid"] for k in self.auth.list_keys()
                if name and k["signer"] == name and k["state"] != "revoked"]
        if held:
            self.auth._root_key()  # NoRootKey: the root's holder does all of it
        result = await self.auth.revoke_node(_text(args, "id"), name, who.id)
        result["keys_revoked"] = [(await self.auth.revoke_key(kid))["revoked"] for kid in held]
        return result

"""Auth shell: accounts, rules, keys and revocations in the replicated store; identify and
authorize every caller.

Rules:
- State lives in the store's "auth" database (tables accounts, rules, keys, revoked, meta),
  so it replicates, persists and heals like any store data. Issuer private keys never leave
  the node that made them (`issuer-<kid>.pem`, 0600); their public keys are in auth/keys.
- A caller is identified by its token when it presents one (a bad token is a 401, never a
  fallback), else by its node (scope "node": cluster members and the local operator on the
  control socket), else it is anonymous.
- Denials: 401 when the caller has no valid token, 403 when a valid token lacks access; the
  detail names the rule that decided. Reasons for refusing a token go to the log only.
- Login is rate-limited per account and per source (token bucket).
- A node without an issuer key asks a node that has one (link channel "auth").
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import trio

from meshd import wire
from meshd.datadir import write_secret_file
from meshd.errors import MeshError, bad_request, not_found
from meshd.store import crdt
from meshd.store.state import live
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from .accounts import check_secret, hash_secret
from .rules import Rule, RuleError, decide, make_rule, parse_resource
from .tokens import TokenError, Verifier, issue, make_claims, new_signing_key, unverified_claims

log = logging.getLogger("meshd.auth")
DB = "auth"
CHANNEL = "auth"
DEFAULT_RULES = [
    make_rule("default-nodes", "*:*:*", "node", "granted"),
    make_rule("default-services", "*:*:*", "service", "granted"),
    make_rule("default-admin", "*:*:*", "admin", "granted"),
]


@dataclass
class Principal:
    id: str
    scopes: list[str] | None
    via: str  # "token" | "node" | "anonymous"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "scopes": self.scopes or [], "via": self.via}


class _Bucket:
    def __init__(self, burst: float, per_s: float) -> None:
        self.burst, self.per_s = burst, per_s
        self.level: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """0 if allowed, else seconds to wait."""
        tokens, at = self.level.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        if tokens < 1:
            self.level[key] = (tokens, now)
            return (1 - tokens) / self.per_s
        self.level[key] = (tokens - 1, now)
        return 0.0


class AuthService:
    def __init__(self, node: str, store: Any, links: LinkManager, data_dir: Path,
                 leeway: float = 60.0, access_ttl: float = 3600.0,
                 refresh_ttl: float = 30 * 86400.0) -> None:
        self.node = node
        self.store = store
        self.links = links
        self.data_dir = data_dir
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.verifier = Verifier("", self.public_keys, self.is_revoked, leeway)
        self._rules_cache: tuple[Any, list[Rule]] = (None, [])
        self._keys_cache: tuple[Any, dict[str, bytes]] = (None, {})
        self._login_by_account = _Bucket(5, 0.1)
        self._login_by_source = _Bucket(20, 0.5)
        self.stats = {"auth_denied": 0, "auth_bad_tokens": 0}
        self._bootstrapped = False
        self._decisions: dict[Any, tuple[bool, Rule | None]] = {}
        self._decisions_version: Any = None
        links.handlers[CHANNEL] = self._serve_channel

    # --- state in the store ----------------------------------------------------------------

    def _records(self, table: str) -> dict[str, Any]:
        return self.store.json_records(DB, table)

    def _get(self, table: str, key: str) -> Any:
        state = self.store.rep.state.get(DB, table, key)
        if state is None or not live(state, int(time.time() * 1000)):
            return None
        return json.loads(state["lww"][1])

    async def _put(self, table: str, key: str, value: Any, ttl: float | None = None) -> None:
        expiry = int((time.time() + ttl) * 1000) if ttl else None
        delta = {"lww": crdt.lww(self.store.hlc.now(), json.dumps(value).encode(), {},
                                 expiry)}
        await self.store._commit_local(DB, table, key, delta, 1)

    async def _delete(self, table: str, key: str) -> None:
        await self.store._commit_local(DB, table, key,
                                       {"lww": crdt.lww(self.store.hlc.now(), None)}, 1)

    def _version(self, table: str) -> Any:
        t = self.store.rep.state.table(DB, table)
        return None if t is None else tuple(t.root())

    def public_keys(self) -> dict[str, bytes]:
        """Keys that still verify: current ones, and retired ones until every token they
        could have signed has expired (retired + refresh ttl)."""
        v = self._version("keys")
        now = time.time()
        if self._keys_cache[0] != (v, int(now // 60)) or v is None:
            keys = {kid: rec["public"].encode() for kid, rec in self._records("keys").items()
                    if not rec.get("retired") or rec["retired"] + self.refresh_ttl > now}
            self._keys_cache = ((v, int(now // 60)), keys)
        return self._keys_cache[1]

    def node_revoked(self, key: bytes) -> bool:
        """Whether a node identity key was revoked (item filled in by `nodes revoke`)."""
        return False

    def is_revoked(self, jti: str) -> bool:
        state = self.store.rep.state.get(DB, "revoked", jti)
        return state is not None and live(state, int(time.time() * 1000))

    def rules(self) -> list[Rule]:
        v = self._version("rules")
        if self._rules_cache[0] != v or v is None:
            rules = []
            for rid, rec in self._records("rules").items():
                try:
                    rules.append(make_rule(rid, rec["resource"], rec["scope"], rec["access"],
                                           rec.get("priority", 0)))
                except (RuleError, KeyError):
                    log.warning("ignoring malformed rule %s", rid)
            self._rules_cache = (v, rules)
        return self._rules_cache[1]

    @property
    def cluster_id(self) -> str:
        meta = self._get("meta", "cluster")
        return meta["id"] if meta else ""

    # --- bootstrap and keys ----------------------------------------------------------------

    def bootstrapped(self) -> bool:
        if not self._bootstrapped:  # once set up, auth stays set up: cache the answer
            self._bootstrapped = bool(self._records("keys"))
        return self._bootstrapped

    async def bootstrap(self) -> dict[str, Any]:
        if self.bootstrapped():
            raise MeshError(409, "this cluster already has auth set up; bootstrap runs once",
                            id="meshd.auth")
        await self._put("meta", "cluster", {"id": os.urandom(8).hex()})
        await self.rotate_keys()
        secret = os.urandom(18).hex()
        await self._put("accounts", "admin", {"type": "user", "scopes": ["admin"],
                                              "metadata": {}, "secret": hash_secret(secret)})
        for rule in DEFAULT_RULES:
            await self._put("rules", rule.id, {k: v for k, v in rule.to_dict().items()
                                               if k != "id"})
        token = await self.sign(make_claims("admin", ["admin"], self.node, self.cluster_id,
                                            86400.0))
        write_secret_file(self.data_dir / "admin.token", token.encode())
        log.info("auth bootstrapped: admin account created, admin token in %s",
                 self.data_dir / "admin.token")
        return {"token": token, "account": "admin", "secret": secret}

    async def rotate_keys(self) -> dict[str, Any]:
        """A new issuer key on this node signs from now on; older keys are marked retired and
        keep verifying until the tokens they signed have expired."""
        now = time.time()
        for old_kid, rec in self._records("keys").items():
            if not rec.get("retired"):
                await self._put("keys", old_kid, {**rec, "retired": now})
        kid, private, public = new_signing_key()
        write_secret_file(self.data_dir / f"issuer-{kid}.pem", private)
        await self._put("keys", kid, {"public": public.decode(), "signer": self.node,
                                      "created": time.time()})
        return {"kid": kid, "signer": self.node}

    def _local_signing_key(self, newest_only: bool = False) -> tuple[str, bytes] | None:
        """Our newest issuer key; with newest_only, only if it is the cluster's newest."""
        keys = self._records("keys")
        if not keys:
            return None
        ranked = sorted(((rec.get("created", 0), kid, rec.get("signer"))
                         for kid, rec in keys.items() if not rec.get("retired")), reverse=True)
        for _, kid, signer in ranked:
            if signer == self.node and (self.data_dir / f"issuer-{kid}.pem").exists():
                return kid, (self.data_dir / f"issuer-{kid}.pem").read_bytes()
            if newest_only:
                return None
        return None

    async def sign(self, claims: dict[str, Any]) -> str:
        """Sign with the cluster's newest key: here if we hold it, else on its node; if that
        node is unreachable, with our own newest key (still valid everywhere)."""
        local = self._local_signing_key(newest_only=True)
        if local is not None:
            return issue(local[0], local[1], claims)
        keys = self._records("keys")
        ranked = sorted(((rec.get("created", 0), rec.get("signer")) for rec in keys.values()
                         if rec.get("signer") and not rec.get("retired")), reverse=True)
        signers = list(dict.fromkeys(signer for _, signer in ranked))
        members = {m.name: m.addr for m in self.store.core.member_list() if m.state == 0}
        for signer in signers:
            addr = members.get(signer)
            if addr is None:
                continue
            try:
                with trio.fail_after(5):
                    async with await self.links.open_channel(addr, CHANNEL) as ch:
                        await ch.send(cbor2.dumps({"op": "sign", "claims": claims}))
                        reply = wire.loads(await ch.receive(), max_depth=8)
                if isinstance(reply, dict) and isinstance(reply.get("token"), str):
                    return reply["token"]
            except (LinkError, ChannelClosed, trio.TooSlowError, ValueError):
                continue
        own = self._local_signing_key()
        if own is not None:
            return issue(own[0], own[1], claims)
        raise MeshError(503, "no node holding an issuer key is reachable to sign a token",
                        id="meshd.auth")

    async def _serve_channel(self, ch: Channel) -> None:
        req = wire.loads(await ch.receive(), max_depth=8)
        local = self._local_signing_key()
        if not isinstance(req, dict) or req.get("op") != "sign" or local is None \
                or not isinstance(req.get("claims"), dict):
            await ch.send(cbor2.dumps({"error": "cannot sign"}))
            return
        await ch.send(cbor2.dumps({"token": issue(local[0], local[1], req["claims"])}))

    # --- identify and authorize ----------------------------------------------------------

    def identify(self, token: str | None, node: str | None) -> Principal:
        if token:
            self.verifier.audience = self.cluster_id
            try:
                claims = self.verifier.verify(token)
            except TokenError as exc:
                self.stats["auth_bad_tokens"] += 1
                log.info("refused a token: %s", exc)
                raise MeshError(401, "invalid token", id="meshd.auth") from None
            sub = str(claims.get("sub"))
            account = self._get("accounts", sub)
            if not sub.startswith("service:") and (account is None or account.get("disabled")):
                log.info("refused a token of deleted or disabled account %s", sub)
                raise MeshError(401, "invalid token", id="meshd.auth")
            return Principal(str(claims.get("sub")), list(claims.get("scopes") or []), "token")
        if node:
            return Principal(f"node:{node}", ["node"], "node")
        return Principal("anonymous", None, "anonymous")

    def authorize(self, who: Principal, resource: tuple[str, str, str]) -> None:
        if not self.bootstrapped():
            return  # no auth state yet (a node still syncing): nothing to enforce against
        rules = self.rules()
        version = self._rules_cache[0]
        if version != self._decisions_version or len(self._decisions) > 10_000:
            self._decisions = {}
            self._decisions_version = version
        key = (None if who.scopes is None else tuple(who.scopes), resource)
        decision = self._decisions.get(key)
        if decision is None:  # decisions are pure in (rules, scopes, resource): cache them
            decision = self._decisions[key] = decide(rules, who.scopes, resource)
        allowed, rule = decision
        if allowed:
            return
        self.stats["auth_denied"] += 1
        why = f"rule {rule.id!r} denies it" if rule is not None else "no rule grants it"
        res = ":".join(resource)
        if who.via == "token":
            raise MeshError(403, f"{who.id} may not access {res}: {why}", id="meshd.auth")
        raise MeshError(401, f"{res} needs a token with access ({why})", id="meshd.auth")

    def check(self, token: str | None, node: str | None,
              resource: tuple[str, str, str]) -> Principal:
        who = self.identify(token, node)
        self.authorize(who, resource)
        return who

    def require_admin(self, token: str | None) -> Principal:
        """Admin operations: an admin token, or the local operator (no token)."""
        who = self.identify(token, self.node)
        if who.via == "node" or "admin" in (who.scopes or []):
            return who
        raise MeshError(403, f"{who.id} is not an admin", id="meshd.auth")

    # --- accounts, tokens ------------------------------------------------------------------

    async def create_account(self, id: str, secret: str, scopes: list[str], type: str = "user",
                             metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        if not id or len(id) > 128 or ":" in id:
            raise bad_request("account id must be 1..128 characters without ':'")
        if type not in ("user", "service"):
            raise bad_request("account type must be user or service")
        if len(secret) < 8:
            raise bad_request("the secret must have at least 8 characters")
        rec = {"type": type, "scopes": list(scopes), "metadata": metadata or {},
               "secret": hash_secret(secret)}
        await self._put("accounts", id, rec)
        return {"id": id, "type": type, "scopes": list(scopes)}

    def accounts(self) -> list[dict[str, Any]]:
        return [{"id": k, "type": v.get("type"), "scopes": v.get("scopes", []),
                 "disabled": bool(v.get("disabled"))}
                for k, v in sorted(self._records("accounts").items())]

    async def delete_account(self, id: str) -> None:
        if self._get("accounts", id) is None:
            raise not_found(f"no account {id!r}", id="meshd.auth")
        await self._delete("accounts", id)

    async def login(self, id: str, secret: str, source: str) -> dict[str, Any]:
        now = time.monotonic()
        for bucket, key in ((self._login_by_account, id), (self._login_by_source, source)):
            wait = bucket.take(key, now)
            if wait:
                raise MeshError(429, f"too many login attempts; try again in {wait:.0f} s",
                                code="too_many_requests", id="meshd.auth")
        account = self._get("accounts", id)
        secret_ok = account is not None and check_secret(secret, account.get("secret", ""))
        if not secret_ok or account.get("disabled"):
            log.info("failed login for %r from %s", id, source)
            raise MeshError(401, "wrong account id or secret", id="meshd.auth")
        return await self._tokens(id, account.get("scopes", []))

    async def _tokens(self, sub: str, scopes: list[str]) -> dict[str, Any]:
        cid = self.cluster_id
        access = await self.sign(make_claims(sub, scopes, self.node, cid, self.access_ttl))
        refresh = await self.sign(make_claims(sub, scopes, self.node, cid, self.refresh_ttl,
                                              typ="refresh"))
        return {"account": sub, "scopes": scopes, "token": access, "refresh_token": refresh,
                "expires_in": int(self.access_ttl)}

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        self.verifier.audience = self.cluster_id
        try:
            claims = self.verifier.verify(refresh_token, typ="refresh")
        except TokenError as exc:
            log.info("refused a refresh token: %s", exc)
            raise MeshError(401, "invalid token", id="meshd.auth") from None
        account = self._get("accounts", claims["sub"])
        if account is None or account.get("disabled"):
            raise MeshError(401, "invalid token", id="meshd.auth")
        return await self._tokens(claims["sub"], account.get("scopes", []))

    async def create_token(self, account_id: str, ttl: float) -> dict[str, Any]:
        account = self._get("accounts", account_id)
        if account is None:
            raise not_found(f"no account {account_id!r}", id="meshd.auth")
        if not 0 < ttl <= self.refresh_ttl:
            raise bad_request(f"ttl must be between 1 and {self.refresh_ttl:.0f} seconds")
        token = await self.sign(make_claims(account_id, account.get("scopes", []), self.node,
                                            self.cluster_id, ttl))
        return {"token": token, "account": account_id, "expires_in": int(ttl)}

    async def service_token(self, service: str) -> str | None:
        if not self.bootstrapped():
            return None
        try:
            return await self.sign(make_claims(f"service:{service}", ["service"], self.node,
                                               self.cluster_id, 86400.0))
        except MeshError:
            return None

    async def revoke(self, token: str) -> dict[str, Any]:
        try:
            claims = unverified_claims(token)
        except TokenError as exc:
            raise bad_request(f"that is not a token: {exc}") from None
        jti, exp = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not isinstance(exp, int | float):
            raise bad_request("that token has no id or expiry")
        remaining = max(60.0, exp - time.time() + self.verifier.leeway)
        await self._put("revoked", jti, {"exp": exp}, ttl=remaining)
        return {"revoked": jti}

    # --- rules -----------------------------------------------------------------------------

    async def create_rule(self, id: str, resource: str, scope: str, access: str,
                          priority: int) -> dict[str, Any]:
        try:
            rule = make_rule(id, resource, scope, access, priority)
        except RuleError as exc:
            raise bad_request(str(exc)) from None
        await self._put("rules", id, {k: v for k, v in rule.to_dict().items() if k != "id"})
        return rule.to_dict()

    async def delete_rule(self, id: str) -> None:
        if self._get("rules", id) is None:
            raise not_found(f"no rule {id!r}", id="meshd.auth")
        await self._delete("rules", id)

    def list_rules(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in sorted(self.rules(), key=lambda r: (-r.priority, r.id))]


def resource(kind: str, name: str, endpoint: str = "") -> tuple[str, str, str]:
    parse_resource(f"{kind}:{name or '-'}:{endpoint}")
    return kind, name, endpoint

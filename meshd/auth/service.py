"""Auth shell: accounts, rules, issuer keys and revocations in the replicated store; identify
and authorize every caller.

Rules:
- State lives in the store's "auth" database (tables accounts, rules, keys, keystate,
  revoked, nodes, meta), so it replicates, persists and heals like any store data. Every
  record is signed by an issuer key and a peer's record merges only if it verifies with a
  key this node trusts (records.py): holding the cluster secret is not enough to write
  auth state.
- Issuer private keys never leave the node that made them (`issuer-<kid>.pem`, 0600).
  Only a node holding a usable issuer key ("a signer") writes auth records; other nodes
  ask a signer over link channel "auth" (remote.py), giving what justifies the request:
  an admin token, the token to revoke, an account secret, or a service registered on the
  asking node. A member can never have arbitrary claims signed.
- A caller is identified by its token when it presents one (a bad token is a 401, never a
  fallback), else by its node (scope "node": cluster members and the local operator on the
  control socket), else it is anonymous. On every use a token is checked against the state
  of now, not of when it was issued: its key must still be trusted and not revoked, its
  account must exist and not be disabled, and its scopes count only while the account
  still has them; a service token counts only with the "service" scope, from a node that
  is not revoked.
- Denials: 401 when the caller has no valid token, 403 when a valid token lacks access; the
  detail names the rule that decided. Reasons for refusing a token go to the log only.
- Login is rate-limited per account and per source (the transport's idea of the caller:
  the unix user on the control socket, the remote address through the proxy), on the node
  the caller reaches, also when it forwards the login to a signer (which limits it again per
  account and per asking node); the limit tables are bounded.
- Revoked nodes (`meshd nodes revoke`): their identity keys are refused by links and
  membership everywhere (node_revoked) and they receive no new cluster secrets.

Namespaces
----------
- Accounts and rules belong to a namespace. "default" keeps the tables it always had
  (accounts, rules); namespace NS has its own (accounts@NS, rules@NS), signed, verified and
  replicated like every auth record (the table name is in what the key signs, so a record
  cannot be moved from one namespace to another). Keys, revocations and nodes are the
  cluster's, not a namespace's.
- Tokens carry their namespace (claim "ns"; absent: "default"); a service's token is of the
  namespace it registered in (service:NAME of team-a), issued only for a service registered
  in that namespace on the asking node.
- Authorizing a caller for a resource of namespace R (`authorize(who, resource, R)`), with
  R's rules (rules.scopes_in):
  - nodes (no token, node:NAME) are at home in every namespace: R's rules with scope
    "node" decide, as in default;
  - a token of R: R's rules with its scopes decide, as always;
  - a token of another namespace P: only R's rules whose scope is "P:SCOPE" for one of its
    scopes, and public ("") rules, can grant it; "*" means any account of R, not of P;
  - an admin (scope "admin") of default counts as R's own in every namespace; an admin of
    team-a is an admin in team-a only. Administering (accounts, rules, tokens of a
    namespace: `may_administer`) is for admins of that namespace and of default.
  - A namespace with no rules of its own is governed by default's rules, and default's
    accounts act in it as at home (so what existed before namespaces, e.g. rules on config
    trees other than default's for default's accounts, keeps deciding);
    the first rule written into it writes DEFAULT_RULES with it (nodes, services and
    admins may do everything in it), so adding a rule never shuts its own services out;
    from then on only its own rules decide.
- Denials keep 401/403 and name the rule (or that none granted) and, outside default, the
  namespace.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshd import namespaces
from meshd.buckets import TokenBuckets
from meshd.datadir import write_secret_file
from meshd.errors import MeshError, bad_request, not_found, too_many
from meshd.identity import node_id_from_public
from meshd.store import crdt
from meshd.store.state import live
from meshd.transport.links import LinkManager

from . import records
from .accounts import check_secret, hash_secret
from .records import DB, KEYS, KEYSTATE, Trust
from .rules import Rule, RuleError, decide, make_rule, parse_resource, scopes_in
from .tokens import TokenError, Verifier, issue, make_claims, new_signing_key, unverified_claims

log = logging.getLogger("meshd.auth")
PIN_FILE = "auth-root"
ROOT_TAG = "authroot"  # membership tag: the auth root fingerprint this member trusts
DEFAULT_RULES = [
    make_rule("default-nodes", "*:*:*", "node", "granted"),
    make_rule("default-services", "*:*:*", "service", "granted"),
    make_rule("default-admin", "*:*:*", "admin", "granted"),
]
SERVICE_SCOPES = ["service"]
MAX_JTI = 64  # the token ids meshd issues are 24 hex digits
DEFAULT = namespaces.DEFAULT
EVERY = "*"  # a principal's namespace when it is not bound to one (nodes, anonymous)


def ns_table(base: str, namespace: str) -> str:
    """The auth table of `base` ("accounts", "rules") for a namespace: default keeps the
    tables it always had, namespace NS has `base@NS`."""
    return base if namespace == DEFAULT else f"{base}@{namespace}"


def table_namespace(table: str, base: str) -> str | None:
    """The namespace an auth table of `base` belongs to (None: not one of them)."""
    if table == base:
        return DEFAULT
    prefix = base + "@"
    return table[len(prefix):] if table.startswith(prefix) and len(table) > len(prefix) \
        else None


# System databases other than auth whose records only a signer writes: a member that could
# write a binding would send a database's data to a server of its choosing.
SIGNED_DBS = frozenset({"engines"})


class NoIssuerKey(MeshError):
    """This node holds no usable issuer key: the request must go to a signer."""

    holder: str | None = None  # the node that must answer instead (None: any signer)

    def __init__(self) -> None:
        super().__init__(503, "this node holds no issuer key", id="meshd.auth")


class NoRootKey(NoIssuerKey):
    """Only the node holding the root key may do this (revoke issuer keys)."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.holder = holder
        self.detail = f"only {holder or 'the node'} holding the auth root key revokes keys"


@dataclass
class Principal:
    id: str
    scopes: list[str] | None
    via: str  # "token" | "node" | "anonymous"
    namespace: str = DEFAULT  # EVERY for nodes and anonymous callers

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "scopes": self.scopes or [], "via": self.via,
                "namespace": self.namespace}

    def where(self) -> str:
        """" of namespace 'x'" outside default (for messages)."""
        return "" if self.namespace in (DEFAULT, EVERY) else \
            f" of namespace {self.namespace!r}"


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
        self.trust = Trust(self._load_pin())
        self._trust_version: Any = ("unset",)
        self._root_known = False
        self.verifier = Verifier("", self.public_keys, self.is_revoked, leeway)
        self._rules_cache: dict[str, tuple[Any, list[Rule], bool]] = {}
        self._keys_cache: tuple[Any, dict[str, bytes]] = (None, {})
        self._nodes_cache: tuple[Any, frozenset[str], frozenset[str]] = (
            ("unset",), frozenset(), frozenset())
        self._login_by_account = TokenBuckets(5, 0.1)
        self._login_by_source = TokenBuckets(20, 0.5)
        self._login_by_node = TokenBuckets(200, 10.0)  # logins forwarded by one member node
        self.stats = {"auth_denied": 0, "auth_bad_tokens": 0, "auth_records_refused": 0}
        # per namespace: (rules version, decisions)
        self._decisions: dict[str, tuple[Any, dict[Any, tuple[bool, Rule | None]]]] = {}
        self._refused_logged = 0.0
        # set by the node: the `authroot` tags of the seeds we joined through (the nodes at
        # the addresses the operator gave: they pin our root), of all live members (does
        # the cluster have auth at all?), a pin listener (to advertise ours), and whether a
        # service is registered on a node
        self.seed_roots: Callable[[], list[str]] = lambda: []
        self.vouched_roots: Callable[[], list[str]] = lambda: []
        self.on_pin: Callable[[str], None] | None = None
        self.service_on_node: Callable[[str, str, str], bool] = \
            lambda service, node, namespace: False
        store.rep.accept = self._accept
        # database bindings (their DSNs say where a database's data goes) are written signed
        # by a signer and merged from peers only when the signature holds, as auth records
        store.engines.sign = self.write_signed
        store.engines.verify = self.verify_signed
        store.rep.merge_first = records.MERGE_FIRST
        # a deleted account or rule stays deleted: its old signed record must not come back
        # by replay once a tombstone is collected, so auth tombstones never are (they are
        # few: one per deleted account, rule or key)
        store.rep.keep_tombstones = frozenset({DB})
        from .remote import SignerChannel  # the link protocol to and from signers

        self.remote = SignerChannel(self, links)

    # --- the root pin ----------------------------------------------------------------------

    def _load_pin(self) -> str | None:
        try:
            pin = (self.data_dir / PIN_FILE).read_text().strip()
        except OSError:
            return None
        return pin or None

    def _set_pin(self, pin: str) -> None:
        write_secret_file(self.data_dir / PIN_FILE, pin.encode())
        self.trust.pin = pin
        self._trust_version = ("unset",)
        log.info("auth root pinned: %s", pin)
        if self.on_pin is not None:
            self.on_pin(pin)

    @property
    def root_fingerprint(self) -> str | None:
        return self.trust.pin

    def _try_pin_from_seeds(self) -> bool:
        """Pin the root the seeds we joined through vouch for. Not a vote among members:
        anyone with the cluster secret can add members, but only the operator chose the
        seeds (or give the root outright: `meshd up --auth-root FP`, which `meshd invite`
        prints)."""
        roots = set(self.seed_roots())
        if len(roots) != 1:
            if len(roots) > 1:
                log.warning("the seeds we joined through vouch for different auth roots "
                            "(%s): trusting none; pass --auth-root", ", ".join(sorted(roots)))
            return False
        self._set_pin(roots.pop())
        return True

    # --- state in the store ----------------------------------------------------------------

    def _records(self, table: str) -> dict[str, Any]:
        """Live records of a table that count: signed by a trusted key not revoked."""
        t = self.store.rep.state.table(DB, table)
        if t is None:
            return {}
        trust = self._trusted()
        now = int(time.time() * 1000)
        out = {}
        for key, state in t.records.items():
            reg = state.get("lww")
            if reg is None or reg[1] is None or not live(state, now) or not trust.counts(reg):
                continue
            try:
                out[key] = json.loads(reg[1])
            except (ValueError, TypeError, RecursionError):
                continue
        return out

    def _get(self, table: str, key: str) -> Any:
        state = self.store.rep.state.get(DB, table, key)
        if state is None or not live(state, int(time.time() * 1000)) \
                or not self._trusted().counts(state.get("lww")):
            return None
        try:
            return json.loads(state["lww"][1])
        except (ValueError, TypeError, KeyError, RecursionError):
            return None

    def _registers(self, table: str) -> dict[str, list[Any]]:
        t = self.store.rep.state.table(DB, table)
        if t is None:
            return {}
        return {k: s["lww"] for k, s in t.records.items() if "lww" in s}

    def _version(self, table: str) -> Any:
        t = self.store.rep.state.table(DB, table)
        return None if t is None else tuple(t.root())

    def _trusted(self) -> Trust:
        version = (self._version(KEYS), self._version(KEYSTATE), self.trust.pin)
        if version != self._trust_version:
            self.trust.refresh(self._registers(KEYS), self._registers(KEYSTATE))
            self._trust_version = version
        return self.trust

    async def write_signed(self, db: str, table: str, key: str, raw: bytes | None) -> None:
        """Write one record of a signed system database (SIGNED_DBS) here, signed with this
        node's issuer key; 409 naming the signers when this node holds none."""
        try:
            kid, private = self._record_key()
        except NoIssuerKey:
            signers = ", ".join(self.signers()) or "none yet"
            raise MeshError(409, f"only a node holding an issuer key writes {db} records: run "
                                 f"this on a signer ({signers})", id="meshd.auth") from None
        ts = self.store.hlc.now()
        meta = records.sign(kid, private, f"{db}/{table}", key, ts, raw, None)
        await self.store._commit_local(db, table, key, {"lww": crdt.lww(ts, raw, meta, None)},
                                       1)

    def verify_signed(self, db: str, table: str, key: str, state: crdt.State) -> str | None:
        """None if this record of a signed system database carries a trusted signature,
        else why not."""
        if set(state) != {"lww"}:
            return "signed records are registers only"
        return self._trusted().check(f"{db}/{table}", key, state["lww"])

    def _accept(self, db: str, table: str, key: str, state: crdt.State) -> bool:
        """Store replication hook: may this record from a peer merge?"""
        if db in SIGNED_DBS:
            why = self.verify_signed(db, table, key, state)
            return True if why is None else self._refuse(f"{db}/{table}", key, why)
        if db != DB:
            return True
        if set(state) != {"lww"}:
            return self._refuse(table, key, "auth records are registers only")
        trust = self._trusted()
        why = trust.check(table, key, state["lww"])
        if why == "no auth root pinned yet" and self._try_pin_from_seeds():
            why = self._trusted().check(table, key, state["lww"])
        if why is not None:
            return self._refuse(table, key, why)
        return True

    def _refuse(self, table: str, key: str, why: str) -> bool:
        self.stats["auth_records_refused"] += 1
        now = time.monotonic()
        if now - self._refused_logged > 10:
            self._refused_logged = now
            log.warning("refused a signed record %s/%s from a peer: %s", table, key, why)
        return False

    def _held_keys(self) -> list[tuple[records.KeyInfo, bytes]]:
        """Usable issuer keys whose private half is on this node, newest first."""
        trust = self._trusted()
        out = []
        for kid, info in trust.keys.items():
            if trust.usable(kid) is None:
                continue
            path = self.data_dir / f"issuer-{kid}.pem"
            if path.exists():
                out.append((info, path.read_bytes()))
        out.sort(key=lambda x: -x[0].created)
        return out

    def holds_key(self) -> bool:
        """Whether this node holds a usable issuer key (it may write auth records, and its
        local operator administers the cluster's auth)."""
        return bool(self._held_keys())

    def _record_key(self) -> tuple[str, Any]:
        held = self._held_keys()
        if not held:
            raise NoIssuerKey()
        info, pem = held[0]
        return info.kid, records.load_private(pem)

    def _token_key(self) -> tuple[str, bytes] | None:
        """The key new tokens are signed with here: a held key that is not retired."""
        for info, pem in self._held_keys():
            if info.kid not in self.trust.retired:
                return info.kid, pem
        return None

    async def _write(self, table: str, key: str, value: Any, ttl: float | None = None,
                     kid_key: tuple[str, Any] | None = None) -> None:
        """Write one signed record (a delete when value is None)."""
        kid, private = kid_key or self._record_key()
        raw = None if value is None else json.dumps(value).encode()
        expiry = int((time.time() + ttl) * 1000) if ttl else None
        ts = self.store.hlc.now()
        meta = records.sign(kid, private, table, key, ts, raw, expiry)
        await self.store._commit_local(DB, table, key, {"lww": crdt.lww(ts, raw, meta, expiry)},
                                       1)

    def public_keys(self) -> dict[str, bytes]:
        """Keys that verify tokens: trusted and not revoked; retired ones only until every
        token they could have signed has expired (retired + refresh ttl)."""
        trust = self._trusted()
        now = time.time()
        version = (self._trust_version, int(now // 60))
        if self._keys_cache[0] != version:
            keys = {kid: info.pem.encode() for kid, info in trust.keys.items()
                    if kid not in trust.revoked
                    and trust.retired.get(kid, now + 1) + self.refresh_ttl > now}
            self._keys_cache = (version, keys)
        return self._keys_cache[1]

    def is_revoked(self, jti: str) -> bool:
        state = self.store.rep.state.get(DB, "revoked", jti)
        return state is not None and live(state, int(time.time() * 1000))

    def _revoked_nodes(self) -> tuple[frozenset[str], frozenset[str]]:
        """(node ids, node names) revoked by an admin."""
        self._trusted()
        version = (self._version("nodes"), self._trust_version)
        if self._nodes_cache[0] != version or version[0] is None:
            recs = self._records("nodes")
            ids = frozenset(recs)
            names = frozenset(str(r.get("name")) for r in recs.values() if r.get("name"))
            self._nodes_cache = (version, ids, names)
        return self._nodes_cache[1], self._nodes_cache[2]

    def node_revoked(self, key: bytes) -> bool:
        """Whether a node identity key was revoked (`meshd nodes revoke`)."""
        ids, _ = self._revoked_nodes()
        return bool(ids) and node_id_from_public(key) in ids

    def node_name_revoked(self, name: str) -> bool:
        return name in self._revoked_nodes()[1]

    def rules(self, namespace: str = DEFAULT) -> list[Rule]:
        """The rules that decide in `namespace` (default's for a namespace that has none of
        its own)."""
        return self._namespace_rules(namespace)[1]

    def _namespace_rules(self, namespace: str) -> tuple[Any, list[Rule], bool]:
        """(version, rules, whether they are the namespace's own records)."""
        self._trusted()
        table = ns_table("rules", namespace)
        v: Any = (self._version(table), self._trust_version)
        if namespace != DEFAULT:  # default's rules may stand in for this namespace's
            v = (v, self._version(ns_table("rules", DEFAULT)))
        cached = self._rules_cache.get(namespace)
        if cached is None or cached[0] != v:
            rules = []
            for rid, rec in self._records(table).items():
                try:
                    rules.append(make_rule(rid, rec["resource"], rec["scope"], rec["access"],
                                           rec.get("priority", 0)))
                except (RuleError, KeyError, TypeError):
                    log.warning("ignoring malformed rule %s of namespace %s", rid, namespace)
            own = bool(rules)
            if not own and namespace != DEFAULT:
                rules = list(self._namespace_rules(DEFAULT)[1])
            if len(self._rules_cache) > 10_000:
                self._rules_cache.clear()
            cached = self._rules_cache[namespace] = (v, rules, own)
        return cached

    @property
    def cluster_id(self) -> str:
        meta = self._get("meta", "cluster")
        return meta["id"] if isinstance(meta, dict) and isinstance(meta.get("id"), str) else ""

    # --- bootstrap and keys ----------------------------------------------------------------

    def bootstrapped(self) -> bool:
        if not self._root_known:  # once a root is trusted it stays (the pin never changes)
            self._root_known = self._trusted().root is not None
        return self._root_known

    async def bootstrap(self) -> dict[str, Any]:
        """Set up auth once for the cluster: a root issuer key (pinned here), the cluster
        id, an admin account and the default rules; returns the admin token."""
        if self.bootstrapped() or self.vouched_roots():
            raise MeshError(409, "this cluster already has auth set up; bootstrap runs once",
                            id="meshd.auth")
        if self.trust.pin:
            raise MeshError(409, f"this node trusts auth root {self.trust.pin} (--auth-root): "
                                 "it takes auth from the cluster it joins", id="meshd.auth")
        kid, private_pem, public_pem = new_signing_key()
        write_secret_file(self.data_dir / f"issuer-{kid}.pem", private_pem)
        self._set_pin(records.fingerprint(public_pem))
        private = records.load_private(private_pem)
        await self._write(KEYS, kid, {"public": public_pem.decode(), "signer": self.node,
                                      "created": time.time()}, kid_key=(kid, private))
        await self._write("meta", "cluster", {"id": os.urandom(8).hex()})
        secret = os.urandom(18).hex()
        await self._write("accounts", "admin", {"type": "user", "scopes": ["admin"],
                                                "metadata": {}, "secret": hash_secret(secret)})
        for rule in DEFAULT_RULES:
            await self._write("rules", rule.id, {k: v for k, v in rule.to_dict().items()
                                                 if k != "id"})
        token = await self.sign(make_claims("admin", ["admin"], self.node, self.cluster_id,
                                            86400.0))
        write_secret_file(self.data_dir / "admin.token", token.encode())
        log.info("auth bootstrapped: admin account created, admin token in %s",
                 self.data_dir / "admin.token")
        return {"token": token, "account": "admin", "secret": secret}

    async def endorse_key(self, kid: str, public_pem: str, holder: str) -> dict[str, Any]:
        """Trust a new issuer key held by `holder` (signed by one of our keys) and retire
        every other current key: new tokens come from the new key, old ones keep
        verifying until they expire."""
        if records.load_public(public_pem) is None or not kid or "/" in kid:
            raise bad_request("not an ed25519 public key", id="meshd.auth")
        now = time.time()
        await self._write(KEYS, kid, {"public": public_pem, "signer": holder, "created": now})
        trust = self._trusted()
        for old in list(trust.keys):
            if old != kid and old not in trust.retired and old not in trust.revoked:
                await self._write(KEYSTATE, old, {"retired": now})
        return {"kid": kid, "signer": holder}

    def new_key_here(self) -> tuple[str, str]:
        """Make an issuer key pair on this node; (kid, public PEM) for endorsement."""
        kid, private, public = new_signing_key()
        write_secret_file(self.data_dir / f"issuer-{kid}.pem", private)
        return kid, public.decode()

    def root_holder(self) -> str:
        trust = self._trusted()
        info = trust.keys.get(trust.root or "")
        return info.signer if info is not None else ""

    def _root_key(self) -> tuple[str, Any]:
        trust = self._trusted()
        path = self.data_dir / f"issuer-{trust.root}.pem"
        if trust.root is None or not path.exists():
            raise NoRootKey(self.root_holder())
        return trust.root, records.load_private(path.read_bytes())

    async def revoke_key(self, kid: str) -> dict[str, Any]:
        """Stop trusting issuer key `kid` at once (the root key signs the revocation): its
        tokens stop verifying, keys it endorsed lose their trust with it, and the records
        any of them signed stop counting. Nothing is re-signed: what is still wanted is
        written again by an admin (the reply lists what no longer counts)."""
        trust = self._trusted()
        if kid not in trust.keys:
            raise not_found(f"no trusted issuer key {kid!r}", id="meshd.auth")
        if kid == trust.root:
            raise MeshError(409, f"key {kid} is the cluster's auth root, which every other "
                                 "key's trust goes back to; it can be retired (rotate) but "
                                 "not revoked", id="meshd.auth")
        if kid in trust.revoked:
            return {"revoked": kid, "keys_untrusted": [], "records_dropped": []}
        root = self._root_key()
        before = {k for k in trust.keys if k not in trust.revoked}
        state = self._get(KEYSTATE, kid) or {}
        await self._write(KEYSTATE, kid, {**state, "revoked": time.time()}, kid_key=root)
        trust = self._trusted()
        gone = sorted(before - {k for k in trust.keys if k not in trust.revoked})
        dropped = []
        tables = sorted({t for db, t in self.store.rep.state.tables if db == DB} - {KEYS})
        for table in tables:
            for key, reg in self._registers(table).items():
                meta = reg[2] if isinstance(reg[2], dict) else {}
                if meta.get("kid") in gone and reg[1] is not None:
                    dropped.append(f"{table}/{key}")
        log.warning("issuer key %s revoked: %d key(s) no longer trusted (%s), %d record(s) "
                    "no longer count", kid, len(gone), ", ".join(gone), len(dropped))
        return {"revoked": kid, "keys_untrusted": gone, "records_dropped": dropped}

    def list_keys(self) -> list[dict[str, Any]]:
        trust = self._trusted()
        rows = []
        for kid, info in sorted(trust.keys.items(), key=lambda kv: kv[1].created):
            state = "revoked" if kid in trust.revoked else \
                "retired" if kid in trust.retired else "current"
            rows.append({"kid": kid, "signer": info.signer, "endorsed_by": info.endorsed_by,
                         "created": info.created, "state": state,
                         "root": kid == trust.root})
        return rows

    # --- signing tokens --------------------------------------------------------------------

    async def sign(self, claims: dict[str, Any]) -> str:
        """Sign claims with a current key held here (callers decide what may be signed)."""
        key = self._token_key()
        if key is None:
            raise NoIssuerKey()
        return issue(key[0], key[1], claims)

    def signers(self) -> list[str]:
        """Live members that hold a current issuer key, newest key first."""
        trust = self._trusted()
        ranked = sorted((info for kid, info in trust.keys.items()
                         if kid not in trust.revoked and kid not in trust.retired),
                        key=lambda info: -info.created)
        return list(dict.fromkeys(info.signer for info in ranked if info.signer))

    # --- identify and authorize ----------------------------------------------------------

    def identify(self, token: str | None, node: str | None) -> Principal:
        if token:
            self.verifier.audience = self.cluster_id
            try:
                claims = self.verifier.verify(token)
                principal = self._principal(claims)
            except TokenError as exc:
                self.stats["auth_bad_tokens"] += 1
                log.info("refused a token: %s", exc)
                raise MeshError(401, "invalid token", id="meshd.auth") from None
            return principal
        if node:
            return Principal(f"node:{node}", ["node"], "node", EVERY)
        return Principal("anonymous", None, "anonymous", EVERY)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        """Who a verified token speaks for, with the scopes it has *now*."""
        sub = claims.get("sub")
        scopes = claims.get("scopes")
        if not isinstance(sub, str) or not isinstance(scopes, list):
            raise TokenError("token claims lack a subject or scopes")
        ns = claims.get("ns", DEFAULT)
        try:
            ns = namespaces.check(ns) if isinstance(ns, str) and ns else ""
        except MeshError:
            ns = ""
        if not ns:
            raise TokenError(f"token of an invalid namespace {claims.get('ns')!r}")
        if sub.startswith("service:"):
            if scopes != SERVICE_SCOPES:
                raise TokenError(f"service token with scopes {scopes!r}")
            iss, nid = claims.get("iss"), claims.get("nid")
            if not isinstance(iss, str) or not isinstance(nid, str) \
                    or self.node_name_revoked(iss) or nid in self._revoked_nodes()[0]:
                raise TokenError(f"service token from a revoked node ({iss!r})")
            return Principal(sub, list(SERVICE_SCOPES), "token", ns)
        account = self._get(ns_table("accounts", ns), sub)
        if not isinstance(account, dict) or account.get("disabled"):
            raise TokenError(f"token of deleted or disabled account {sub} (namespace {ns})")
        current = account.get("scopes") or []
        return Principal(sub, [s for s in scopes if s in current], "token", ns)

    def authorize(self, who: Principal, resource: tuple[str, str, str],
                  namespace: str = DEFAULT) -> None:
        """Whether `who` may reach `resource` of `namespace` (see "Namespaces" above);
        401/403 naming the rule that decided (or that none granted) if not."""
        allowed, rule, home = self._decide(who, resource, namespace)
        if allowed:
            return
        self.stats["auth_denied"] += 1
        why = f"rule {rule.id!r} denies it" if rule is not None else "no rule grants it"
        res = ":".join(resource)
        if namespace != DEFAULT or who.namespace not in (DEFAULT, EVERY):
            res += f" in namespace {namespace!r}"
            if who.via == "token" and home != namespace \
                    and not (who.namespace == DEFAULT and "admin" in (who.scopes or [])):
                why += (f" ({who.id} is of namespace {who.namespace!r}: only rules of "
                        f"{namespace!r} with scope '{who.namespace}:SCOPE' let it in)")
        if who.via == "token":
            raise MeshError(403, f"{who.id} may not access {res}: {why}", id="meshd.auth")
        raise MeshError(401, f"{res} needs a token with access ({why})", id="meshd.auth")

    def allows(self, who: Principal, resource: tuple[str, str, str],
               namespace: str = DEFAULT) -> bool:
        """`authorize` as a yes or no, counting nothing: for leaving out of a read or a
        watch what the caller may not see (503 while the cluster's auth state is on its
        way, as there)."""
        return self._decide(who, resource, namespace)[0]

    def _decide(self, who: Principal, resource: tuple[str, str, str], namespace: str
                ) -> tuple[bool, Rule | None, str | None]:
        """(allowed, the rule that decided, the caller's namespace as the rules of
        `namespace` see it)."""
        if not self.bootstrapped():
            if self.vouched_roots():  # the cluster has auth; we have not received it yet
                raise MeshError(503, "this node has not received the cluster's auth state "
                                     "yet; retry in a moment", id="meshd.auth")
            return True, None, None  # a cluster without auth set up yet: nothing to enforce
        version, rules, own = self._namespace_rules(namespace)
        cached = self._decisions.get(namespace)
        if cached is None or cached[0] != version or len(cached[1]) > 10_000:
            if len(self._decisions) > 1_000:
                self._decisions.clear()
            cached = self._decisions[namespace] = (version, {})
        decisions = cached[1]
        home = None if who.namespace == EVERY else who.namespace
        if home == DEFAULT and not own:  # default governs a namespace without rules of its own
            home = namespace
        key = (home, None if who.scopes is None else tuple(who.scopes), resource)
        decision = decisions.get(key)
        if decision is None:  # pure in (rules, namespaces, scopes, resource): cache them
            scopes, member = scopes_in(home, who.scopes, namespace, DEFAULT)
            decision = decisions[key] = decide(rules, scopes, resource, member)
        return decision[0], decision[1], home

    def check(self, token: str | None, node: str | None, resource: tuple[str, str, str],
              namespace: str = DEFAULT) -> Principal:
        who = self.identify(token, node)
        self.authorize(who, resource, namespace)
        return who

    def may_read_services(self, token: str | None, namespace: str) -> bool:
        """Whether `token` may read the services of `namespace` (mesh:services) — for a
        remote watch of every namespace, which leaves out the events of the others."""
        try:
            self.check(token, None, ("mesh", "services", ""), namespace)
        except MeshError:
            return False
        return True

    def admin_token(self, token: str | None, namespace: str | None = None
                    ) -> Principal | None:
        """The principal of an admin token (None without a token; 401/403 otherwise); with
        `namespace`, one that may administer it."""
        if not token:
            return None
        who = self.identify(token, None)
        if "admin" not in (who.scopes or []):
            raise MeshError(403, f"{who.id}{who.where()} is not an admin", id="meshd.auth")
        if namespace is not None:
            self.may_administer(who, namespace)
        return who

    @staticmethod
    def may_administer(who: Principal, namespace: str) -> None:
        """403 unless `who` (an admin) administers `namespace`: admins of default (and nodes
        holding an issuer key) administer every namespace, an admin of NS only NS."""
        if "admin" not in (who.scopes or []):
            raise MeshError(403, f"{who.id}{who.where()} is not an admin", id="meshd.auth")
        if who.namespace in (DEFAULT, EVERY, namespace):
            return
        admins = f"{namespace!r} or of {DEFAULT!r}" if namespace != DEFAULT else repr(DEFAULT)
        raise MeshError(403, f"{who.id} is an admin of namespace {who.namespace!r}, not of "
                             f"{namespace!r}: only admins of {admins} administer it",
                        id="meshd.auth")

    # --- accounts, tokens ------------------------------------------------------------------

    async def create_account(self, id: str, secret: str, scopes: list[str], type: str = "user",
                             metadata: dict[str, Any] | None = None,
                             namespace: str = DEFAULT) -> dict[str, Any]:
        if not id or len(id) > 128 or ":" in id:
            raise bad_request("account id must be 1..128 characters without ':'")
        if type not in ("user", "service"):
            raise bad_request("account type must be user or service")
        if len(secret) < 8:
            raise bad_request("the secret must have at least 8 characters")
        bad = [s for s in scopes if ":" in s]
        if bad:
            raise bad_request(f"an account's scopes are plain names ({bad[0]!r} has ':'); "
                              "NS:SCOPE is for rules, naming another namespace's scope")
        rec = {"type": type, "scopes": list(scopes), "metadata": metadata or {},
               "secret": hash_secret(secret)}
        await self._write(ns_table("accounts", namespace), id, rec)
        return {"id": id, "type": type, "scopes": list(scopes), "namespace": namespace}

    def accounts(self, namespace: str = DEFAULT) -> list[dict[str, Any]]:
        return [{"id": k, "type": v.get("type"), "scopes": v.get("scopes", []),
                 "disabled": bool(v.get("disabled")), "namespace": namespace}
                for k, v in sorted(self._records(ns_table("accounts", namespace)).items())
                if isinstance(v, dict)]

    def account_counts(self) -> dict[str, int]:
        """The number of accounts of each namespace that has any."""
        out = {}
        for db, table in list(self.store.rep.state.tables):
            ns = table_namespace(table, "accounts") if db == DB else None
            if ns is not None:
                n = sum(1 for v in self._records(table).values() if isinstance(v, dict))
                if n:
                    out[ns] = n
        return out

    async def delete_account(self, id: str, namespace: str = DEFAULT) -> None:
        table = ns_table("accounts", namespace)
        if self._get(table, id) is None:
            where = "" if namespace == DEFAULT else f" in namespace {namespace!r}"
            raise not_found(f"no account {id!r}{where}", id="meshd.auth")
        await self._write(table, id, None)

    def check_login(self, id: str, secret: str, source: str,
                    per_node: bool = False, namespace: str = DEFAULT) -> list[str]:
        """The account's scopes if id/secret are right (rate-limited per account and per
        source, or per member node for logins it forwards); else 401/429."""
        self._limit(self._login_by_account, f"{namespace}/{id}")
        self._limit(self._login_by_node if per_node else self._login_by_source, source)
        account = self._get(ns_table("accounts", namespace), id)
        secret_ok = isinstance(account, dict) and check_secret(secret,
                                                               str(account.get("secret", "")))
        if not secret_ok or account.get("disabled"):
            log.info("failed login for %r from %s", id, source)
            raise MeshError(401, "wrong account id or secret", id="meshd.auth")
        return list(account.get("scopes", []))

    @staticmethod
    def _limit(bucket: TokenBuckets, key: str) -> None:
        """429 once `key` has used up its share of login attempts in `bucket`."""
        wait = bucket.take(key, time.monotonic())
        if wait:
            raise too_many(f"too many login attempts; try again in {wait:.0f} s",
                           id="meshd.auth")

    async def tokens_for(self, sub: str, scopes: list[str], namespace: str = DEFAULT
                         ) -> dict[str, Any]:
        cid = self.cluster_id
        access = await self.sign(make_claims(sub, scopes, self.node, cid, self.access_ttl,
                                             ns=namespace))
        refresh = await self.sign(make_claims(sub, scopes, self.node, cid, self.refresh_ttl,
                                              typ="refresh", ns=namespace))
        return {"account": sub, "scopes": scopes, "token": access, "refresh_token": refresh,
                "expires_in": int(self.access_ttl), "namespace": namespace}

    def check_refresh(self, refresh_token: str) -> tuple[str, list[str], str]:
        """(account, its scopes now, its namespace) of a valid refresh token; else 401."""
        self.verifier.audience = self.cluster_id
        try:
            claims = self.verifier.verify(refresh_token, typ="refresh")
            ns = self._principal(claims).namespace
        except TokenError as exc:
            log.info("refused a refresh token: %s", exc)
            raise MeshError(401, "invalid token", id="meshd.auth") from None
        account = self._get(ns_table("accounts", ns), claims["sub"])
        if not isinstance(account, dict) or account.get("disabled"):
            raise MeshError(401, "invalid token", id="meshd.auth")
        return claims["sub"], list(account.get("scopes", [])), ns

    async def login(self, id: str, secret: str, source: str, namespace: str = DEFAULT
                    ) -> dict[str, Any]:
        """Tokens for an account of `namespace`: here if we hold a current key, else from a
        signer."""
        if self._token_key() is None:
            # the signer limits per account and per asking node; the caller's source is
            # known here only, so its limit is applied here, before anything is forwarded
            self._limit(self._login_by_source, source)
            request = {"op": "login", "id": id, "secret": secret, "source": source}
            if namespace != DEFAULT:  # an older signer would not know it: say it only then
                request["namespace"] = namespace
            reply = await self.remote.ask(request)
            self._expect_namespace(reply.get("token") if isinstance(reply, dict) else None,
                                   namespace)
            return reply
        return await self.tokens_for(id, self.check_login(id, secret, source,
                                                          namespace=namespace), namespace)

    @staticmethod
    def _expect_namespace(token: Any, namespace: str) -> None:
        """A signer's token must be of the namespace asked for (a signer that predates
        namespaces would sign one of default): 503 otherwise."""
        try:
            claims = unverified_claims(token)
        except TokenError:
            raise MeshError(503, "the signer answered without a token", id="meshd.auth"
                            ) from None
        if claims.get("ns", DEFAULT) != namespace:
            raise MeshError(503, f"the signer gave a token of namespace "
                                 f"{claims.get('ns', DEFAULT)!r}, not {namespace!r} (it may "
                                 "predate namespaces: upgrade it)", id="meshd.auth")

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        if self._token_key() is None:
            return await self.remote.ask({"op": "refresh", "refresh_token": refresh_token})
        return await self.tokens_for(*self.check_refresh(refresh_token))

    async def create_token(self, account_id: str, ttl: float, namespace: str = DEFAULT
                           ) -> dict[str, Any]:
        account = self._get(ns_table("accounts", namespace), account_id)
        if account is None:
            where = "" if namespace == DEFAULT else f" in namespace {namespace!r}"
            raise not_found(f"no account {account_id!r}{where}", id="meshd.auth")
        if not 0 < ttl <= self.refresh_ttl:
            raise bad_request(f"ttl must be between 1 and {self.refresh_ttl:.0f} seconds")
        token = await self.sign(make_claims(account_id, account.get("scopes", []), self.node,
                                            self.cluster_id, ttl, ns=namespace))
        return {"token": token, "account": account_id, "expires_in": int(ttl),
                "namespace": namespace}

    async def service_token(self, service: str, namespace: str = DEFAULT) -> str | None:
        """A token for a service registered here in `namespace` (from a signer if we hold
        no key)."""
        if not self.bootstrapped():
            return None
        try:
            if self._token_key() is None:
                request = {"op": "service", "service": service}
                if namespace != DEFAULT:
                    request["namespace"] = namespace
                reply = await self.remote.ask(request)
                token = reply.get("token") if isinstance(reply, dict) else None
                self._expect_namespace(token, namespace)
                return token
            return await self.service_token_for(service, self.node, namespace=namespace)
        except MeshError as exc:
            log.info("no service token for %s in %s: %s", service, namespace, exc.detail)
            return None

    async def service_token_for(self, service: str, node: str, node_id: str = "",
                                namespace: str = DEFAULT) -> str:
        """Sign a service token for `service` of `namespace` on `node` (its id in `nid`, so
        the token dies with a revocation of the node whatever it is called): its own scope
        only."""
        claims = make_claims(f"service:{service}", SERVICE_SCOPES, node, self.cluster_id,
                             86400.0, ns=namespace)
        claims["nid"] = node_id or self.links.identity.node_id
        return await self.sign(claims)

    def revocation_of(self, token: str) -> tuple[str, float]:
        """(token id, seconds to keep the revocation) of a token this cluster signed."""
        try:
            claims = unverified_claims(token)
        except TokenError as exc:
            raise bad_request(f"that is not a token: {exc}") from None
        jti, exp = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI \
                or not isinstance(exp, int | float):
            raise bad_request("that token has no id (of at most 64 characters) or expiry")
        return jti, max(60.0, exp - time.time() + self.verifier.leeway)

    def signed_here(self, token: str) -> bool:
        """Whether a token carries a valid signature of a trusted key (expiry and
        revocation aside): proof enough to revoke it."""
        import pyseto
        from pyseto import Key

        try:
            kid = Verifier._kid(token)
        except TokenError:
            return False
        info = self._trusted().keys.get(kid)
        if info is None:
            return False
        try:
            pyseto.decode(Key.new(version=4, purpose="public", key=info.pem.encode()), token)
        except Exception:  # pyseto raises several types for bad signatures and formats
            return False
        return True

    async def revoke(self, token: str) -> dict[str, Any]:
        """Revoke a token this cluster signed (the signature is the proof: anything else is
        a 403, so nobody can fill the auth database with made-up revocations)."""
        jti, keep = self.revocation_of(token)
        if not self.signed_here(token):
            raise MeshError(403, "only a token this cluster signed can be revoked this way",
                            id="meshd.auth")
        await self._write("revoked", jti, {"exp": time.time() + keep}, ttl=keep)
        return {"revoked": jti}

    # --- rules -----------------------------------------------------------------------------

    async def create_rule(self, id: str, resource: str, scope: str, access: str,
                          priority: int, namespace: str = DEFAULT) -> dict[str, Any]:
        try:
            rule = make_rule(id, resource, scope, access, priority)
        except RuleError as exc:
            raise bad_request(str(exc)) from None
        if ":" in scope:
            other, _, name = scope.partition(":")
            namespaces.check(other)  # 400 naming what a namespace may be
            if not name or ":" in name:
                raise bad_request(f"scope {scope!r}: NS:SCOPE names one scope of namespace NS")
        await self._seed_rules(namespace)
        await self._write(ns_table("rules", namespace), id,
                          {k: v for k, v in rule.to_dict().items() if k != "id"})
        return {**rule.to_dict(), "namespace": namespace}

    async def _seed_rules(self, namespace: str) -> None:
        """Before the first rule of its own, a namespace other than default gets the three
        default rules written (until now default's rules governed it): adding a rule never
        shuts its nodes, services and admins out."""
        if namespace == DEFAULT or self._namespace_rules(namespace)[2]:
            return
        for rule in DEFAULT_RULES:
            await self._write(ns_table("rules", namespace), rule.id,
                              {k: v for k, v in rule.to_dict().items() if k != "id"})

    async def delete_rule(self, id: str, namespace: str = DEFAULT) -> None:
        await self._seed_rules(namespace)
        table = ns_table("rules", namespace)
        if self._get(table, id) is None:
            where = "" if namespace == DEFAULT else f" in namespace {namespace!r}"
            raise not_found(f"no rule {id!r}{where}", id="meshd.auth")
        await self._write(table, id, None)

    def list_rules(self, namespace: str = DEFAULT) -> list[dict[str, Any]]:
        return [{**r.to_dict(), "namespace": namespace}
                for r in sorted(self.rules(namespace), key=lambda r: (-r.priority, r.id))]

    # --- revoked nodes ---------------------------------------------------------------------

    async def revoke_node(self, node_id: str, name: str, by: str) -> dict[str, Any]:
        if len(node_id) != 26 or not node_id.isalnum():
            raise bad_request("a node id has 26 characters (see `meshd members --json`)")
        rec = {"name": name, "revoked": time.time(), "by": by}
        await self._write("nodes", node_id, rec)
        log.warning("node %s (%s) revoked by %s", name or "?", node_id, by)
        return {"id": node_id, **rec}

    def revocations(self) -> list[dict[str, Any]]:
        return [{"id": k, **v} for k, v in sorted(self._records("nodes").items())
                if isinstance(v, dict)]


def resource(kind: str, name: str, endpoint: str = "") -> tuple[str, str, str]:
    parse_resource(f"{kind}:{name or '-'}:{endpoint}")
    return kind, name, endpoint


async def wait_for_service(auth: AuthService, service: str, node: str,
                           namespace: str = DEFAULT, timeout: float = 3.0) -> bool:
    """Whether `service` of `namespace` is (or within `timeout` becomes) registered on `node`
    here: the registry entry of a fresh instance may arrive just after its token request."""
    with trio.move_on_after(timeout):
        while not auth.service_on_node(service, node, namespace):
            await trio.sleep(0.05)
        return True
    return False

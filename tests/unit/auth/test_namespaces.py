"""Auth namespaces: which rules decide for a caller of one namespace on a resource of another,
who administers which namespace, and that per-namespace records are signed like the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshd.auth import records
from meshd.auth.records import KEYS, Trust
from meshd.auth.rules import decide, make_rule, scopes_in
from meshd.auth.service import (
    DEFAULT_RULES,
    EVERY,
    AuthService,
    Principal,
    ns_table,
    table_namespace,
)
from meshd.auth.tokens import issue, make_claims, new_signing_key, unverified_claims
from meshd.errors import MeshError

R = make_rule
SVC = ("service", "greeter", "Greeter.Hello")
TEAM_A_RULES = [*DEFAULT_RULES,
                R("b-devs", "service:greeter:*", "team-b:dev", "granted"),
                R("any-a", "store:*:*", "*", "granted"),
                R("pub", "service:docs:*", "", "granted")]


@pytest.mark.parametrize("caller, scopes, target, expect", [
    # own namespace: plain scopes and their qualified forms, a member ("*" counts)
    ("team-a", ["dev"], "team-a", (["dev", "team-a:dev"], True)),
    # another namespace: only the qualified forms, not a member
    ("team-b", ["dev", "admin"], "team-a", (["team-b:dev", "team-b:admin"], False)),
    # a node is at home everywhere
    (None, ["node"], "team-a", (["node", "team-a:node"], True)),
    # an admin of default counts as the target's own
    ("default", ["admin"], "team-a", (["admin", "default:admin"], True)),
    # a default account that is not an admin is a stranger in team-a
    ("default", ["dev"], "team-a", (["default:dev"], False)),
    # an admin of team-a is a stranger in default
    ("team-a", ["admin"], "default", (["team-a:admin"], False)),
    # anonymous stays anonymous
    ("team-a", None, "team-b", (None, False)),
    # scopes with ':' in a token count for nothing (only rules may qualify a scope)
    ("team-b", ["team-a:dev"], "team-a", ([], False)),
    ("team-a", ["team-a:admin", "dev"], "team-a", (["dev", "team-a:dev"], True)),
])
def test_the_scopes_a_caller_holds_in_a_namespace(caller, scopes, target, expect):
    assert scopes_in(caller, scopes, target) == expect


@pytest.mark.parametrize("caller, scopes, resource, allowed, winner", [
    ("team-a", ["service"], SVC, True, "default-services"),
    ("team-b", ["service"], SVC, False, None),  # team-b's services: not team-a's defaults
    ("team-b", ["dev"], SVC, True, "b-devs"),  # named by a team-a rule
    ("team-c", ["dev"], SVC, False, None),  # team-b:dev is not team-c:dev
    ("team-a", ["dev"], SVC, False, None),  # team-a's own dev: no rule for it
    ("team-a", ["dev"], ("store", "x", "y"), True, "any-a"),  # "*": any account of team-a
    ("team-b", ["dev"], ("store", "x", "y"), False, None),  # ... not of team-b
    ("team-b", ["admin"], SVC, False, None),  # team-b's admin is nobody in team-a
    ("default", ["admin"], SVC, True, "default-admin"),  # default's admin reaches it
    ("default", ["dev"], ("store", "x", "y"), False, None),
    (None, ["node"], SVC, True, "default-nodes"),
    ("team-b", ["dev"], ("service", "docs", "Get"), True, "pub"),  # public is public
])
def test_decisions_across_namespaces(caller, scopes, resource, allowed, winner):
    held, member = scopes_in(caller, scopes, "team-a")
    ok, rule = decide(TEAM_A_RULES, held, resource, member)
    assert (ok, rule.id if rule else None) == (allowed, winner)


def test_a_star_rule_counts_members_only():
    star = [R("any", "*:*:*", "*", "granted")]
    assert decide(star, [], SVC, member=True)[0] is True
    assert decide(star, ["x"], SVC, member=False) == (False, None)
    assert decide(star, ["x"], SVC)[0] is True  # the default: as before namespaces


class Harness(AuthService):
    """The real authorize() over given rules per namespace (no store, no keys)."""

    def __init__(self, rules: dict[str, list[Any]]) -> None:
        self.by_ns = rules
        self._decisions = {}
        self.stats = {"auth_denied": 0}

    def bootstrapped(self) -> bool:
        return True

    def _namespace_rules(self, namespace: str) -> tuple[Any, list[Any], bool]:
        """A namespace's own rules, else default's (as AuthService._namespace_rules)."""
        own = self.by_ns.get(namespace)
        governing = own or self.by_ns.get("default") or list(DEFAULT_RULES)
        return (namespace, governing, bool(own))


def denial(auth: AuthService, who: Principal, namespace: str) -> tuple[int, str]:
    with pytest.raises(MeshError) as err:
        auth.authorize(who, SVC, namespace)
    return err.value.status, err.value.detail


def test_authorize_in_a_namespace_without_rules_uses_the_default_rules():
    auth = Harness({})
    auth.authorize(Principal("service:caller", ["service"], "token", "team-a"), SVC, "team-a")
    auth.authorize(Principal("node:n1", ["node"], "node", EVERY), SVC, "team-z")
    auth.authorize(Principal("admin", ["admin"], "token", "default"), SVC, "team-z")
    status, detail = denial(auth, Principal("service:caller", ["service"], "token", "team-b"),
                            "team-a")
    assert status == 403
    assert detail == ("service:caller may not access service:greeter:Greeter.Hello in "
                      "namespace 'team-a': no rule grants it (service:caller is of namespace "
                      "'team-b': only rules of 'team-a' with scope 'team-b:SCOPE' let it in)")
    assert auth.stats["auth_denied"] == 1


def test_a_namespace_without_rules_of_its_own_is_governed_by_default_for_default_s_accounts():
    # rules written before namespaces (config:payments for default's devs) keep deciding
    default = [*DEFAULT_RULES, R("dev-payments", "config:payments:*", "dev", "granted")]
    auth = Harness({"default": default})
    ada = Principal("ada", ["dev"], "token", "default")
    auth.authorize(ada, ("config", "payments", "db.host"), "payments")
    # another namespace's dev gets nothing from them
    status, _ = denial(auth, Principal("bob", ["dev"], "token", "team-b"), "payments")
    assert status == 403
    # once the namespace has rules of its own, default's accounts are visitors there
    auth = Harness({"default": default,
                    "payments": [*DEFAULT_RULES, R("x", "config:*:*", "ops", "granted")]})
    with pytest.raises(MeshError) as err:
        auth.authorize(ada, ("config", "payments", "db.host"), "payments")
    assert err.value.status == 403 and "only rules of 'payments' with scope 'default:SCOPE'" \
        in err.value.detail


def test_authorize_names_the_rule_and_the_namespace():
    auth = Harness({"team-a": [*DEFAULT_RULES, R("no-b", "service:greeter:*", "team-b:dev",
                                                  "denied", 5)]})
    status, detail = denial(auth, Principal("bob", ["dev"], "token", "team-b"), "team-a")
    assert status == 403 and detail.startswith(
        "bob may not access service:greeter:Greeter.Hello in namespace 'team-a': rule "
        "'no-b' denies it")
    status, detail = denial(auth, Principal("anonymous", None, "anonymous", EVERY), "team-a")
    assert (status, detail) == (401, "service:greeter:Greeter.Hello in namespace 'team-a' "
                                     "needs a token with access (no rule grants it)")


def test_denials_in_default_read_as_before_namespaces():
    auth = Harness({"default": [R("x", "store:*:*", "dev", "granted")]})
    status, detail = denial(auth, Principal("ada", ["dev"], "token"), "default")
    assert (status, detail) == (403, "ada may not access service:greeter:Greeter.Hello: no "
                                     "rule grants it")


def test_decisions_are_cached_per_namespace():
    auth = Harness({"team-a": [R("g", "service:*:*", "team-b:dev", "granted")]})
    bob = Principal("bob", ["dev"], "token", "team-b")
    auth.authorize(bob, SVC, "team-a")
    status, _ = denial(auth, bob, "team-c")  # team-c: default rules, nothing for team-b
    assert status == 403
    auth.authorize(bob, SVC, "team-a")  # the cached team-a decision still grants


@pytest.mark.parametrize("who, namespace, ok", [
    (Principal("admin", ["admin"], "token", "default"), "team-b", True),
    (Principal("admin", ["admin"], "token", "default"), "default", True),
    (Principal("ann", ["admin"], "token", "team-a"), "team-a", True),
    (Principal("ann", ["admin"], "token", "team-a"), "team-b", False),
    (Principal("ann", ["admin"], "token", "team-a"), "default", False),
    (Principal("node:n1", ["admin"], "node"), "team-b", True),  # a node holding a key
    (Principal("bob", ["dev"], "token", "team-b"), "team-b", False),
])
def test_who_administers_which_namespace(who, namespace, ok):
    if ok:
        AuthService.may_administer(who, namespace)
        return
    with pytest.raises(MeshError) as err:
        AuthService.may_administer(who, namespace)
    assert err.value.status == 403


def test_a_team_a_admin_is_told_why_it_may_not_administer_team_b():
    with pytest.raises(MeshError) as err:
        AuthService.may_administer(Principal("ann", ["admin"], "token", "team-a"), "team-b")
    assert err.value.detail == ("ann is an admin of namespace 'team-a', not of 'team-b': only "
                                "admins of 'team-b' or of 'default' administer it")


def test_default_keeps_its_tables_and_other_namespaces_get_their_own():
    assert ns_table("accounts", "default") == "accounts"
    assert ns_table("rules", "team-a") == "rules@team-a"
    assert table_namespace("accounts", "accounts") == "default"
    assert table_namespace("accounts@team-a", "accounts") == "team-a"
    assert table_namespace("rules@team-a", "accounts") is None
    assert table_namespace("accounts@", "accounts") is None


def test_tokens_carry_their_namespace_and_default_stays_implicit():
    assert "ns" not in make_claims("ada", [], "n1", "c", 60)
    assert make_claims("ada", [], "n1", "c", 60, ns="team-a")["ns"] == "team-a"
    kid, private, _ = new_signing_key()
    token = issue(kid, private, make_claims("ada", [], "n1", "c", 60, ns="team-a"))
    assert unverified_claims(token)["ns"] == "team-a"


def test_a_namespace_record_cannot_be_moved_to_another_namespace():
    kid, private_pem, public = new_signing_key()
    root = (kid, records.load_private(private_pem), public.decode())
    trust = Trust(pin=records.fingerprint(root[2]))
    raw_key = json.dumps({"public": root[2], "signer": "n", "created": 1.0}).encode()
    trust.refresh({kid: [[1, 0, "n"], raw_key,
                         records.sign(kid, root[1], KEYS, kid, (1, 0, "n"), raw_key, None),
                         None]}, {})
    raw = json.dumps({"scopes": ["admin"], "type": "user"}).encode()
    meta = records.sign(kid, root[1], "accounts@team-a", "ann", (2, 0, "n"), raw, None)
    reg = [[2, 0, "n"], raw, meta, None]
    assert trust.check("accounts@team-a", "ann", reg) is None
    assert trust.check("accounts", "ann", reg) == "bad signature"  # not default's admin
    assert trust.check("accounts@team-b", "ann", reg) == "bad signature"
    rogue_kid, rogue_pem, _ = new_signing_key()
    forged = [[3, 0, "n"], raw, records.sign(rogue_kid, records.load_private(rogue_pem),
                                             "accounts@team-b", "eve", (3, 0, "n"), raw,
                                             None), None]
    assert "untrusted" in trust.check("accounts@team-b", "eve", forged)

"""The rules engine (sans-IO): who may reach which resource.

Rules (as in Micro):
- A resource is "type:name:endpoint", type one of service, store, config, topic, tunnel,
  web, mesh (reads of the mesh's own state by remote environments: mesh:members,
  mesh:services, mesh:routes, mesh:store, mesh:tunnels, mesh:status); a rule's resource
  may use "*" (any) or a trailing "*" (prefix) in each part.
- A rule's scope: "" is public (anyone, even with no identity), "*" is any authenticated
  caller, anything else must be one of the caller's scopes.
- Of the rules that match, the highest priority decides; at equal priority a denial beats
  a grant. No matching rule: denied.
- Namespaces (`scopes_in`): rules belong to a namespace and decide for its resources. A
  caller of namespace P holds, in namespace R, its scopes as they are when P == R (or it is
  a node, or an admin of "default": those count as R's own), plus "P:SCOPE" for each; in
  another namespace it holds only the "P:SCOPE" forms and "*" (any authenticated caller)
  does not count it: "*" means any account of R. So a rule of team-a with scope
  "team-b:dev" lets team-b's devs in, and nothing else of team-b's gets in. A scope
  containing ":" in a token counts for nothing (account scopes are plain names).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

RESOURCE_TYPES = ("service", "store", "config", "topic", "tunnel", "web", "mesh")


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    id: str
    resource: str
    scope: str
    access: str  # "granted" | "denied"
    priority: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "resource": self.resource, "scope": self.scope,
                "access": self.access, "priority": self.priority}


def parse_resource(text: str, pattern: bool = False) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) == 2:
        parts.append("*" if pattern else "")
    if len(parts) != 3 or not all(parts[:2]):
        raise RuleError(f"resource {text!r} must look like TYPE:NAME:ENDPOINT "
                        f"(TYPE one of {', '.join(RESOURCE_TYPES)}, '*' allowed)")
    if parts[0] not in RESOURCE_TYPES and not (pattern and parts[0] == "*"):
        raise RuleError(f"resource type {parts[0]!r} is not one of {', '.join(RESOURCE_TYPES)}")
    return parts[0], parts[1], parts[2]


def make_rule(id: str, resource: str, scope: str, access: str, priority: int = 0) -> Rule:
    if not id:
        raise RuleError("a rule needs an id")
    parse_resource(resource, pattern=True)
    if access not in ("granted", "denied"):
        raise RuleError("access must be granted or denied")
    return Rule(id, resource, scope, access, int(priority))


def _matches(rule: Rule, resource: tuple[str, str, str]) -> bool:
    pattern = parse_resource(rule.resource, pattern=True)
    return all(fnmatchcase(value, pat) for pat, value in zip(pattern, resource, strict=True))


def _scope_ok(rule: Rule, scopes: list[str] | None, member: bool) -> bool:
    if rule.scope == "":
        return True
    if scopes is None:
        return False
    return (rule.scope == "*" and member) or rule.scope in scopes


def scopes_in(caller_ns: str | None, scopes: list[str] | None, target_ns: str,
              default_ns: str = "default") -> tuple[list[str] | None, bool]:
    """The scopes a caller of namespace `caller_ns` (None: a node, at home in every
    namespace) holds in namespace `target_ns`, and whether it is one of that namespace's own
    (what "*" rules grant to); scopes None (anonymous) stays None."""
    if scopes is None:
        return None, False
    plain = [s for s in scopes if ":" not in s]
    if caller_ns is None or caller_ns == target_ns \
            or (caller_ns == default_ns and "admin" in plain):
        home = caller_ns or target_ns
        return plain + [f"{home}:{s}" for s in plain], True
    return [f"{caller_ns}:{s}" for s in plain], False


def decide(rules: list[Rule], scopes: list[str] | None,
           resource: tuple[str, str, str], member: bool = True) -> tuple[bool, Rule | None]:
    """(allowed, the rule that decided); scopes None means an anonymous caller; `member`
    False: the caller is of another namespace ("*" rules do not count it)."""
    applicable = [r for r in rules if _scope_ok(r, scopes, member) and _matches(r, resource)]
    if not applicable:
        return False, None
    applicable.sort(key=lambda r: (-r.priority, r.access != "denied", r.id))
    winner = applicable[0]
    return winner.access == "granted", winner

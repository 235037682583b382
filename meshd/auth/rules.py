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


def _scope_ok(rule: Rule, scopes: list[str] | None) -> bool:
    if rule.scope == "":
        return True
    if scopes is None:
        return False
    return rule.scope == "*" or rule.scope in scopes


def decide(rules: list[Rule], scopes: list[str] | None,
           resource: tuple[str, str, str]) -> tuple[bool, Rule | None]:
    """(allowed, the rule that decided); scopes None means an anonymous caller."""
    applicable = [r for r in rules if _scope_ok(r, scopes) and _matches(r, resource)]
    if not applicable:
        return False, None
    applicable.sort(key=lambda r: (-r.priority, r.access != "denied", r.id))
    winner = applicable[0]
    return winner.access == "granted", winner

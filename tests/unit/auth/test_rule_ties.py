"""Rule ties: at equal priority a denial beats a grant whatever the rules' ids or order.

The table in test_auth.py has one tie whose ids ("d" < "g") sort the denial first anyway;
here the grant's id sorts first, and the rules come in both orders.
"""

from __future__ import annotations

import itertools

import pytest

from meshd.auth.rules import decide, make_rule

RESOURCE = ("service", "pay", "Charge")


@pytest.mark.parametrize("grant_id, deny_id", [("a-grant", "z-deny"), ("z-grant", "a-deny")])
def test_at_equal_priority_the_denial_wins_whatever_the_ids(grant_id, deny_id):
    grant = make_rule(grant_id, "service:pay:*", "dev", "granted", 5)
    deny = make_rule(deny_id, "service:*:*", "dev", "denied", 5)
    for rules in itertools.permutations([grant, deny]):
        allowed, rule = decide(list(rules), ["dev"], RESOURCE)
        assert allowed is False
        assert rule is deny


def test_a_higher_priority_grant_still_beats_a_denial_with_a_smaller_id():
    grant = make_rule("z-grant", "service:pay:*", "dev", "granted", 6)
    deny = make_rule("a-deny", "service:pay:*", "dev", "denied", 5)
    assert decide([deny, grant], ["dev"], RESOURCE) == (True, grant)


def test_among_equal_grants_the_smallest_id_decides_in_any_order():
    rules = [make_rule(i, "service:pay:*", "*", "granted") for i in ("m", "b", "x")]
    for order in itertools.permutations(rules):
        assert decide(list(order), ["dev"], RESOURCE)[1].id == "b"

"""Resources and rules as written: what parses, what a short form means, what is refused.

make_rule is called inside each test (not in a parametrize list) so that a broken
make_rule fails here at run time rather than at collection.
"""

from __future__ import annotations

import pytest

from meshd.auth.rules import RuleError, decide, make_rule, parse_resource


def test_a_two_part_pattern_means_any_endpoint_and_a_two_part_resource_none():
    assert parse_resource("service:orders", pattern=True) == ("service", "orders", "*")
    assert parse_resource("service:orders") == ("service", "orders", "")


def test_a_two_part_rule_covers_every_endpoint_of_its_service():
    rule = make_rule("r", "service:orders", "dev", "granted")
    assert decide([rule], ["dev"], ("service", "orders", "List")) == (True, rule)
    assert decide([rule], ["dev"], ("service", "other", "List")) == (False, None)


@pytest.mark.parametrize("text", ["service", "service::x", ":orders:x", "a:b:c:d", ""])
def test_malformed_resources_are_refused(text):
    with pytest.raises(RuleError, match="TYPE:NAME:ENDPOINT"):
        parse_resource(text, pattern=True)


def test_an_empty_endpoint_is_allowed():
    assert parse_resource("store:db:") == ("store", "db", "")


def test_a_wildcard_type_is_a_pattern_only():
    assert parse_resource("*:x:y", pattern=True) == ("*", "x", "y")
    with pytest.raises(RuleError, match="not one of"):
        parse_resource("*:x:y")
    with pytest.raises(RuleError, match="'nosuch' is not one of"):
        parse_resource("nosuch:*:*", pattern=True)


def test_make_rule_keeps_every_field_and_defaults_to_priority_zero():
    rule = make_rule("r1", "store:db:*", "ops", "denied", "7")
    assert rule.to_dict() == {"id": "r1", "resource": "store:db:*", "scope": "ops",
                              "access": "denied", "priority": 7}
    assert make_rule("r2", "store:db:*", "ops", "granted").priority == 0


def test_make_rule_refuses_what_cannot_be_a_rule():
    with pytest.raises(RuleError, match="needs an id"):
        make_rule("", "service:a:b", "", "granted")
    with pytest.raises(RuleError, match="granted or denied"):
        make_rule("x", "service:a:b", "", "allow")
    with pytest.raises(RuleError):
        make_rule("x", "*:a:b:c", "", "granted")
    assert make_rule("x", "*:a:b", "", "granted").resource == "*:a:b"


def test_a_rule_with_no_match_on_one_part_does_not_apply():
    rule = make_rule("r", "service:orders:Get*", "*", "granted")
    assert decide([rule], [], ("service", "orders", "GetOne"))[0] is True
    assert decide([rule], [], ("service", "orders", "Put"))[0] is False
    assert decide([rule], [], ("store", "orders", "GetOne"))[0] is False

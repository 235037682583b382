"""Namespace names: what `check` accepts, what it refuses (a 400 saying what is allowed),
and MESHD_NAMESPACE."""

from __future__ import annotations

import pytest

from meshd import namespaces
from meshd.errors import MeshError


@pytest.mark.parametrize("given", [None, ""])
def test_nothing_named_is_the_default_namespace(given):
    assert namespaces.check(given) == "default"


@pytest.mark.parametrize("name", ["default", "team-a", "a", "0", "-", "x" * 63, "a1-b2"])
def test_valid_names_are_kept_as_they_are(name):
    assert namespaces.check(name) == name


@pytest.mark.parametrize("name", ["Team-a", "team_a", "team.a", "team a", "x" * 64, "ä",
                                  "team/a", "a\n", 5, ["a"], b"a"])
def test_invalid_names_are_a_400_saying_what_is_allowed(name):
    with pytest.raises(MeshError) as exc:
        namespaces.check(name)
    assert exc.value.status == 400
    assert "invalid namespace" in exc.value.detail
    assert "(allowed: [a-z0-9-]{1,63})" in exc.value.detail
    assert "\n" not in str(exc.value), "the CLI prints it as one line"


def test_a_very_long_name_is_shortened_in_the_message():
    with pytest.raises(MeshError) as exc:
        namespaces.check("y" * 10_000)
    assert len(exc.value.detail) < 250


def test_from_env(monkeypatch):
    monkeypatch.delenv("MESHD_NAMESPACE", raising=False)
    assert namespaces.from_env() == "default"
    monkeypatch.setenv("MESHD_NAMESPACE", "")
    assert namespaces.from_env() == "default"
    monkeypatch.setenv("MESHD_NAMESPACE", "team-a")
    assert namespaces.from_env() == "team-a"
    monkeypatch.setenv("MESHD_NAMESPACE", "Team-A")
    with pytest.raises(MeshError) as exc:
        namespaces.from_env()
    assert exc.value.status == 400


def test_a_record_naming_no_namespace_is_in_the_default_one():
    assert namespaces.of({"service": "greeter"}) == "default"
    assert namespaces.of({"service": "greeter", "namespace": ""}) == "default"
    assert namespaces.of(None) == "default"
    assert namespaces.of({"namespace": "team-a"}) == "team-a"

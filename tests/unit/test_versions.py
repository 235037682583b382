"""Wire protocol versions (meshd/versions.py): the highest common version is used, only a
peer with none in common is refused (naming both ranges), and tags are read defensively."""

from __future__ import annotations

import pytest

from meshd import versions
from meshd.errors import MeshError
from meshd.membership.messages import DecodeError, decode_packet
from meshd.versions import BASELINE, PROTOCOLS, Range, VersionError


def test_the_highest_version_both_speak_is_used():
    mine = {"link": Range(2, 4)}
    assert versions.use("link", {"link": Range(1, 3)}, mine=mine) == 3
    assert versions.use("link", {"link": Range(4, 9)}, mine=mine) == 4
    assert versions.use("link", {"link": Range(2, 2)}, mine=mine) == 2


def test_no_version_in_common_is_refused_naming_both_ranges():
    with pytest.raises(VersionError) as exc:
        versions.use("link", {"link": Range(5, 6)}, "node b", mine={"link": Range(2, 4)})
    assert exc.value.status == 426
    assert "this node speaks 2..4, node b speaks 5..6" in exc.value.detail
    with pytest.raises(VersionError) as exc:
        versions.check("link", 7, "node b", mine={"link": Range(2, 2)})
    assert "node b spoke version 7, this node speaks 2" in exc.value.detail
    assert versions.check("link", 2, mine={"link": Range(2, 2)}) == 2
    for bad in (True, "2", None, 2.0):
        with pytest.raises(VersionError):
            versions.check("link", bad, mine={"link": Range(2, 2)})


def test_the_tag_round_trips_and_a_bad_tag_is_the_baseline():
    assert versions.parse(versions.tag()) == PROTOCOLS
    assert versions.parse(None) == BASELINE and versions.parse("") == BASELINE
    for bad in ("link=3", "link=3-2", "link=a-b", "x" * 300, ",".join(["a=1-1"] * 20),
                "link=1-9999999", "=1-2", "link=²-3"):
        assert versions.parse(bad) == BASELINE, bad
    mixed = versions.parse("link=2-5,future=1-1")
    assert mixed["link"] == Range(2, 5) and mixed["membership"] == BASELINE["membership"]


def test_a_client_offer_is_negotiated_or_refused():
    assert versions.offered("proxy", None) == BASELINE["proxy"].high
    assert versions.offered("proxy", versions.mine("proxy")) == PROTOCOLS["proxy"].high
    with pytest.raises(VersionError):
        versions.offered("proxy", [90, 99])
    for bad in ([1], [2, 1], ["1", "2"], "1-2", [True, 2], [-1, 1]):
        with pytest.raises(MeshError) as exc:
            versions.offered("proxy", bad)
        assert exc.value.status == 400, bad


def test_a_membership_packet_of_an_unknown_version_names_the_range():
    import cbor2
    with pytest.raises(DecodeError) as exc:
        decode_packet(cbor2.dumps([99, [[0]]]))
    assert "version 99" in str(exc.value) and str(PROTOCOLS["membership"]) in str(exc.value)

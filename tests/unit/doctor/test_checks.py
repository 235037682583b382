"""`meshd doctor`'s findings (meshd/doctor/checks.py): each planted fault is found and named
with a fix; a healthy cluster is all ok."""

from __future__ import annotations

from meshd.doctor import checks

HEALTHY = {"name": "b", "address": "10.0.0.2:7946", "rtt_ms": 0.4, "offset_ms": 3.0,
           "version": "1.0", "udp_out_age_s": 1.0, "udp_out_unreached": False,
           "udp_in_age_s": 1.2, "udp_in_unreached": False}


def test_a_healthy_member_is_ok():
    [f] = checks.member_reachability([HEALTHY])
    assert f.level == "ok" and "UDP both ways" in f.detail and f.fix == ""


def test_udp_blocked_in_either_direction_fails_naming_the_direction():
    out = checks.member_reachability([{**HEALTHY, "udp_out_unreached": True}])[0]
    assert out.level == "fail" and "our UDP probes" in out.detail and "UDP" in out.fix
    into = checks.member_reachability([{**HEALTHY, "udp_in_age_s": 300.0}])[0]
    assert into.level == "fail" and "b's UDP probes" in into.detail
    never = checks.member_reachability([{**HEALTHY, "udp_in_age_s": None}])[0]
    assert never.level == "fail"


def test_no_tcp_round_trip_fails():
    [f] = checks.member_reachability([{"name": "b", "address": "10.0.0.2:7946",
                                       "error": "connection refused"}])
    assert f.level == "fail" and "TCP" in f.detail and "10.0.0.2:7946" in f.fix


def test_loopback_advertise_fails_only_when_others_are_remote():
    members = [{"name": "a", "address": "127.0.0.1:7946"},
               {"name": "b", "address": "10.0.0.2:7946"}]
    f = checks.advertise("a", "127.0.0.1:7946", members)
    assert f.level == "fail" and "--advertise" in f.fix and "b" in f.detail
    assert checks.advertise("a", "127.0.0.1:7946", members[:1]).level == "ok"
    local = [{"name": "a", "address": "127.0.0.1:7946"}, {"name": "c", "address": "[::1]:7"}]
    assert checks.advertise("a", "127.0.0.1:7946", local).level == "ok"
    assert checks.advertise("a", "10.0.0.1:7946", members).level == "ok"
    assert checks.is_loopback("ws://localhost:80") and checks.is_loopback("[::1]:7946")
    assert not checks.is_loopback("10.0.0.1:7946") and not checks.is_loopback("example:1")


def test_skewed_clocks_warn_past_half_the_bound_and_fail_past_it():
    def clock(offset_ms: float) -> checks.Finding:
        return checks.clocks([{**HEALTHY, "offset_ms": offset_ms}, HEALTHY], 60.0)
    assert clock(5_000).level == "ok"
    warned = clock(-31_000)
    assert warned.level == "warn" and "31.000 s (to b)" in warned.detail
    failed = clock(61_000)
    assert failed.level == "fail" and "refused" in failed.detail and "NTP" in failed.fix
    assert checks.clocks([], 60.0).level == "ok"
    assert checks.clocks([{"name": "b", "error": "x"}], 60.0).level == "warn"


def test_a_secret_readable_by_others_fails():
    f = checks.data_dir_modes("/d", 0o40700, [("keyring.json", 0o100644),
                                               ("node.key", 0o100600)])
    assert f.level == "fail" and "keyring.json (644)" in f.detail and "node.key" not in f.detail
    assert "chmod" in f.fix
    loose_dir = checks.data_dir_modes("/d", 0o40755, [])
    assert loose_dir.level == "fail" and "/d itself (755)" in loose_dir.detail
    assert checks.data_dir_modes("/d", 0o40700, [("a", 0o100600)]).level == "ok"
    assert checks.data_dir_modes("/d", None, []).level == "fail"


def test_a_second_daemon_on_the_data_dir_fails():
    assert checks.daemons("/d", 10, 10, []).level == "ok"
    other = checks.daemons("/d", 10, 10, [11])
    assert other.level == "fail" and "11" in other.detail
    split = checks.daemons("/d", 10, 12, [])
    assert split.level == "fail" and "lock" in split.detail


def test_version_skew_warns_with_who_runs_what():
    f = checks.versions("1.1", [HEALTHY, {**HEALTHY, "name": "c", "version": "1.1"}])
    assert f.level == "warn" and "1.0 on b" in f.detail and "rolling upgrade" in f.fix
    assert checks.versions("1.0", [HEALTHY]).level == "ok"


def test_secret_ring_states():
    assert checks.secret_ring({"count": 1}).level == "ok"
    assert checks.secret_ring({"count": 2}).level == "warn"
    assert checks.secret_ring({"count": 0}).level == "fail"
    assert checks.secret_ring(None).level == "warn"


def test_certificates_warn_before_expiry_and_fail_after():
    assert checks.certificate("tls", "/c.pem", 90.0).level == "ok"
    assert checks.certificate("tls", "/c.pem", 3.0).level == "warn"
    assert checks.certificate("tls", "/c.pem", -1.0).level == "fail"
    assert checks.certificate("tls", "/c.pem", None, "cannot read it").level == "fail"


def test_no_daemon_fails_and_worst_orders_levels():
    f = checks.daemon(None, "connection refused")
    assert f.level == "fail" and "meshd up" in f.fix
    ok, warn, fail = (checks.Finding("x", level, "") for level in ("ok", "warn", "fail"))
    assert checks.worst([ok, warn]) == "warn" and checks.worst([warn, fail, ok]) == "fail"
    assert checks.worst([ok]) == "ok"

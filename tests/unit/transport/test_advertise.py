"""Choosing the advertised address from /proc texts and interface addresses (no host I/O)."""

from __future__ import annotations

from meshd.transport import advertise
from meshd.transport.advertise import choose

HEADER = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\t"
          "IRTT\n")
# a host with a default route via eth0 and a docker bridge
ROUTE_ETH0 = HEADER + (
    "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    "eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n")
ADDRS = {"lo": "127.0.0.1", "eth0": "10.0.0.5", "docker0": "172.17.0.1"}


def never() -> list[str]:
    raise AssertionError("the host name must not be resolved when an interface answers")


def test_default_route_interface_wins_over_a_loopback_host_name():
    chosen = choose(ROUTE_ETH0, ADDRS, never, hostname="web1")
    assert chosen.host == "10.0.0.5"
    assert chosen.describe() == ("advertising 10.0.0.5, the address of eth0 (default route); "
                                 "pass --advertise to change it")


def test_lowest_metric_default_route_is_taken_and_down_routes_are_ignored():
    route = HEADER + (
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "tun0\t00000000\t00000000\t0000\t0\t0\t1\t00000000\t0\t0\t0\n")  # not RTF_UP
    assert advertise.default_route_interfaces(route) == ["eth0", "wlan0"]
    addrs = {"eth0": "10.0.0.5", "wlan0": "192.168.1.7", "tun0": "10.8.0.2"}
    assert choose(route, addrs, never).host == "10.0.0.5"


def test_default_route_interface_without_an_address_falls_to_the_next():
    route = HEADER + (
        "ppp0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth1\t00000000\t0100000A\t0003\t0\t0\t50\t00000000\t0\t0\t0\n")
    assert choose(route, {"eth1": "10.1.0.9"}, never).reason == \
        "the address of eth1 (default route)"


def test_only_private_address_when_no_default_route():
    route = HEADER + "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    chosen = choose(route, {"lo": "127.0.0.1", "eth1": "192.168.5.20",
                            "eth2": "203.0.113.9"}, never)
    assert chosen.host == "192.168.5.20"
    assert "only private address (on eth1)" in chosen.reason


def test_several_private_addresses_and_no_route_fall_back_to_the_host_name():
    addrs = {"eth1": "192.168.5.20", "eth2": "10.9.0.1"}
    chosen = choose(HEADER, addrs, lambda: ["127.0.1.1", "198.51.100.4"], hostname="web1")
    assert chosen.host == "198.51.100.4"
    assert chosen.reason == ("the address web1 resolves to (no default route and 2 private "
                             "addresses)")


def test_loopback_host_name_and_nothing_else_gives_127_0_0_1_and_says_why():
    chosen = choose("", {"lo": "127.0.0.1"}, lambda: ["127.0.1.1"], hostname="web1")
    assert chosen.host == "127.0.0.1"
    assert "no other host can reach this node" in chosen.reason


IPV6_ROUTE = (
    # fe80::/64 on eth0, the default route via eth0, and lo's unreachable default (reject)
    "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n")
IF_INET6 = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "fe800000000000000000000000000001 02 40 20 80     eth0\n"
    "20010db8000000000000000000000042 02 40 00 01     eth0\n"  # temporary: skipped
    "20010db8000000000000000000000007 02 40 00 80     eth0\n")


def test_ipv6_default_route_only_when_bound_to_ipv6():
    assert advertise.default_route_interfaces_v6(IPV6_ROUTE) == ["eth0"]
    assert advertise.ipv6_addresses(IF_INET6) == {"eth0": ["2001:db8::7"]}
    chosen = choose("", {}, lambda: [], route_v6=IPV6_ROUTE, if_inet6=IF_INET6, ipv6=True)
    assert (chosen.host, chosen.reason) == ("2001:db8::7",
                                            "the address of eth0 (IPv6 default route)")
    # an IPv4 socket cannot use it
    v4only = choose("", {}, lambda: ["2001:db8::7"], route_v6=IPV6_ROUTE, if_inet6=IF_INET6)
    assert v4only.host == "127.0.0.1"


def test_malformed_lines_are_ignored():
    route = HEADER + "garbage\nzz\tXYZ\t0\t0003\t0\t0\tten\t0\n" + \
        "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    assert advertise.default_route_interfaces(route) == ["eth0"]
    assert advertise.ipv6_addresses("nothing here\n") == {}

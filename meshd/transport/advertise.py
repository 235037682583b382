"""The address a node advertises when it binds to all interfaces and no --advertise is given.

A host name that maps to a loopback address (Debian's default /etc/hosts: `127.0.1.1 HOST`)
says nothing about how other hosts reach us, so the host name comes late. In order:

1. the IPv4 address of the interface that carries the default route (lowest metric first):
   the way out of this host is the way in for the others (Consul does the same);
2. only when bound to `::`: the global IPv6 address of the interface carrying the IPv6
   default route;
3. the only private address (RFC 1918; ULA fc00::/7 when bound to `::`) of any interface;
   with several, none is picked: which one peers can reach is the operator's call;
4. a non-loopback address the host name resolves to;
5. 127.0.0.1: only this host can reach it, and the reason says so.

Rules:
- Nothing here sends a packet: routes come from /proc/net/route and /proc/net/ipv6_route,
  addresses from ioctl(SIOCGIFADDR) on an unconnected socket and /proc/net/if_inet6. The host
  name is resolved only when steps 1-3 found nothing (the resolver may ask DNS).
- Parsing is pure: `choose` takes file contents, interface addresses and a resolver, so
  tests inject them. Unreadable files and failing ioctls count as "nothing found".
- The result carries a one-line reason for the operator's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ROUTE_V4 = "/proc/net/route"
ROUTE_V6 = "/proc/net/ipv6_route"
IF_INET6 = "/proc/net/if_inet6"

SIOCGIFADDR = 0x8915
RTF_UP = 0x0001
RTF_REJECT = 0x0200
# /proc/net/if_inet6 flags of addresses nobody should be told to use
_IFA_UNUSABLE = 0x01 | 0x08 | 0x20 | 0x40  # temporary, dad failed, deprecated, tentative
_PRIVATE_V4 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                      "192.168.0.0/16"))
_ULA = ipaddress.ip_network("fc00::/7")


@dataclass(frozen=True, slots=True)
class Advertised:
    """The chosen host (an IP literal) and why it was chosen."""

    host: str
    reason: str

    def describe(self) -> str:
        """The log line, e.g. "advertising 10.0.0.5, the address of eth0 (default route);
        pass --advertise to change it"."""
        return f"advertising {self.host}, {self.reason}; pass --advertise to change it"


def default_route_interfaces(route_text: str) -> list[str]:
    """Interfaces with an IPv4 default route (destination and mask 0, up), lowest metric
    first, from the text of /proc/net/route."""
    found: list[tuple[int, int, str]] = []
    for i, line in enumerate(route_text.splitlines()[1:]):
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, flags, metric, mask = fields[0], fields[1], fields[3], fields[6], fields[7]
        try:
            if int(dest, 16) or int(mask, 16) or not int(flags, 16) & RTF_UP:
                continue
            found.append((int(metric), i, iface))
        except ValueError:
            continue
    return [iface for _, _, iface in sorted(found)]


def default_route_interfaces_v6(route_text: str) -> list[str]:
    """Interfaces with a usable IPv6 default route (::/0, up, not a reject route, not lo),
    lowest metric first, from the text of /proc/net/ipv6_route."""
    found: list[tuple[int, int, str]] = []
    for i, line in enumerate(route_text.splitlines()):
        fields = line.split()
        if len(fields) < 10:
            continue
        dest, plen, metric, flags, iface = fields[0], fields[1], fields[5], fields[8], fields[9]
        try:
            if int(dest, 16) or int(plen, 16) or iface == "lo":
                continue
            bits = int(flags, 16)
            if not bits & RTF_UP or bits & RTF_REJECT:
                continue
            found.append((int(metric, 16), i, iface))
        except ValueError:
            continue
    return [iface for _, _, iface in sorted(found)]


def ipv6_addresses(if_inet6_text: str) -> dict[str, list[str]]:
    """Usable global-scope IPv6 addresses per interface, from /proc/net/if_inet6."""
    out: dict[str, list[str]] = {}
    for line in if_inet6_text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        hexaddr, scope, flags, iface = fields[0], fields[3], fields[4], fields[5]
        try:
            if int(scope, 16) != 0 or int(flags, 16) & _IFA_UNUSABLE or len(hexaddr) != 32:
                continue
            addr = ipaddress.IPv6Address(bytes.fromhex(hexaddr))
        except ValueError:
            continue
        out.setdefault(iface, []).append(str(addr))
    return out


def _usable(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast)


def _is_private(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return any(ip in net for net in _PRIVATE_V4)
    return ip in _ULA


def choose(route_v4: str, ipv4: Mapping[str, str], resolve: Callable[[], list[str]],
           route_v6: str = "", if_inet6: str = "", ipv6: bool = False,
           hostname: str = "") -> Advertised:
    """Pick the address to advertise (see the module docstring for the order).

    route_v4, route_v6, if_inet6: the texts of the /proc files; ipv4: each interface's IPv4
    address; resolve: the host name's addresses (called only if needed); ipv6: whether an
    IPv6 address may be chosen (the node is bound to `::`)."""
    for iface in default_route_interfaces(route_v4):
        host = ipv4.get(iface, "")
        if _usable(host):
            return Advertised(host, f"the address of {iface} (default route)")
    v6 = ipv6_addresses(if_inet6) if ipv6 else {}
    if ipv6:
        for iface in default_route_interfaces_v6(route_v6):
            for host in v6.get(iface, []):
                if _usable(host):
                    return Advertised(host, f"the address of {iface} (IPv6 default route)")
    private = {(host, iface) for iface, host in ipv4.items()
               if _usable(host) and _is_private(host)}
    private |= {(host, iface) for iface, hosts in v6.items() for host in hosts
                if _usable(host) and _is_private(host)}
    if len(private) == 1:
        host, iface = private.pop()
        return Advertised(host, f"the only private address (on {iface}); no interface "
                                "carries a default route")
    why = "no default route" + (f" and {len(private)} private addresses" if private else "")
    name = hostname or "this host's name"
    for host in resolve():
        if _usable(host) and (ipv6 or ":" not in host):
            return Advertised(host, f"the address {name} resolves to ({why})")
    return Advertised("127.0.0.1", f"a loopback address: {why}, and {name} resolves to no "
                                   "other address, so no other host can reach this node")


def interface_ipv4() -> dict[str, str]:
    """Each interface's (primary) IPv4 address, by ioctl(SIOCGIFADDR): no packet is sent."""
    out: dict[str, str] = {}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            if len(name.encode()) > 15:
                continue
            try:
                ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                    struct.pack("256s", name.encode()))
            except OSError:  # no IPv4 address on it
                continue
            out[name] = socket.inet_ntoa(ifreq[20:24])
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def resolve_hostname(hostname: str, ipv6: bool) -> list[str]:
    """Addresses of the host name from the system resolver (/etc/hosts first, usually)."""
    family = socket.AF_UNSPEC if ipv6 else socket.AF_INET
    addrs: list[str] = []
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(hostname, None, family, socket.SOCK_DGRAM):
            host = str(info[4][0]).split("%")[0]
            if host not in addrs:
                addrs.append(host)
    return addrs


def guess(ipv6: bool = False) -> Advertised:
    """The address to advertise on this host (ipv6: the node is bound to `::`)."""
    hostname = socket.gethostname()
    return choose(_read(ROUTE_V4), interface_ipv4(),
                  lambda: resolve_hostname(hostname, ipv6),
                  route_v6=_read(ROUTE_V6) if ipv6 else "",
                  if_inet6=_read(IF_INET6) if ipv6 else "", ipv6=ipv6, hostname=hostname)

"""Addresses as text: "host:port" or "[v6]:port"."""

from __future__ import annotations

import ipaddress


class AddressError(ValueError):
    pass


def parse(addr: str, default_port: int | None = None) -> tuple[str, int]:
    text = addr.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise AddressError(f"bad address {addr!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise AddressError(f"bad address {addr!r}: write IPv6 as [addr]:port")
    else:
        host, port_text = text, ""
    if not host:
        raise AddressError(f"bad address {addr!r}: no host")
    if not port_text:
        if default_port is None:
            raise AddressError(f"bad address {addr!r}: no port (HOST:PORT)")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"bad address {addr!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"bad address {addr!r}: port out of range")
    return host, port


def format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

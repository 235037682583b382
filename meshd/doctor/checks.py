"""Findings of `meshd doctor` from facts, one line each (sans-IO: nothing here reads the
host, the network or the clock).

Rules:
- A finding is (check, level, detail, fix): level "ok", "warn" (works, but will bite) or
  "fail" (broken now); `fix` says what to do, in one line, when it is not ok.
- Every check that could not run says so as a "warn" naming why (the daemon is down, a
  member did not answer), never silence: a doctor that says nothing proves nothing.
- Thresholds: clock offsets past half the HLC drift bound warn, past the bound fail (the
  store refuses such writes); certificates expiring within CERT_WARN_DAYS warn, expired
  fail; UDP silent for SILENT_AFTER seconds in a direction fails (probes then go through
  others and the node looks flaky).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Level = Literal["ok", "warn", "fail"]
CERT_WARN_DAYS = 14
SILENT_AFTER = 30.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


def worst(findings: Iterable[Finding]) -> Level:
    levels = {f.level for f in findings}
    return "fail" if "fail" in levels else "warn" if "warn" in levels else "ok"


def _host(addr: str) -> str:
    addr = addr.split("://", 1)[-1]
    if addr.startswith("["):
        return addr[1:addr.index("]")]
    return addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr


def is_loopback(addr: str) -> bool:
    host = _host(addr)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def daemon(status: dict[str, Any] | None, error: str = "") -> Finding:
    if status is None:
        return Finding("daemon", "fail", f"no daemon answers: {error}",
                       "start it (`meshd up`), or point at it with --data-dir / MESHD_ADDR")
    return ok("daemon", f"{status.get('name')} ({status.get('version', '?')}) up "
                        f"{status.get('uptime_s', 0)} s, advertising {status.get('address')}")


def advertise(me: str, address: str, members: list[dict[str, Any]]) -> Finding:
    """Loopback advertised while other members are elsewhere: they cannot reach it."""
    remote = [m["name"] for m in members
              if m.get("name") != me and not is_loopback(str(m.get("address", "")))]
    if is_loopback(address) and remote:
        return Finding("advertise", "fail",
                       f"advertises loopback {address} while {', '.join(sorted(remote)[:5])} "
                       "are on other hosts: they cannot reach it",
                       "restart with --advertise HOST:PORT (an address the others reach) "
                       "or --bind on that interface")
    return ok("advertise", f"advertises {address}")


def member_reachability(reports: list[dict[str, Any]]) -> list[Finding]:
    """One finding per member from probe.py's reports (UDP each way, TCP round trip)."""
    out = []
    for r in reports:
        name = r["name"]
        if r.get("error"):
            out.append(Finding(f"member {name}", "fail",
                               f"no TCP round trip over the link: {r['error']}",
                               f"let TCP through to {r.get('address')} (and back): links, "
                               "RPC and replication ride on it"))
            continue
        problems = []
        if not _udp_fine(r.get("udp_out_age_s"), r.get("udp_out_unreached")):
            problems.append(f"our UDP probes get no direct answer from {name}")
        if not _udp_fine(r.get("udp_in_age_s"), r.get("udp_in_unreached")):
            problems.append(f"{name}'s UDP probes get no direct answer from us")
        if problems:
            out.append(Finding(f"member {name}", "fail",
                               "; ".join(problems) + f" (TCP works: {r['rtt_ms']} ms)",
                               f"let UDP through both ways between this host and "
                               f"{r.get('address')} (same port as TCP); failure detection "
                               "relies on it"))
        else:
            out.append(ok(f"member {name}",
                          f"UDP both ways, TCP {r['rtt_ms']} ms, version {r.get('version')}"))
    return out


def _udp_fine(age: float | None, unreached: bool | None) -> bool:
    return bool(age is not None and age <= SILENT_AFTER and not unreached)


def clocks(reports: list[dict[str, Any]], bound_s: float) -> Finding:
    measured = [(abs(r["offset_ms"]) / 1000, r["name"]) for r in reports
                if r.get("offset_ms") is not None]
    if not measured:
        return Finding("clock", "warn" if reports else "ok",
                       "no member answered, offsets not measured" if reports else
                       "no other members to compare with")
    far, name = max(measured)
    detail = f"largest offset {far:.3f} s (to {name}); the bound is {bound_s:g} s"
    fix = "run NTP (chrony, systemd-timesyncd) on every host"
    if far > bound_s:
        return Finding("clock", "fail", detail + ": writes across it are refused", fix)
    if far > bound_s / 2:
        return Finding("clock", "warn", detail, fix)
    return ok("clock", detail)


def versions(mine: str, reports: list[dict[str, Any]]) -> Finding:
    seen: dict[str, list[str]] = {}
    for r in reports:
        if r.get("version"):
            seen.setdefault(str(r["version"]), []).append(r["name"])
    others = {v: n for v, n in seen.items() if v != mine}
    if not others:
        return ok("versions", f"every member answering runs {mine}")
    text = ", ".join(f"{v} on {', '.join(sorted(n)[:3])}" for v, n in sorted(others.items()))
    return Finding("versions", "warn", f"this node runs {mine}; {text}",
                   "finish the rolling upgrade (one host at a time; docs/operations.md)")


def data_dir_modes(data_dir: str, dir_mode: int | None,
                   files: list[tuple[str, int]]) -> Finding:
    """The data dir and the secrets in it readable by no one but the daemon's user."""
    if dir_mode is None:
        return Finding("data dir", "fail", f"{data_dir} does not exist",
                       "give the daemon's --data-dir")
    loose = [f"{name} ({mode & 0o777:o})" for name, mode in files if mode & 0o077]
    if dir_mode & 0o077:
        loose.insert(0, f"{data_dir} itself ({dir_mode & 0o777:o})")
    if loose:
        return Finding("data dir", "fail",
                       "readable by others: " + ", ".join(loose[:6])
                       + (f" and {len(loose) - 6} more" if len(loose) > 6 else ""),
                       f"chmod 700 {data_dir} && chmod 600 the files named (they hold the "
                       "cluster secret and keys)")
    return ok("data dir", f"{data_dir}: 700, {len(files)} files 600")


def daemons(data_dir: str, lock_pid: int | None, status_pid: int | None,
            others: list[int]) -> Finding:
    """One daemon per data dir: the lock's holder is the one answering, and no other meshd
    process names this data dir."""
    if others:
        return Finding("one daemon", "fail",
                       f"other meshd processes use {data_dir}: pid "
                       + ", ".join(map(str, others[:5])),
                       "stop them: two daemons on one data dir fight over its socket")
    if lock_pid is not None and status_pid is not None and lock_pid != status_pid:
        return Finding("one daemon", "fail",
                       f"the data dir's lock is held by pid {lock_pid} but pid {status_pid} "
                       "answers on its socket",
                       "stop both and start one `meshd up` on this data dir")
    return ok("one daemon", f"pid {status_pid or lock_pid or '?'} holds {data_dir}")


def secret_ring(ring: dict[str, Any] | None) -> Finding:
    if ring is None:
        return Finding("secret ring", "warn", "the keyring could not be read",
                       "check the data dir (meshd keys list)")
    count = int(ring.get("count", 0))
    if count == 0:
        return Finding("secret ring", "fail", "the keyring holds no secret",
                       "install the cluster secret: meshd keys install SECRET")
    if count > 1:
        return Finding("secret ring", "warn",
                       f"{count} secrets installed: a rotation is not finished",
                       "once every node uses the new one: meshd keys remove OLD")
    return ok("secret ring", "one secret, in use")


def certificate(what: str, path: str, days_left: float | None, error: str = "") -> Finding:
    if days_left is None:
        return Finding(f"certificate {what}", "fail", f"{path}: {error}",
                       "give a readable PEM certificate")
    if days_left < 0:
        return Finding(f"certificate {what}", "fail",
                       f"{path} expired {-days_left:.0f} days ago",
                       "renew it and restart the daemon")
    if days_left < CERT_WARN_DAYS:
        return Finding(f"certificate {what}", "warn",
                       f"{path} expires in {days_left:.1f} days",
                       "renew it and restart the daemon")
    return ok(f"certificate {what}", f"{path} valid for {days_left:.0f} more days")

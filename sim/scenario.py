"""Scenario files: TOML describing a cluster, its network and the faults to inject.

Rules:
- Every key is checked: an unknown key, a wrong type or an out-of-range value raises
  ScenarioError naming the key, never a traceback from deep inside the engine.
- Faults name node counts as `count` or `fraction` so one scenario runs at any size.
- `--set a.b=value` overrides any top-level, `membership.*`, `network.*`, `broker.*` or
  `nemesis.*` key;
  the value is parsed as a TOML literal (numbers, booleans, strings, arrays).
- A `[broker]` table makes it a broker scenario (sim/brokersim.py parses and runs it); the
  `broker-publish` fault needs one. A `[nemesis]` table (with a [broker] one) makes it a
  nemesis run (sim/nemesis.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.settings import MembershipSettings, SettingsError, membership_profile

from .network import JITTER_KINDS, Link

SCENARIO_DIR = Path(__file__).parent / "scenarios"
FAULT_KINDS = ("crash", "leave", "change", "pause", "partition", "clock_offset", "join", "loss",
               "register", "deregister", "store-writes", "store-deletes", "broker-publish")


class ScenarioError(ValueError):
    """The scenario file or an override is invalid."""


@dataclass(slots=True)
class Fault:
    kind: str
    at: float = 0.0
    count: int | None = None
    fraction: float | None = None
    spacing: float = 0.0
    restart_after: float | None = None
    duration: float = 0.0
    until: float | None = None
    every: tuple[float, float] = (10.0, 60.0)
    pause_dist: str = "uniform"
    pause_min: float = 1.0
    pause_max: float = 5.0
    pause_mean: float = 2.0
    mode: str = "full"
    fractions: tuple[float, ...] = (0.5, 0.5)
    max_s: float = 0.0
    loss: float = 0.0
    rate: float = 10.0
    keys: int = 100
    target: str = "any"  # crash: any node, a "gateway" or an "internal" (non-gateway) one
    zone: str | None = None  # crash: only nodes of this zone


@dataclass(slots=True)
class Zone:
    name: str
    fraction: float
    gateways: int = 0  # > 0: only this many nodes of the zone reach other zones


@dataclass(slots=True)
class Scenario:
    name: str
    description: str = ""
    nodes: int = 100
    duration: float = 120.0
    warmup: float = 10.0
    seed: int = 1
    profile: str = "lan"
    bootstrap: str = "converged"
    codec: bool = False
    registry: bool = False
    registry_sync_interval: float = 5.0
    # registry writes are instances of "greeter" in three namespaces: none named (an old
    # node's record: "default"), "team-a" and "team-b"; the run checks they never mix
    registry_namespaces: bool = False
    store: bool = False
    store_batch_interval: float = 0.05
    store_sync_interval: float = 10.0
    store_tombstone_grace: float = 86400.0
    store_hlc: bool = True
    routing: bool = False
    routing_refresh_interval: float = 30.0
    membership: MembershipSettings = field(default_factory=MembershipSettings)
    link: Link = field(default_factory=Link)
    stream_timeout: float = 10.0
    zones: list[Zone] = field(default_factory=list)
    zone_links: list[tuple[str, str, Link]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    broker: Any = None  # sim.brokersim.BrokerWorkload, from a [broker] table
    nemesis: Any = None  # sim.nemesis.NemesisSettings, from a [nemesis] table


_TOP_KEYS = {"name": str, "description": str, "nodes": int, "duration": float,
             "warmup": float, "seed": int, "profile": str, "bootstrap": str, "codec": bool,
             "registry": bool, "registry_sync_interval": float,
             "registry_namespaces": bool, "store": bool,
             "store_batch_interval": float, "store_sync_interval": float,
             "store_tombstone_grace": float, "store_hlc": bool, "routing": bool,
             "routing_refresh_interval": float}
_NET_KEYS = {"latency_ms": float, "jitter_ms": float, "jitter": str, "loss": float,
             "bandwidth_mbps": float, "stream_timeout": float}
_LINK_KEYS = {"from": str, "to": str, "latency_ms": float, "jitter_ms": float, "jitter": str,
              "loss": float, "bandwidth_mbps": float}
_FAULT_KEYS = {"kind": str, "at": float, "count": int, "fraction": float, "spacing": float,
               "restart_after": float, "duration": float, "until": float, "every": list,
               "pause": dict, "mode": str, "fractions": list, "max_s": float, "loss": float,
               "rate": float, "keys": int, "target": str, "zone": str}


def _check(value: Any, kind: type, where: str) -> Any:
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ScenarioError(f"{where} must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and value < 0:
        raise ScenarioError(f"{where} must not be negative, got {value!r}")
    return value


def _table(raw: Any, keys: dict[str, type], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where} must be a table")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            raise ScenarioError(f"unknown key {where}.{key}; known: {', '.join(sorted(keys))}")
        out[key] = _check(value, keys[key], f"{where}.{key}")
    return out


def _link(raw: dict[str, Any], base: Link, where: str) -> Link:
    jitter_kind = raw.get("jitter", base.jitter_kind)
    if jitter_kind not in JITTER_KINDS:
        raise ScenarioError(f"{where}.jitter must be one of {', '.join(JITTER_KINDS)}")
    loss = raw.get("loss", base.loss)
    if loss > 1:
        raise ScenarioError(f"{where}.loss is a probability between 0 and 1, got {loss}")
    return Link(
        latency=raw["latency_ms"] / 1000 if "latency_ms" in raw else base.latency,
        jitter=raw["jitter_ms"] / 1000 if "jitter_ms" in raw else base.jitter,
        jitter_kind=jitter_kind,
        loss=loss,
        bandwidth=raw["bandwidth_mbps"] * 1e6 / 8 if "bandwidth_mbps" in raw else base.bandwidth,
    )


def _fault(raw: Any, where: str) -> Fault:
    t = _table(raw, _FAULT_KEYS, where)
    kind = t.get("kind")
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}.kind must be one of {', '.join(FAULT_KINDS)}")
    f = Fault(kind=kind)
    for key in ("at", "count", "fraction", "spacing", "restart_after", "duration", "until",
                "max_s", "loss", "rate", "keys", "target", "zone"):
        if key in t:
            setattr(f, key, t[key])
    if f.target not in ("any", "gateway", "internal"):
        raise ScenarioError(f"{where}.target must be 'any', 'gateway' or 'internal'")
    if f.fraction is not None and f.fraction > 1:
        raise ScenarioError(f"{where}.fraction must be between 0 and 1")
    if "every" in t:
        every = t["every"]
        if len(every) != 2 or not all(isinstance(x, int | float) for x in every) \
                or not 0 < every[0] <= every[1]:
            raise ScenarioError(f"{where}.every must be [low, high] seconds with 0 < low <= high")
        f.every = (float(every[0]), float(every[1]))
    if "fractions" in t:
        fr = t["fractions"]
        if len(fr) < 2 or not all(isinstance(x, int | float) and x > 0 for x in fr):
            raise ScenarioError(f"{where}.fractions must list two or more positive numbers")
        f.fractions = tuple(float(x) for x in fr)
    if "mode" in t:
        if t["mode"] not in ("full", "receive"):
            raise ScenarioError(f"{where}.mode must be 'full' or 'receive'")
        f.mode = t["mode"]
    if "pause" in t:
        p = _table(t["pause"], {"dist": str, "min": float, "max": float, "mean": float},
                   f"{where}.pause")
        if p.get("dist", "uniform") not in ("uniform", "exponential", "fixed"):
            raise ScenarioError(f"{where}.pause.dist must be uniform, exponential or fixed")
        f.pause_dist = p.get("dist", "uniform")
        f.pause_min = p.get("min", f.pause_min)
        f.pause_max = p.get("max", f.pause_max)
        f.pause_mean = p.get("mean", f.pause_mean)
        if f.pause_min > f.pause_max:
            raise ScenarioError(f"{where}.pause.min must not exceed pause.max")
    return f


def _parse_literal(text: str, where: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set takes KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_literal(text.strip(), key)
        if len(parts) == 1:
            raw[parts[0]] = value
        elif len(parts) == 2 and parts[0] in ("membership", "network", "broker", "nemesis"):
            raw.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ScenarioError(f"--set key must be NAME, membership.NAME, network.NAME, "
                                f"broker.NAME or nemesis.NAME, got {key!r}")


def resolve_path(name: str) -> Path:
    """A scenario path, or a bare name of one in sim/scenarios/."""
    path = Path(name)
    if path.exists():
        return path
    candidate = SCENARIO_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"no scenario {name!r}: not a file, and not one of: {known}")


def load(name: str, overrides: list[str] | None = None) -> Scenario:
    path = resolve_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror}") from None
    raw.setdefault("name", path.stem)
    apply_overrides(raw, overrides or [])
    return parse(raw)


def parse(raw: dict[str, Any]) -> Scenario:
    raw = dict(raw)
    membership_raw = raw.pop("membership", {})
    network_raw = raw.pop("network", {})
    faults_raw = raw.pop("faults", [])
    broker_raw = raw.pop("broker", None)
    nemesis_raw = raw.pop("nemesis", None)
    top = _table(raw, _TOP_KEYS, "scenario")
    if "name" not in top:
        raise ScenarioError("scenario needs a name")
    sc = Scenario(**top)
    if sc.nodes < 1:
        raise ScenarioError("scenario.nodes must be at least 1")
    if sc.bootstrap not in ("converged", "join"):
        raise ScenarioError("scenario.bootstrap must be 'converged' or 'join'")
    if sc.warmup >= sc.duration:
        raise ScenarioError("scenario.warmup must be shorter than scenario.duration")
    if not isinstance(membership_raw, dict):
        raise ScenarioError("membership must be a table")
    try:
        sc.membership = membership_profile(sc.profile, **membership_raw)
    except SettingsError as exc:
        raise ScenarioError(str(exc)) from None
    if not isinstance(network_raw, dict):
        raise ScenarioError("network must be a table")
    network_raw = dict(network_raw)
    zones_raw = network_raw.pop("zones", [])
    links_raw = network_raw.pop("links", [])
    net = _table(network_raw, _NET_KEYS, "network")
    sc.link = _link(net, Link(), "network")
    sc.stream_timeout = net.get("stream_timeout", sc.stream_timeout)
    for i, z in enumerate(zones_raw):
        zt = _table(z, {"name": str, "fraction": float, "gateways": int},
                    f"network.zones[{i}]")
        if "name" not in zt or "fraction" not in zt:
            raise ScenarioError(f"network.zones[{i}] needs name and fraction")
        sc.zones.append(Zone(zt["name"], zt["fraction"], zt.get("gateways", 0)))
    names = {z.name for z in sc.zones}
    for i, item in enumerate(links_raw):
        lt = _table(item, _LINK_KEYS, f"network.links[{i}]")
        a, b = lt.get("from"), lt.get("to")
        if a not in names or b not in names:
            raise ScenarioError(f"network.links[{i}] must name two zones from network.zones")
        sc.zone_links.append((a, b, _link(lt, sc.link, f"network.links[{i}]")))
    if not isinstance(faults_raw, list):
        raise ScenarioError("faults must be an array of tables ([[faults]])")
    sc.faults = [_fault(f, f"faults[{i}]") for i, f in enumerate(faults_raw)]
    for i, f in enumerate(sc.faults):
        if f.zone is not None and f.zone not in names:
            raise ScenarioError(f"faults[{i}].zone must name a zone from network.zones")
    if broker_raw is not None:
        from .brokersim import parse_broker  # it runs on the engine, which imports us

        sc.broker = parse_broker(broker_raw)
    elif any(f.kind == "broker-publish" for f in sc.faults):
        raise ScenarioError("broker-publish needs a [broker] table in the scenario")
    if nemesis_raw is not None:
        from .nemesis import parse_nemesis  # it runs on the engine, which imports us

        sc.nemesis = parse_nemesis(nemesis_raw)
        if sc.broker is None or not sc.registry or not sc.store:
            raise ScenarioError("a [nemesis] scenario needs a [broker] table, registry = true "
                                "and store = true")
    return sc

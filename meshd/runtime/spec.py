"""A managed service's spec: what `meshd run` asks for, checked, and kept in the store.

Theory of operation: the runtime is declarative. A spec says what should run (name, source,
command, environment, replicas, placement, restart policy, resources); it is written to the
store (replicated, per namespace) and every node's runtime reconciles what it runs against
the specs it reads. This module is sans-IO: parsing and checking only.

Rules:
- A name is 1..63 lowercase letters, digits and '-' (it names processes, checkouts and log
  records on every node), starting with a letter.
- A source is one of:
  - `module:NAME` — an installed Python module, run as `python -m NAME`;
  - a git repository: a URL (`https://`, `ssh://`, `git://`, `file://`, `git@host:path`) or
    a local path ending in `.git` or given with `@REF`, optionally `@REF` (a branch, tag or
    commit; the default branch's head when absent);
  - a local folder (an absolute path: the spec travels to every node, so the folder must
    exist where the service is placed).
  A folder or repository runs `python main.py` in it unless a command is given.
- replicas 1..1000; placement "" (any nodes: the default), `*` (one on every node: replicas
  is ignored), a node name, or `tag=value`; restart `always`, `on-failure` or `never`.
- Environment names are shell-safe (`[A-Za-z_][A-Za-z0-9_]*`) and may not start with
  `MESHD_` (the runtime sets those); `env_from_config` names config paths whose values become
  environment variables.
- A spec carries a version, bumped by each `meshd run`/`meshd update` of it: processes of an
  older version are replaced (a rolling update when the source changed).
Every problem is a 400 naming the field; a spec read back from the store is checked the same
way (a bad record is reported for its name and skipped, never run).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from meshd import namespaces
from meshd.errors import bad_request

ID = "meshd.runtime"
NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESTART = ("always", "on-failure", "never")
GIT_URL = re.compile(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:")
MAX_REPLICAS = 1000
MAX_ENV = 256
MAX_TEXT = 4096


@dataclass(frozen=True)
class Source:
    """Where a service's code comes from: kind "folder", "git" or "module"."""

    kind: str
    location: str  # a folder's path, a repository's path or URL, a module's name
    ref: str = ""  # git only: a branch, tag or commit ("" = the default branch's head)

    def __str__(self) -> str:
        if self.kind == "module":
            return f"module:{self.location}"
        return f"{self.location}@{self.ref}" if self.ref else self.location


@dataclass(frozen=True)
class Spec:
    name: str
    source: Source
    command: tuple[str, ...] = ()  # () = `python main.py` (`python -m NAME` for a module)
    env: dict[str, str] = field(default_factory=dict)
    env_from_config: tuple[str, ...] = ()
    replicas: int = 1
    placement: str = ""  # "" = any nodes; "*" = every node; a node name; tag=value
    restart: str = "always"
    memory_mb: int = 0  # 0 = no limit
    cpu_seconds: int = 0  # 0 = no limit
    namespace: str = namespaces.DEFAULT
    version: int = 1

    @property
    def every_node(self) -> bool:
        return self.placement == "*"

    def to_record(self) -> dict[str, Any]:
        out = asdict(self)
        out["source"] = {"kind": self.source.kind, "location": self.source.location,
                         "ref": self.source.ref}
        out["command"] = list(self.command)
        out["env_from_config"] = list(self.env_from_config)
        return out


def parse_source(text: Any) -> Source:
    """A source as `meshd run` takes it (see the module's rules); 400 when it is none."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise bad_request("source must be a folder, a git repository or module:NAME", id=ID)
    text = text.strip()
    if text.startswith("module:"):
        module = text[len("module:"):]
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", module):
            raise bad_request(f"module:{module} is not a Python module name", id=ID)
        return Source("module", module)
    location, ref = text, ""
    at = text.rfind("@")
    if at > 0 and "/" not in text[at:] and not (GIT_URL.match(text) and at < text.find(":")):
        location, ref = text[:at], text[at + 1:]
        if not ref or not re.fullmatch(r"[\w./-]+", ref) or ref.startswith("-"):
            raise bad_request(f"@{ref} is not a git ref (a branch, tag or commit)", id=ID)
    if GIT_URL.match(location) or location.endswith(".git") or ref:
        return Source("git", location, ref)
    if not location.startswith("/"):
        raise bad_request(f"folder {location!r} must be an absolute path (meshd run makes "
                          "it one)", id=ID)
    return Source("folder", location)


def check_placement(text: Any) -> str:
    """"" (any node), `*`, a node name, or `tag=value`."""
    if text == "":
        return text
    if not isinstance(text, str) or len(text) > 256 or any(
            c.isspace() for c in text):
        raise bad_request("--node must be *, a node name or tag=value", id=ID)
    if "=" in text:
        key, _, value = text.partition("=")
        if not key or not value:
            raise bad_request(f"--node {text!r}: a tag selector is tag=value", id=ID)
    return text


def matches(placement: str, node: str, tags: dict[str, str]) -> bool:
    """Whether a node (its name and tags) is one the placement selects."""
    if placement in ("", "*"):
        return True
    if "=" in placement:
        key, _, value = placement.partition("=")
        return tags.get(key) == value
    return node == placement


def parse_spec(args: dict[str, Any]) -> Spec:
    """A spec from `meshd run`'s (or the store's) fields, checked; 400 naming what is wrong."""
    name = args.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request("name must be 1..63 lowercase letters, digits or '-', starting "
                          "with a letter", id=ID)
    raw_source = args.get("source")
    if isinstance(raw_source, dict):  # a stored record
        kind, location = raw_source.get("kind"), raw_source.get("location")
        ref = raw_source.get("ref") or ""
        if kind not in ("folder", "git", "module") or not isinstance(location, str) \
                or not isinstance(ref, str):
            raise bad_request("source is not a folder, git repository or module", id=ID)
        source = Source(kind, location, ref)
    else:
        source = parse_source(raw_source)
    command = args.get("command") or ()
    if isinstance(command, str):
        command = (command,)
    if not isinstance(command, list | tuple) or not all(
            isinstance(c, str) and c and len(c) <= MAX_TEXT for c in command) \
            or len(command) > 64:
        raise bad_request("command must be a list of words", id=ID)
    env = args.get("env") or {}
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise bad_request(f"env must be at most {MAX_ENV} NAME=value pairs", id=ID)
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise bad_request(f"env name {key!r} is not NAME (letters, digits, _)", id=ID)
        if key.upper().startswith("MESHD_"):
            raise bad_request(f"env {key}: MESHD_* is set by the runtime", id=ID)
        if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
            raise bad_request(f"env {key}: the value must be text", id=ID)
    from_config = args.get("env_from_config") or ()
    if not isinstance(from_config, list | tuple) or not all(
            isinstance(p, str) and 0 < len(p) <= 256 for p in from_config):
        raise bad_request("env_from_config must be config paths", id=ID)
    replicas = args.get("replicas", 1)
    if type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS:
        raise bad_request(f"replicas must be 1..{MAX_REPLICAS}", id=ID)
    restart = args.get("restart") or "always"
    if restart not in RESTART:
        raise bad_request(f"restart must be one of {', '.join(RESTART)}", id=ID)
    limits = {}
    for key in ("memory_mb", "cpu_seconds"):
        value = args.get(key) or 0
        if type(value) is not int or value < 0:
            raise bad_request(f"{key} must be a whole number (0: no limit)", id=ID)
        limits[key] = value
    version = args.get("version", 1)
    if type(version) is not int or version < 1:
        raise bad_request("version must be a positive whole number", id=ID)
    return Spec(name, source, tuple(command), dict(env), tuple(from_config), replicas,
                check_placement(args.get("placement") or ""), restart,
                limits["memory_mb"], limits["cpu_seconds"],
                namespaces.check(args.get("namespace")), version)

"""Environments: where a CLI command or an SDK client acts (Micro's `micro env`).

`local` is the daemon on this machine (its control socket). Any other environment is a
cluster reached through one of its nodes' proxy endpoint (`wss://HOST:PORT`), acting with
the user's token for that environment, without a VPN.

Rules:
- Kept in `<user config dir>/meshd/environments.json` (platformdirs; MESHD_ENV_FILE
  overrides the path), mode 0600, written atomically: a crash never leaves half a file. The
  directory `<user config dir>/meshd` is meshd's own: every save makes it 0700, also when it
  existed with a wider mode. A directory MESHD_ENV_FILE names is the user's (it may be
  shared): it is created 0700 if missing, never changed. A file that cannot be read or
  parsed is an EnvError naming it, never silently replaced.
- `local` is built in: it cannot be added, changed or removed, and it uses the local
  daemon's data dir and token as before.
- The current environment: MESHD_ENV (or the CLI's --env) for one command, else the one
  `meshd env set` chose, else `local`.
- Names: 1..63 characters of a-z, 0-9, '-' and '_'. An unknown name is an EnvError that
  lists the known ones.
- Tokens are per environment: `meshd auth login --env NAME` keeps that environment's
  access and refresh tokens in its entry; they never go to another environment.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .datadir import write_secret_file

LOCAL = "local"
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class EnvError(ValueError):
    """An environment that cannot be used; str() is one line for the user."""


@dataclass
class Environment:
    name: str
    via: str = ""  # wss://HOST:PORT; "" for local
    namespace: str = ""  # the namespace commands use there unless told ("" = default)
    ca_file: str = ""
    token: str = ""
    refresh_token: str = ""

    @property
    def local(self) -> bool:
        return self.name == LOCAL

    def to_dict(self, secrets: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not secrets:
            d.pop("refresh_token")
            d["token"] = bool(self.token)  # whether one is stored, never the token
        return d


def env_file() -> Path:
    given = os.environ.get("MESHD_ENV_FILE")
    if given:
        return Path(given).expanduser()
    return own_dir() / "environments.json"


def own_dir() -> Path:
    """meshd's directory in the user's config dir (where the environments file is kept
    unless MESHD_ENV_FILE says otherwise)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("meshd"))


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise EnvError(f"environment name {name!r} must be 1..63 characters of a-z, 0-9, "
                       "'-' and '_', starting with a letter or digit")
    return name


class Environments:
    """The environments file, loaded; `save()` writes it back."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or env_file()
        self.current_name = LOCAL
        self.envs: dict[str, Environment] = {}
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnvError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("environments", {}),
                                                            dict):
                raise ValueError("not an environments file")
            for name, entry in data.get("environments", {}).items():
                if name == LOCAL or not isinstance(entry, dict) or not NAME.fullmatch(name):
                    continue
                known = {k: str(entry.get(k) or "") for k in
                         ("via", "namespace", "ca_file", "token", "refresh_token")}
                self.envs[name] = Environment(name, **known)
            current = data.get("current", LOCAL)
            self.current_name = current if current in self.envs else LOCAL
        except (ValueError, TypeError) as exc:
            raise EnvError(f"{self.path} is not a valid environments file ({exc}); fix or "
                           "remove it") from None

    def names(self) -> list[str]:
        return [LOCAL, *sorted(self.envs)]

    def get(self, name: str) -> Environment:
        if name == LOCAL:
            return Environment(LOCAL)
        env = self.envs.get(name)
        if env is None:
            raise EnvError(f"no environment named {name!r}; known: {', '.join(self.names())}"
                           " (add one with `meshd env add NAME --via wss://HOST:PORT`)")
        return env

    def current(self, override: str | None = None) -> Environment:
        """--env or MESHD_ENV if given (it must exist), else the chosen one."""
        name = override or os.environ.get("MESHD_ENV") or self.current_name
        return self.get(name)

    def add(self, name: str, via: str, namespace: str = "", ca_file: str = "") -> Environment:
        check_name(name)
        if name == LOCAL:
            raise EnvError("`local` is built in (the daemon on this machine)")
        if name in self.envs:
            raise EnvError(f"environment {name!r} exists; remove it first")
        env = Environment(name, via, namespace, ca_file)
        self.envs[name] = env
        return env

    def remove(self, name: str) -> None:
        if name == LOCAL:
            raise EnvError("`local` is built in and cannot be removed")
        self.get(name)
        del self.envs[name]
        if self.current_name == name:
            self.current_name = LOCAL

    def use(self, name: str) -> None:
        self.get(name)
        self.current_name = name

    def save(self) -> None:
        data = {"current": self.current_name,
                "environments": {n: e.to_dict(secrets=True) for n, e in self.envs.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.parent == own_dir():  # it holds tokens: not readable by others
            os.chmod(self.path.parent, 0o700)
        write_secret_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

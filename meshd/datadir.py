"""The data dir: where a node keeps its identity, keyring, state and control socket.

Rules:
- Default location per platformdirs (user data dir "meshd"); `--data-dir` / MESHD_DATA_DIR
  override it. It is created mode 0700.
- Files holding secrets are created mode 0600 and written atomically (temp file + rename).
- One running node per data dir: an exclusive flock on `meshd.lock`; a second node is
  refused with a message naming the dir.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import platformdirs

LOCK_FILE = "meshd.lock"
SOCKET_FILE = "meshd.sock"
STATE_FILE = "state.json"


def default_data_dir() -> Path:
    env = os.environ.get("MESHD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("meshd"))


def ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_secret_file(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte on."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    write_secret_file(path, json.dumps(value, indent=1, sort_keys=True).encode())


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable or not JSON ({exc}); fix or remove it") from None


class DataDirLocked(RuntimeError):
    pass


class DataDirLock:
    """Held for the node's lifetime; released by the OS if the process dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.path.read_text().strip() or "?"
            raise DataDirLocked(
                f"data dir {self.path.parent} is in use by another meshd (pid {pid}); "
                "stop it or pick another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""The data dir: where a node keeps its identity, keyring, state and control socket.

Rules:
- Default location per platformdirs (user data dir "meshd"); `--data-dir` / MESHD_DATA_DIR
  override it. It is created mode 0700, and an existing one is tightened to 0700.
- A data dir owned by another user is refused (DataDirError): its owner could read or swap
  our keys whatever modes we set, and could loosen them again. A symlinked data dir is
  followed (a dir on another volume is a common, legitimate setup) with a warning: the
  checks apply to the real directory, and whoever may change the link could redirect it.
- Files holding secrets are created mode 0600 and written atomically and durably: a temp
  file opened with O_CREAT|O_EXCL|O_NOFOLLOW (a file or link planted at the temp name is
  removed, never written through), fsynced, renamed over the target, then the directory is
  fsynced so the rename itself survives a crash.
- One running node per data dir: an exclusive flock on `meshd.lock`; a second node is
  refused with a message naming the dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger("meshd.datadir")
LOCK_FILE = "meshd.lock"
SOCKET_FILE = "meshd.sock"
STATE_FILE = "state.json"


def default_data_dir() -> Path:
    env = os.environ.get("MESHD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("meshd"))


class DataDirError(ValueError):
    """The data dir cannot be used safely; str() names it and says what to do."""


def ensure_dir(path: Path) -> Path:
    """Create the data dir 0700, or check and tighten an existing one (see the rules)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise DataDirError(f"cannot create the data dir {path} ({exc.strerror}); pick "
                           "another with --data-dir") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataDirError(f"the data dir {path} is not a directory; pick another with "
                           "--data-dir")
    if path.is_symlink():
        log.warning("data dir %s is a symlink to %s: whoever may change the link can "
                    "redirect meshd's keys", path, path.resolve())
    if st.st_uid != os.geteuid():
        raise DataDirError(f"the data dir {path} belongs to uid {st.st_uid}, not to this "
                           f"user (uid {os.geteuid()}): its owner could read or replace "
                           "the node's keys; use a dir you own (--data-dir) or chown it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise DataDirError(f"cannot make the data dir {path} private ({exc.strerror})"
                               ) from None
        log.info("data dir %s was mode %o; tightened to 0700", path, stat.S_IMODE(st.st_mode))
    return path


def write_secret_file(path: Path, data: bytes) -> None:
    """Write atomically and durably with mode 0600 from the first byte on."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a stale temp (or anything planted there): unlink never follows links
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # exact, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

"""What `meshd doctor` reads on the host itself: the data dir's files and lock, other meshd
processes, certificates (blocking reads, bounded: at most MAX_FILES files, DEPTH levels).

Rules:
- The runtime's checkouts and venvs (data dir `runtime/`) are service code, not secrets: left
  out. Sockets are left out (their mode says nothing).
- Other daemons are found in /proc: processes whose command line is `meshd up` (or
  `-m meshd_cli up`) naming this data dir with --data-dir, or (without one) whose
  MESHD_DATA_DIR names it; only those this user may read.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
from pathlib import Path

MAX_FILES = 2000
DEPTH = 3
SKIP = ("runtime",)
LOCK_FILE = "meshd.lock"


def file_modes(data_dir: Path) -> tuple[int | None, list[tuple[str, int]]]:
    """(the data dir's mode or None if missing, [(relative path, mode)] of its files)."""
    try:
        dir_mode = data_dir.stat().st_mode
    except OSError:
        return None, []
    files: list[tuple[str, int]] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if len(files) >= MAX_FILES:
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            rel = os.path.relpath(entry.path, data_dir)
            if stat.S_ISDIR(st.st_mode):
                if depth < DEPTH and rel not in SKIP:
                    walk(Path(entry.path), depth + 1)
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, st.st_mode))

    walk(data_dir, 1)
    return dir_mode, files


def lock_holder(data_dir: Path, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid holding the data dir's lock now (from the kernel's table of locks: taking the
    lock to test it would make a daemon starting at that moment fail)."""
    try:
        st = (data_dir / LOCK_FILE).lstat()
        table = locks.read_text(errors="replace")
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    for row in table.splitlines()[:100_000]:
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (maj:min:inode, in hex:hex:dec)
        words = row.replace("->", "").split()
        if len(words) < 6 or words[1] != "FLOCK" or not words[4].isdigit():
            continue
        parts = words[5].split(":")
        if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) == st.st_ino:
            try:
                if os.makedev(int(parts[0], 16), int(parts[1], 16)) == st.st_dev:
                    return int(words[4])
            except ValueError:
                continue
    return None


def daemons_of(data_dir: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of `meshd up` processes on `data_dir`: only processes of this user or of the
    data dir's owner count (anyone may name a process `meshd up --data-dir ...`), and their
    paths are compared as written, never resolved (a path another user chose could hang
    a lookup)."""
    want = os.path.realpath(data_dir)
    try:
        owners = {os.getuid(), data_dir.stat().st_uid}
    except OSError:
        owners = {os.getuid()}
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            if entry.stat().st_uid not in owners:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            words = [w.decode(errors="replace") for w in argv if w]
            if "up" not in words or not any(w.endswith(("meshd", "meshd_cli")) or
                                             w.endswith("meshd_cli/__main__.py")
                                             for w in words):
                continue
            named = _flag(words, "--data-dir")
            if named is None:
                env = (entry / "environ").read_bytes().split(b"\0")
                named = next((e.decode(errors="replace").split("=", 1)[1] for e in env
                              if e.startswith(b"MESHD_DATA_DIR=")), None)
            if named is not None and os.path.normpath(
                    os.path.join(_cwd(entry), named)) in (want, os.path.abspath(data_dir)):
                found.append(int(entry.name))
    return sorted(found)


def _flag(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def _cwd(entry: Path) -> str:
    try:
        return os.readlink(entry / "cwd")
    except OSError:
        return "/"


def certificate_days(path: str, now: datetime.datetime | None = None
                     ) -> tuple[float | None, str]:
    """(days until the PEM certificate at `path` expires, or None and why not)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).expanduser().read_bytes())
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror or exc}"
    except ValueError as exc:
        return None, f"not a PEM certificate: {exc}"
    now = now or datetime.datetime.now(datetime.UTC)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400, ""

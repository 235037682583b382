"""What the runtime keeps on disk about the processes it started: a record per replica (its
pid, the process's start time, version), and, with `runtime.keep_on_exit`, its output
files; so a daemon that starts again finds what an earlier one left running.

Theory of operation: every replica's process gets `runtime/procs/NS/NAME/SLOT.json` when it
starts, removed when the runtime stops it or sees it end. A record left behind means the
daemon ended without stopping it: with keep_on_exit on purpose (the process runs on, and is
adopted by the next daemon), otherwise after a crash that its parent-death signal did not
cover. `leftovers()` reads them at start.

Rules:
- A record names a process only while a process with that pid has that start time (from
  /proc/PID/stat, in clock ticks since boot): a pid the kernel gave to another process since
  is not ours, and is never signalled.
- Records are written whole (a temporary file renamed into place); one that does not parse
  is removed.
- Output files (`SLOT.out`, `SLOT.err`) are opened by the process for appending, so the
  daemon may cut them once it has read them (`OutputFile`): they stay small while a daemon
  reads them, and hold what was printed while none did.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import trio

CUT_AT = 1 << 20  # an output file read this far is cut back to empty
POLL_FIRST, POLL_MAX = 0.1, 1.0  # seconds between reads of an output file (more when idle)


@dataclass(frozen=True)
class Leftover:
    namespace: str
    name: str
    slot: str
    pid: int
    start: int  # the process's start time (clock ticks since boot)
    version: int
    revision: str = ""
    started: float = 0.0  # unix time it started
    files: bool = False  # its output goes to SLOT.out and SLOT.err


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first, then ppid, pgrp,
    ...); None when there is no such process, or it is a zombie (it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if not fields or fields[0] == b"Z" else fields


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), None when there is none
    (or it is a zombie)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) >= 20 else None


class ProcFiles:
    def __init__(self, root: Path) -> None:
        self.root = root  # runtime/procs

    def base(self, namespace: str, name: str, slot: str) -> Path:
        return self.root / namespace / name / slot

    def output(self, namespace: str, name: str, slot: str) -> tuple[Path, Path]:
        base = self.base(namespace, name, slot)
        return base.with_suffix(".out"), base.with_suffix(".err")

    def record(self, item: Leftover) -> None:
        path = self.base(item.namespace, item.name, item.slot).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(item.__dict__))
        os.replace(tmp, path)

    def forget(self, namespace: str, name: str, slot: str, outputs: bool = True) -> None:
        base = self.base(namespace, name, slot)
        suffixes = (".json", ".out", ".err") if outputs else (".json",)
        for suffix in suffixes:
            with contextlib.suppress(FileNotFoundError):
                base.with_suffix(suffix).unlink()

    def leftovers(self) -> list[Leftover]:
        """The processes earlier daemons left running (records of gone processes are
        removed)."""
        out = []
        for path in sorted(self.root.glob("*/*/*.json")):
            try:
                item = Leftover(**json.loads(path.read_text()))
                ok = type(item.pid) is int and item.pid > 1 and type(item.start) is int
            except (OSError, ValueError, TypeError):
                ok = False
            if ok and start_time(item.pid) == item.start:
                out.append(item)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        return out


class OutputFile:
    """Reads what a process appends to a file, as a stream of chunks, until `finish()` and
    the file read to its end; cuts the file back to empty once it has read CUT_AT bytes and
    nothing more was written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.finished = False

    def finish(self) -> None:
        self.finished = True

    def __aiter__(self) -> OutputFile:
        return self

    async def __anext__(self) -> bytes:
        wait = POLL_FIRST
        while True:
            last = self.finished
            chunk = self._read()
            if chunk:
                return chunk
            if last:
                raise StopAsyncIteration
            await trio.sleep(wait)
            wait = min(POLL_MAX, wait * 2)

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # cut by someone else: start over
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read(65536)
                self.offset += len(chunk)
                if not chunk and self.offset >= CUT_AT and size == self.offset:
                    os.truncate(self.path, 0)
                    self.offset = 0
                return chunk
        except FileNotFoundError:
            return b""

    async def aclose(self) -> None:
        self.finished = True

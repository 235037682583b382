"""The runtime's process records: a record names a process only while that pid has that
start time (a reused pid is never ours), broken records are dropped, and output files are
read as appended and cut back once read."""

from __future__ import annotations

import os
import subprocess
import sys

import trio

from meshd.runtime import procfiles
from meshd.runtime.procfiles import Leftover, OutputFile, ProcFiles, start_time


def test_records_name_live_processes_only(tmp_path):
    procs = ProcFiles(tmp_path / "procs")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = Leftover("default", "svc", "0", child.pid, start_time(child.pid), 3, "abc",
                        1.5, True)
        procs.record(live)
        # the same pid with another start time: the kernel gave it to another process
        procs.record(Leftover("default", "svc", "1", child.pid, live.start + 1, 3))
        procs.record(Leftover("default", "other", "0", 999_999_999, 1, 1))  # gone
        bad = procs.base("default", "broken", "0").with_suffix(".json")
        bad.parent.mkdir(parents=True)
        bad.write_text("{not json")
        assert procs.leftovers() == [live]
        # what is not a live process is removed, so the next daemon does not look again
        assert [p.name for p in sorted((tmp_path / "procs").rglob("*.json"))] == ["0.json"]
        procs.forget("default", "svc", "0")
        assert procs.leftovers() == []
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) is None


async def test_an_output_file_is_read_as_appended_and_cut_once_read(tmp_path, monkeypatch):
    monkeypatch.setattr(procfiles, "CUT_AT", 10)
    monkeypatch.setattr(procfiles, "POLL_FIRST", 0.01)
    path = tmp_path / "svc.out"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    out = OutputFile(path)
    got = []
    try:
        os.write(fd, b"hello\nworld\n")
        with trio.fail_after(5):
            got.append(await out.__anext__())
            assert got == [b"hello\nworld\n"]
            assert out._read() == b""  # read to the end, past CUT_AT: cut back to empty
            assert path.stat().st_size == 0
            os.write(fd, b"more\n")  # appended after the cut: read from the start
            got.append(await out.__anext__())
        assert got[1] == b"more\n" and path.stat().st_size == 5
        out.finish()
        with trio.fail_after(5):
            assert [chunk async for chunk in out] == []
    finally:
        os.close(fd)

"""Issue 11 item 12 (data dir): an existing data dir is tightened to 0700, one owned by
someone else is refused, and secret files are never written through a planted link and
survive a crash (file and directory fsynced)."""

from __future__ import annotations

import os
import stat

import pytest

from meshd import datadir
from meshd.datadir import ensure_dir, write_secret_file


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_an_existing_wide_data_dir_is_tightened_to_0700(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o755)
    ensure_dir(d)
    assert _mode(d) == 0o700


def test_a_new_data_dir_is_0700(tmp_path):
    d = tmp_path / "a" / "data"
    ensure_dir(d)
    assert _mode(d) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a dir to another user")
def test_a_data_dir_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(datadir.DataDirError, match="belongs to uid 65534"):
        ensure_dir(d)
    assert _mode(d) == 0o755, "not touched"


def test_a_symlinked_data_dir_is_followed_with_a_warning(tmp_path, caplog):
    real = tmp_path / "volume"
    real.mkdir(mode=0o755)
    link = tmp_path / "data"
    link.symlink_to(real)
    ensure_dir(link)
    assert _mode(real) == 0o700
    assert "symlink" in caplog.text


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "data"
    f.write_text("x")
    with pytest.raises(datadir.DataDirError):
        ensure_dir(f)


def test_a_link_planted_at_the_temp_name_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    d = tmp_path / "data"
    ensure_dir(d)
    (d / "identity.key.tmp").symlink_to(target)
    write_secret_file(d / "identity.key", b"secret")
    assert target.read_bytes() == b"precious", "the link's target was written through"
    key = d / "identity.key"
    assert not key.is_symlink() and key.read_bytes() == b"secret"
    assert _mode(key) == 0o600
    assert not (d / "identity.key.tmp").exists()


def test_a_stale_temp_file_is_replaced(tmp_path):
    (tmp_path / "keyring.json.tmp").write_bytes(b"half a keyring from a crash" * 10)
    os.chmod(tmp_path / "keyring.json.tmp", 0o644)
    write_secret_file(tmp_path / "keyring.json", b"{}")
    assert (tmp_path / "keyring.json").read_bytes() == b"{}"
    assert _mode(tmp_path / "keyring.json") == 0o600


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append("dir" if is_dir else "file")
        if is_dir:  # the rename must be done by then, or syncing the dir saves nothing
            assert (tmp_path / "state.json").read_bytes() == b"{}"
        real_fsync(fd)

    monkeypatch.setattr(datadir.os, "fsync", fsync)
    write_secret_file(tmp_path / "state.json", b"{}")
    assert synced == ["file", "dir"]

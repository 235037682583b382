"""The environments file (meshd/envs.py): where it is kept and who may read it."""

from __future__ import annotations

import os
import stat

from meshd.envs import Environments, own_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_saving_makes_meshds_own_config_dir_private_also_when_it_existed(tmp_path,
                                                                         monkeypatch):
    """It holds tokens: a 0755 directory left by something else is tightened (found by
    review: only a directory meshd created itself was 0700)."""
    monkeypatch.delenv("MESHD_ENV_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    d = own_dir()
    assert d == tmp_path / "config" / "meshd"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    envs = Environments()
    envs.add("prod", "wss://gw.example:8443")
    envs.save()
    assert _mode(d) == 0o700
    assert _mode(d / "environments.json") == 0o600
    assert Environments().names() == ["local", "prod"]


def test_a_directory_meshd_env_file_names_is_the_users(tmp_path, monkeypatch):
    """It may be shared (/tmp...): meshd creates it private but never changes it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    monkeypatch.setenv("MESHD_ENV_FILE", str(shared / "envs.json"))
    Environments().save()
    assert _mode(shared) == 0o755
    assert _mode(shared / "envs.json") == 0o600
    monkeypatch.setenv("MESHD_ENV_FILE", str(tmp_path / "new" / "envs.json"))
    Environments().save()
    assert _mode(tmp_path / "new") == 0o700

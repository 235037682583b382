"""How the SDK finds the local daemon: MESHD_ADDR, else <MESHD_DATA_DIR or default>/meshd.sock."""

from __future__ import annotations

import os
from pathlib import Path

from meshd.datadir import default_data_dir


def socket_path(addr: str | os.PathLike[str] | None = None) -> Path:
    if addr is not None:
        return Path(str(addr).removeprefix("unix:")).expanduser()
    env = os.environ.get("MESHD_ADDR")
    if env:
        return Path(env.removeprefix("unix:")).expanduser()
    return default_data_dir() / "meshd.sock"

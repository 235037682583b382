"""The FastAPI frontend on uvicorn, calling greeter through a real daemon
(meshd_sdk.testing): a greeting for a name, the mesh's 400 passed on for a bad one, and
503 when greeter is gone."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from meshd_sdk.testing import cluster

HERE = Path(__file__).resolve().parent
GREETER = HERE.parent / "greeter" / "main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_frontend_calls_greeter_through_the_mesh(tmp_path):
    port = free_port()
    with cluster(1, root=tmp_path / "mesh") as m:
        greeter = m.spawn([sys.executable, str(GREETER)])
        m.wait_service("greeter")
        m.spawn([sys.executable, str(HERE / "main.py")], env={"PORT": str(port)})
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = get(f"{base}/hello/Ada")
                break
            except OSError:  # uvicorn not listening yet
                assert time.monotonic() < deadline, "the frontend did not start"
                time.sleep(0.2)
        assert answer == (200, {"greeting": "Hello Ada"})
        greeter.kill()
        greeter.wait(10)
        deadline = time.monotonic() + 30
        while (status := get(f"{base}/hello/Bo")[0]) == 200:
            assert time.monotonic() < deadline, "greeter's instance never went away"
            time.sleep(0.2)
        assert status in (503, 404), status

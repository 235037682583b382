"""`meshd new`: the files of a new project (a service, a subscriber or a web app).

Theory of operation: `project(name, kind)` returns the project's files as a map of relative
path to text; cli/new.py writes them. What it makes runs as made: `python -m MODULE`
registers with the local daemon, `meshd run .` runs it managed (the runtime runs `main.py`),
and `pytest` in the folder passes, starting a real daemon with meshd_sdk.testing.

Rules:
- NAME is the service's name (lowercase letters, digits and dashes, starting with a letter,
  at most MAX_NAME); its Python module is NAME with dashes as underscores, which must not
  be a keyword or a module Python or meshd already has (`json`, `trio`, `tests`...).
- Nothing here touches the disk or the network.
"""

from __future__ import annotations

import keyword
import re
import sys

from meshd.errors import MeshError

KINDS = ("service", "subscriber", "web")
MAX_NAME = 40
NAME = re.compile(r"[a-z][a-z0-9-]*\Z")
TAKEN = {"tests", "main", "meshd", "meshd_sdk", "meshd_cli", "meshd_sim", "trio", "pytest",
         "hypercorn", "cryptography", "cbor2", "click", "setuptools"}


def check_name(name: str) -> str:
    """The project's Python module name; 400 when NAME is not a service name."""
    if not NAME.match(name) or len(name) > MAX_NAME or name.endswith("-") or "--" in name:
        raise MeshError(400, f"{name!r} is not a service name: lowercase letters, digits and "
                             f"single dashes, starting with a letter, at most {MAX_NAME}",
                        id="meshd.new")
    module = name.replace("-", "_")
    if keyword.iskeyword(module) or module in TAKEN or module in sys.stdlib_module_names:
        raise MeshError(400, f"{name!r} would be the module {module!r}, which Python or meshd "
                             "already has: choose another name", id="meshd.new")
    return module


def project(name: str, kind: str = "service") -> dict[str, str]:
    """The files of a new project: relative path -> text."""
    module = check_name(name)
    if kind not in KINDS:
        raise MeshError(400, f"--type must be one of {', '.join(KINDS)}, not {kind!r}",
                        id="meshd.new")
    title = "".join(part.title() for part in name.split("-"))
    fill = {"NAME": name, "MODULE": module, "TITLE": title}
    files = {
        "pyproject.toml": PYPROJECT,
        ".gitignore": GITIGNORE,
        "main.py": MAIN,
        f"{module}/__init__.py": INIT,
        f"{module}/__main__.py": DUNDER_MAIN,
        f"{module}/service.py": {"service": SERVICE, "subscriber": SUBSCRIBER,
                                 "web": WEB}[kind],
        "tests/__init__.py": "",
        f"tests/test_{module}.py": {"service": TEST_SERVICE, "subscriber": TEST_SUBSCRIBER,
                                    "web": TEST_WEB}[kind],
        "README.md": {"service": README_SERVICE, "subscriber": README_SUBSCRIBER,
                      "web": README_WEB}[kind],
    }
    return {path: _fill(text, fill) for path, text in files.items()}


def _fill(text: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        text = text.replace("{{" + key + "}}", value)
    return text


PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{{NAME}}"
version = "0.1.0"
description = "The {{NAME}} service, on meshd."
requires-python = ">=3.11"
dependencies = ["meshd"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-trio>=0.8"]

[tool.setuptools]
packages = ["{{MODULE}}"]

[tool.pytest.ini_options]
trio_mode = true
'''

GITIGNORE = '''__pycache__/
*.py[cod]
*.egg-info/
.venv/
build/
dist/
.pytest_cache/
'''

MAIN = '''"""What `meshd run .` starts (the runtime runs main.py)."""

from {{MODULE}}.service import main

main()
'''

INIT = '''"""The {{NAME}} service."""
'''

DUNDER_MAIN = '''"""`python -m {{MODULE}}`: register with the local daemon, serve until stopped."""

from .service import main

main()
'''

SERVICE = '''"""The {{NAME}} service: `{{TITLE}}.Hello` greets whoever asks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

from meshd_sdk import Service

service = Service("{{NAME}}")


@dataclass
class HelloRequest:
    name: str


@dataclass
class HelloResponse:
    greeting: str


@service.handler("{{TITLE}}.Hello")
async def hello(req: HelloRequest) -> HelloResponse:
    return HelloResponse(greeting=f"Hello, {req.name}!")


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(service.run)
'''

SUBSCRIBER = '''"""The {{NAME}} subscriber: every event on `{{NAME}}.events` is remembered in the
store (table `{{MODULE}}`, set `seen`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

from meshd_sdk import Service, Store

TOPIC = "{{NAME}}.events"
service = Service("{{NAME}}")


@dataclass
class Event:
    text: str


@service.subscriber(TOPIC)
async def on_event(event: Event) -> None:
    store = Store(table="{{MODULE}}")
    try:
        await store.add("seen", event.text)
    finally:
        await store.aclose()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(service.run)
'''

WEB = '''"""The {{NAME}} web app: an HTTP app (ASGI) served on loopback by hypercorn and through the
mesh's API gateway under /{{NAME}}/."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from meshd_sdk import Service


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET / answers JSON; anything else is a 404."""
    if scope["type"] == "lifespan":  # the server's start and stop: nothing to set up here
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] in ("/", ""):
        status, body = 200, {"service": "{{NAME}}", "hello": "world"}
    else:
        status, body = 404, {"error": f"no page {scope['path']}"}
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run() -> None:
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    service = Service("{{NAME}}", http=f"127.0.0.1:{port}")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config)  # type: ignore[arg-type]
        await service.run()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
'''

TEST_SERVICE = '''"""{{NAME}}: the handler alone, and the service through a real meshd daemon."""

from __future__ import annotations

import sys
from pathlib import Path

from meshd_sdk.testing import mesh

from {{MODULE}}.service import HelloRequest, hello

ROOT = Path(__file__).resolve().parent.parent


async def test_hello_greets_by_name():
    reply = await hello(HelloRequest(name="Ada"))
    assert reply.greeting == "Hello, Ada!"


async def test_hello_through_the_mesh():
    async with mesh(nodes=1) as m:
        m.spawn([sys.executable, "-m", "{{MODULE}}"], cwd=ROOT)
        await m.registered("{{NAME}}")
        async with m.client() as client:
            reply = await client.call("{{NAME}}", "{{TITLE}}.Hello", {"name": "Ada"})
    assert reply == {"greeting": "Hello, Ada!"}
'''

TEST_SUBSCRIBER = '''"""{{NAME}}: events published on the mesh reach the subscriber."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from meshd_sdk import Store
from meshd_sdk.testing import mesh

from {{MODULE}}.service import TOPIC

ROOT = Path(__file__).resolve().parent.parent


async def test_published_events_are_remembered():
    async with mesh(nodes=1) as m:
        m.spawn([sys.executable, "-m", "{{MODULE}}"], cwd=ROOT)
        await m.registered("{{NAME}}")
        store = Store(table="{{MODULE}}", addr=m.node(0).socket)
        async with m.client() as client:
            with trio.fail_after(30):  # core messages reach subscribers subscribed by then
                while "hello" not in await store.members("seen"):
                    await client.publish(TOPIC, {"text": "hello"})
                    await trio.sleep(0.2)
        await store.aclose()
'''

TEST_WEB = '''"""{{NAME}}: the app alone, and the app through the mesh's API gateway."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path

import trio

from meshd_sdk.testing import mesh

from {{MODULE}}.service import app

ROOT = Path(__file__).resolve().parent.parent


async def get(scope_path: str) -> tuple[int, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "path": scope_path, "method": "GET"}, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_the_app_answers_json():
    assert await get("/") == (200, {"service": "{{NAME}}", "hello": "world"})
    assert (await get("/nope"))[0] == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_app_through_the_gateway():
    port = free_port()
    async with mesh(nodes=1, env={"MESHD_API_LISTEN": f"127.0.0.1:{port}"}) as m:
        # the gateway lets anyone reach this app (a rule for the public scope)
        await m.node(0).call("auth.rules.create", id="{{NAME}}-public",
                             resource="service:{{NAME}}:http", scope="", access="granted",
                             priority=5)
        m.spawn([sys.executable, "-m", "{{MODULE}}"], cwd=ROOT)
        await m.registered("{{NAME}}")

        def fetch() -> tuple[int, dict]:
            url = f"http://127.0.0.1:{port}/{{NAME}}/"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, json.loads(resp.read())

        with trio.fail_after(30):
            while True:
                try:
                    answer = await trio.to_thread.run_sync(fetch)
                    break
                except OSError:  # the rule or the route not there yet
                    await trio.sleep(0.2)
    assert answer == (200, {"service": "{{NAME}}", "hello": "world"})
'''

README_SERVICE = '''# {{NAME}}

A meshd service: `{{TITLE}}.Hello` greets whoever asks.

```sh
python -m {{MODULE}}   # run it (it registers with the local meshd)
meshd call {{NAME}} {{TITLE}}.Hello '{"name": "Ada"}'   # call it
pip install -e '.[test]' && pytest   # test it (starts a real daemon)
```

`meshd run .` runs it managed by the node (restarts, logs: `meshd ps`, `meshd logs {{NAME}}`).
'''

README_SUBSCRIBER = '''# {{NAME}}

A meshd subscriber: every event on `{{NAME}}.events` is remembered in the store.

```sh
python -m {{MODULE}}   # run it (it registers with the local meshd)
meshd publish {{NAME}}.events '{"text": "hello"}'   # send it an event
pip install -e '.[test]' && pytest   # test it (starts a real daemon)
```

`meshd store set members seen --table {{MODULE}}` shows what it has seen; `meshd run .`
runs it managed.
'''

README_WEB = '''# {{NAME}}

A web app on meshd: an ASGI app served by hypercorn on loopback, reached through the node's
API gateway (`meshd up --api-listen 127.0.0.1:8080`) under `/{{NAME}}/`.

```sh
python -m {{MODULE}}   # run it (it registers with the local meshd)
curl http://127.0.0.1:8080/{{NAME}}/   # call it through the gateway
pip install -e '.[test]' && pytest   # test it (starts a real daemon)
```

The gateway checks callers against the rules (`service:{{NAME}}:http`); `meshd run .` runs it
managed.
'''

"""A FastAPI app on uvicorn (asyncio) that calls the greeter service through the local
meshd daemon with `meshd_sdk.aio`.

    python examples/greeter/main.py &                 # the greeter, next to a `meshd up`
    python examples/fastapi-frontend/main.py          # http://127.0.0.1:8000/hello/Ada

PORT (default 8000) and HOST (default 127.0.0.1) choose where it listens.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException

from meshd.errors import MeshError
from meshd_sdk import aio


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with aio.Client() as client:  # one client (its connections) for the app's life
        app.state.mesh = client
        yield


app = FastAPI(title="greeter frontend", lifespan=lifespan)


@app.get("/hello/{name}")
async def hello(name: str) -> dict[str, str]:
    try:
        reply = await app.state.mesh.call("greeter", "Greeter.Hello", {"name": name},
                                          timeout=5)
    except MeshError as exc:  # the mesh's status, passed on
        raise HTTPException(status_code=exc.status, detail=exc.detail) from None
    return {"greeting": reply["msg"]}


if __name__ == "__main__":
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"),
                port=int(os.environ.get("PORT", "8000")), log_level="warning")

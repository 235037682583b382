"""The stream relay between a caller and a service (meshd/rpc/streams.py `_relay`): a server
stream whose service side has already ended when the caller's end reaches it still relays
every frame the service sent, and the caller going away stops the stream."""

from __future__ import annotations

import trio

from meshd.rpc.streams import _relay
from meshd.transport.links import ChannelClosed


async def test_frames_sent_before_the_service_closed_reach_the_caller():
    got: list[dict] = []
    service_frames = [{"msg": 1}, {"msg": 2}, {"end": True}]

    async def read_caller():
        return {"end": True}  # a server stream: the caller ends its side at once

    async def to_service(frame):
        raise ChannelClosed("the service side already finished")

    async def read_service():
        await trio.sleep(0.01)  # the caller's end is handled first
        return service_frames.pop(0)

    async def to_caller(frame):
        got.append(frame)

    with trio.fail_after(5):
        await _relay(read_caller, to_service, read_service, to_caller)
    assert got == [{"msg": 1}, {"msg": 2}, {"end": True}]


async def test_the_caller_going_away_stops_the_stream():
    sent: list[dict] = []

    async def read_caller():
        raise EOFError

    async def to_service(frame):
        pass

    async def read_service():
        await trio.sleep_forever()

    async def to_caller(frame):
        sent.append(frame)

    with trio.fail_after(5):
        await _relay(read_caller, to_service, read_service, to_caller)
    assert sent == []

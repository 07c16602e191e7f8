"""AgentClient (pvmig/rpc/client.py): a call whose channel closes under it is an error
of the call, named for the agent; a cancel of the caller stays a cancel."""

from __future__ import annotations

import asyncio

import pytest

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.rpc.client import AgentClient

pytestmark = pytest.mark.timeout(60)


async def _silent_listener():
    """Accepts and never answers: a call to it waits until something ends it."""
    accepted = asyncio.Event()

    def on_connect(reader, writer):
        accepted.set()
    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def _pending_hello(agent: AgentClient, accepted: asyncio.Event) -> asyncio.Task:
    task = asyncio.create_task(agent.call(agent.agent.Hello, pb.HelloRequest(), timeout=30))
    await accepted.wait()
    await asyncio.sleep(0)  # (the call is on the wire)
    return task


def test_channel_closed_under_a_call_is_unavailable():
    async def go():
        server, port, accepted = await _silent_listener()
        async with server:
            agent = AgentClient(f"127.0.0.1:{port}", "the destination agent")
            task = await _pending_hello(agent, accepted)
            await agent.close()
            with pytest.raises(errors.Unavailable, match="destination agent at 127.0.0.1"):
                await task
    asyncio.run(go())


def test_a_cancelled_caller_stays_cancelled():
    async def go():
        server, port, accepted = await _silent_listener()
        async with server:
            async with AgentClient(f"127.0.0.1:{port}") as agent:
                task = await _pending_hello(agent, accepted)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    asyncio.run(go())


def test_reconnect_reaches_an_agent_back_at_once():
    """After a drop, grpc's channel waits out its reconnect backoff and fails calls
    meanwhile; a reconnected client's next call reaches the agent at once."""
    async def go():
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        agent = AgentClient(f"127.0.0.1:{port}", "the destination agent")
        for _ in range(2):  # nobody there: refused, and the channel backs off
            with pytest.raises(errors.Unavailable):
                await agent.call(agent.agent.Hello, pb.HelloRequest(), timeout=5)
        accepted = asyncio.Event()
        server = await asyncio.start_server(lambda r, w: accepted.set(), "127.0.0.1", port)
        async with server:
            await agent.reconnect()
            task = asyncio.create_task(agent.call(agent.agent.Hello, pb.HelloRequest(),
                                                  timeout=30))
            await asyncio.wait_for(accepted.wait(), 10)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await agent.close()
    asyncio.run(go())

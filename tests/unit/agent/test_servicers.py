"""The servicers' error translation (pvmig/agent/servicers.py): whatever the work
raises, the caller gets a status, never a call left open."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from pvmig import errors
from pvmig.agent.server import dump_tasks
from pvmig.agent.servicers import IN_FLIGHT, _status

pytestmark = pytest.mark.timeout(60)


class Work:
    """Unary and streaming handlers that fail as told."""

    def __init__(self, raise_) -> None:
        self.raise_ = raise_

    @_status
    async def Unary(self, request, context):
        await self.raise_()

    @_status
    async def Stream(self, request, context):
        yield b"first"
        await self.raise_()


async def _stray_cancel():
    """A future inside the work cancelled under it (as grpc.aio does to a call whose
    channel closes): a CancelledError the caller never asked for."""
    inner = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(inner.cancel)
    await inner


async def _not_found():
    raise errors.NotFound("no such thing")


async def _call(raise_, streaming: bool):
    ident = lambda b: b  # noqa: E731 (bytes in, bytes out)
    work = Work(raise_)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Work", {
        "Unary": grpc.unary_unary_rpc_method_handler(work.Unary, ident, ident),
        "Stream": grpc.unary_stream_rpc_method_handler(work.Stream, ident, ident)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            if streaming:
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for item in ch.unary_stream("/t.Work/Stream")(b"", timeout=20):
                        got.append(item)
                assert got == [b"first"]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary("/t.Work/Unary")(b"", timeout=20)
            return e.value.code(), e.value.details()
    finally:
        await server.stop(None)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_a_stray_cancel_inside_is_an_internal_error(streaming):
    code, details = asyncio.run(_call(_stray_cancel, streaming))
    assert code == grpc.StatusCode.INTERNAL
    assert "cancelled from within" in details and ("Unary" in details or "Stream" in details)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_a_pvmig_error_keeps_its_code_and_message(streaming):
    code, details = asyncio.run(_call(_not_found, streaming))
    assert code == grpc.StatusCode.NOT_FOUND and details == "no such thing"


def test_a_call_being_served_says_where_it_waits(caplog):
    """SIGUSR1's dump (agent.server.dump_tasks) reaches into the work of each call,
    below grpc's compiled frames."""
    async def go():
        entered, release = asyncio.Event(), asyncio.Event()

        async def waits_for_release():
            entered.set()
            await release.wait()
            raise errors.NotFound("released")
        task = asyncio.create_task(_call(waits_for_release, streaming=False))
        await entered.wait()
        assert list(IN_FLIGHT.values()) == ["Unary"]
        with caplog.at_level(logging.WARNING, logger="pvmig.agent"):
            dump_tasks()
        release.set()
        assert await task == (grpc.StatusCode.NOT_FOUND, "released")
        assert not IN_FLIGHT
    asyncio.run(go())
    call = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("call "))
    assert call.startswith("call Unary\n")
    assert "in waits_for_release" in call and "test_servicers.py" in call

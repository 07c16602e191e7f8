"""The coordinator's and CLI's side of an agent: one object per agent address.

Every call has a deadline and every failure comes back as an errors.PvmigError whose
message names the agent.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.rpc import channel, security, status


class AgentClient:
    def __init__(self, address: str, role: str = "agent", sec=None) -> None:
        self.address = address
        self.where = f"{role} at {address}"  # how errors name it: "the destination agent at ..."
        self.security = sec or security.default()
        self._open()
        self.hello_reply: pb.HelloReply | None = None

    def _open(self) -> None:
        self.channel = self._channel = channel.channel(self.address, self.security)
        self.agent = pb_grpc.AgentStub(self._channel)
        self.source = pb_grpc.MigrationSourceStub(self._channel)
        self.dest = pb_grpc.MigrationDestStub(self._channel)

    async def reconnect(self) -> None:
        """A fresh channel, after the network was down: grpc's own waits out its
        reconnect backoff (many seconds after a long drop) and fails calls meanwhile."""
        old = self._channel
        self._open()
        await old.close()

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method, request, timeout: float = channel.CALL_TIMEOUT_S):
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        except asyncio.CancelledError:
            if status.own_cancel():
                raise
            raise self._closed_under() from None

    async def stream(self, method, request, timeout: float | None = None) -> AsyncIterator:
        try:
            async for item in method(request, timeout=timeout):
                yield item
        except grpc.RpcError as e:
            raise self._error(e) from None
        except asyncio.CancelledError:
            if status.own_cancel():
                raise
            raise self._closed_under() from None

    def _closed_under(self) -> errors.PvmigError:
        """A call whose channel was closed while it waited ends in CancelledError, as
        if the caller were cancelled: that is an error of the call, not a cancel (taken
        for one, it ended an agent's handler with no status, and its caller waited for
        ever)."""
        return errors.Unavailable(f"the connection to the {self.where} was closed during "
                                  "the call")

    def _error(self, e: grpc.RpcError) -> errors.PvmigError:
        err = status.from_rpc(e, self.where)
        hint = channel.transport_hint(e.code(), e.details() or "", self.security)
        return type(err)(f"{err} ({hint})") if hint else err

    async def hello(self, client: str = "pvmig", timeout: float = 10.0) -> pb.HelloReply:
        reply = await self.call(self.agent.Hello, pb.HelloRequest(
            protocol_version=channel.PROTOCOL_VERSION, client=client), timeout=timeout)
        channel.check_hello(reply, self.address)
        self.hello_reply = reply
        return reply

    async def clock_offset(self, samples: int = 5) -> tuple[int, int]:
        """(agent clock - our clock, uncertainty) in ns, from the tightest round trip."""
        best = None
        for _ in range(samples):
            t0 = time.monotonic_ns()
            reply = await self.call(self.agent.Clock, pb.ClockRequest(), timeout=5.0)
            t1 = time.monotonic_ns()
            if best is None or t1 - t0 < best[1]:
                best = (reply.monotonic_ns - (t0 + t1) // 2, t1 - t0)
        offset, rtt = best
        return offset, rtt // 2

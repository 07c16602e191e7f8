"""One page stream to the destination agent: a bidirectional Transfer call.

Records go out in order; acknowledgements (one per round end, one for the end of the
stream) come back and wake whoever waits for them. A migration runs several streams
side by side (as QEMU's multifd): while one waits for the transport, another packs.
"""

from __future__ import annotations

import asyncio

import grpc

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.rpc import status

END = "end"


class PageStream:
    def __init__(self, channel: grpc.aio.Channel, migration_id: str, dest_address: str) -> None:
        self.migration_id = migration_id
        self.dest_address = dest_address
        self._channel = channel
        self._call = pb_grpc.PageStreamStub(channel).Transfer()
        self._acks: dict = {}
        self.sent_in_round = 0  # pages this stream carried in the round under way
        self.compressor = None  # a zstandard.ZstdCompressor, with migrate --compress zstd
        self._reader = asyncio.create_task(self._read_acks())

    def record(self) -> pb.StreamRecord:
        return pb.StreamRecord(migration_id=self.migration_id)

    async def write(self, record: pb.StreamRecord) -> None:
        try:
            await self._call.write(record)
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
            raise await self._error(e) from None

    async def end_round(self, number: int, *, wait: bool = True) -> asyncio.Future | None:
        """Mark the end of a round on this stream; return once the destination has it
        all, or (wait=False: the final pass, whose end follows at once) return what to
        await for that."""
        sent, self.sent_in_round = self.sent_in_round, 0
        ack = self._expect(number)
        rec = self.record()
        rec.round_end.round, rec.round_end.pages = number, sent
        await self.write(rec)
        check = asyncio.ensure_future(self._received(number, sent, ack))
        if not wait:
            return check
        await check
        return None

    @staticmethod
    async def _received(number: int, sent: int, ack: asyncio.Future) -> None:
        reply = await ack
        if reply.pages_received != sent:
            raise errors.DataLoss(f"round {number}: destination received "
                                  f"{reply.pages_received} pages of {sent}")

    async def end(self, streams: int, device_state: pb.DeviceState | None = None) -> None:
        """Close the stream (after the device state, on the stream that carries it)."""
        ack = self._expect(END)
        if device_state is not None:
            rec = self.record()
            rec.device_state.CopyFrom(device_state)
            await self.write(rec)
        rec = self.record()
        rec.end.streams = streams
        await self.write(rec)
        await self._call.done_writing()
        await ack

    def _expect(self, key) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._reader.done():
            fut.set_exception(self._reader.exception() or errors.Aborted("stream closed"))
        else:
            self._acks[key] = fut
        return fut

    async def _read_acks(self) -> None:
        try:
            async for ack in self._call:
                fut = self._acks.pop(END if ack.end else ack.round, None)
                if fut and not fut.done():
                    fut.set_result(ack)
            err = errors.Unavailable("the destination closed the stream")
        except grpc.RpcError as e:
            err = self._refused(e.code(), e.details())
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()
        raise err

    async def _error(self, cause: Exception) -> errors.PvmigError:
        if self._reader.done() and not self._reader.cancelled() and self._reader.exception():
            return self._reader.exception()
        return self._refused(await self._call.code(), await self._call.details())

    def _refused(self, code, details) -> errors.PvmigError:
        where = f"the destination agent at {self.dest_address}"
        if code == grpc.StatusCode.INTERNAL and self._connection_lost():
            # gRPC's status when the connection under the stream breaks mid-write
            # ("Internal error from Core"): the network, not the destination's answer
            return errors.Unavailable(f"lost the stream to {where}: {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, None):
            return status.from_status(code, details, where)
        return status.from_status(code, f"{where} refused the stream: {details}", where)

    def _connection_lost(self) -> bool:
        return self._channel.get_state() in (grpc.ChannelConnectivity.IDLE,
                                             grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                                             grpc.ChannelConnectivity.CONNECTING)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        for fut in self._acks.values():  # nobody will answer them now
            fut.cancel()
        self._acks.clear()


"""The save side of one migration (Xen's xg_sr_save.c, as asyncio).

Phases, each one call from the coordinator:
    begin    connect to the destination agent, open the stream, log-dirty on
    round    round 0 sends every frame; later rounds the frames dirtied since the last
             read of the log; the final round, after suspend, the last dirty set, then
             the device state and the end of the stream
    suspend  the guest acknowledges and hands over its vCPU context
    commit   the decision is recorded; from here the destination owns the guest
    complete the source copy is destroyed
    abort    (any time before commit) the stream is cut and the guest goes on here
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np

from pvmig import errors, pages, rpc
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.domain import OUTGOING, RUNNING, SUSPENDED, Domain
from pvmig.host import Host

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.1
HASH_CHUNK_FRAMES = 1 << 16


@dataclass
class SaveSession:
    host: Host
    domain: Domain
    migration_id: str
    dest_address: str
    batch_pages: int = pages.BATCH_PAGES
    committed: bool = False
    delivered: bool = False  # the destination acknowledged the end of the stream
    vcpu: bytes | None = None
    _channel: grpc.aio.Channel | None = None
    _call: grpc.aio.StreamStreamCall | None = None
    _acks: dict = field(default_factory=dict)
    _ack_reader: asyncio.Task | None = None
    _seq: int = 0
    _last_read: float = 0.0
    _round_duration: float = 0.0

    # ---- begin

    @classmethod
    async def begin(cls, host: Host, request: pb.BeginRequest) -> "SaveSession":
        dom = host.domain(request.domain)
        if dom.migration_id:
            raise errors.FailedPrecondition(
                f"domain {dom.name!r} is already migrating ({dom.migration_id})")
        if dom.state != RUNNING:
            raise errors.FailedPrecondition(f"domain {dom.name!r} is {dom.state}, not running")
        if request.migration_id in host.saves:
            raise errors.AlreadyExists(f"migration {request.migration_id} already exists")
        session = cls(host, dom, request.migration_id, request.dest_address,
                      request.batch_pages or pages.BATCH_PAGES)
        await session._connect()
        dom.migration_id = request.migration_id
        dom.state = OUTGOING
        host.saves[request.migration_id] = session
        # Log-dirty on: forget what was written before; round 0 sends every frame.
        dom.log.read_and_clear()
        session._last_read = time.monotonic()
        return session

    async def _connect(self) -> None:
        self._channel = rpc.channel(self.dest_address)
        try:
            hello = await pb_grpc.AgentStub(self._channel).Hello(
                pb.HelloRequest(protocol_version=rpc.PROTOCOL_VERSION,
                                client=f"agent {self.host.name}"),
                timeout=rpc.CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            await self._channel.close()
            raise errors.Unavailable(
                f"source agent {self.host.name} cannot reach the destination agent at "
                f"{self.dest_address}: {e.details()}") from None
        rpc.check_hello(hello, self.dest_address)
        if hello.instance_id == self.host.instance_id:
            await self._channel.close()
            raise errors.InvalidArgument(
                f"{self.dest_address} is this same agent ({self.host.name}): "
                "a migration needs two hosts")
        self._call = pb_grpc.PageStreamStub(self._channel).Transfer()
        self._ack_reader = asyncio.create_task(self._read_acks())

    # ---- rounds

    async def round(self, number: int, final: bool) -> AsyncIterator[pb.RoundProgress]:
        if final and self.domain.state != SUSPENDED:
            raise errors.FailedPrecondition("the final pass comes after suspend")
        if not final and self.domain.state != OUTGOING:
            raise errors.FailedPrecondition(
                f"domain {self.domain.name} is {self.domain.state}: pre-copy rounds run "
                "while it is running")
        started = time.monotonic()
        if number == 0:
            frames = np.arange(self.domain.mem.nr_frames, dtype=np.uint32)
        else:
            frames = self.domain.log.read_and_clear()
        since = started - self._last_read
        self._last_read = started
        dirty_rate = len(frames) / since if number and since > 0 else 0.0
        stats = pb.RoundStats(round=number, dirty_pages=len(frames), dirty_rate=dirty_rate,
                              started_ns=time.monotonic_ns())
        last_report = started
        for lo in range(0, len(frames), self.batch_pages):
            record = pb.StreamRecord(migration_id=self.migration_id)
            packed = pages.pack(self.domain.mem, frames[lo:lo + self.batch_pages],
                                seq=self._seq, round=number, out=record.pages)
            self._seq += 1
            await self._write(record)
            stats.sent_pages += packed.normal
            stats.zero_pages += packed.zero
            stats.bytes += packed.wire_bytes
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                yield pb.RoundProgress(done_pages=lo + packed.normal + packed.zero,
                                       total_pages=len(frames), bytes=stats.bytes)
        await self._end_round(number, len(frames))
        if final:
            await self._send_device_state()
        stats.duration_ns = int((time.monotonic() - started) * 1e9)
        stats.remaining_pages = self.domain.log.count()
        yield pb.RoundProgress(done_pages=len(frames), total_pages=len(frames),
                               bytes=stats.bytes, stats=stats)

    async def _end_round(self, number: int, sent: int) -> None:
        ack = self._expect_ack(number)
        await self._write(pb.StreamRecord(migration_id=self.migration_id,
                                          round_end=pb.RoundEnd(round=number, pages=sent)))
        reply = await ack
        if reply.pages_received != sent:
            raise errors.DataLoss(f"round {number}: destination received "
                                  f"{reply.pages_received} pages of {sent}")

    async def _send_device_state(self) -> None:
        ack = self._expect_ack("end")
        await self._write(pb.StreamRecord(migration_id=self.migration_id,
                                          device_state=pb.DeviceState(vcpu=self.vcpu)))
        await self._write(pb.StreamRecord(migration_id=self.migration_id, end=pb.StreamEnd()))
        await self._call.done_writing()
        await ack
        self.delivered = True

    # ---- suspend, commit, complete, abort

    async def suspend(self) -> pb.SuspendReply:
        self.vcpu, t = await self.domain.suspend()
        return pb.SuspendReply(suspended_ns=t, vcpu_bytes=len(self.vcpu))

    def commit(self) -> None:
        if self.domain.state != SUSPENDED or not self.delivered:
            raise errors.FailedPrecondition(
                "commit comes after suspend and a final pass the destination acknowledged")
        self.host.record_commit(self.migration_id, "source", self.domain.name)
        self.committed = True

    async def frame_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of the source's memory as the final pass left it (the guest is suspended)."""
        if self.domain.state != SUSPENDED:
            raise errors.FailedPrecondition("frame hashes are taken after the final pass")
        mem = self.domain.mem
        for lo in range(0, mem.nr_frames, HASH_CHUNK_FRAMES):
            frames = np.arange(lo, min(lo + HASH_CHUNK_FRAMES, mem.nr_frames))
            hashes = await asyncio.to_thread(mem.frame_hashes, frames)
            yield pb.HashChunk(first_frame=lo, hashes=hashes.astype("<u8").tobytes())

    async def complete(self) -> None:
        if not self.committed:
            raise errors.FailedPrecondition("the source copy is destroyed only after commit")
        await self._close()
        self.host.saves.pop(self.migration_id, None)
        await self.host.drop(self.domain.name)

    async def abort(self, reason: str) -> None:
        if self.committed:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is committed: the guest belongs to the "
                "destination now")
        log.warning("migration %s aborted: %s", self.migration_id, reason)
        await self._close()
        self.host.saves.pop(self.migration_id, None)
        dom = self.domain
        dom.migration_id = ""
        if dom.state == SUSPENDED:
            await dom.cancel_suspend()
        elif dom.state == OUTGOING:
            dom.state = RUNNING

    # ---- the stream

    async def _write(self, record: pb.StreamRecord) -> None:
        try:
            await self._call.write(record)
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
            raise await self._stream_error(e) from None

    async def _stream_error(self, cause: Exception) -> errors.PvmigError:
        if self._ack_reader and self._ack_reader.done() and self._ack_reader.exception():
            return self._ack_reader.exception()
        code = await self._call.code() if self._call else None
        details = await self._call.details() if self._call else str(cause)
        return _dest_error(code, details, self.dest_address)

    def _expect_ack(self, key) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._acks[key] = fut
        if self._ack_reader.done():
            fut.set_exception(self._ack_reader.exception() or errors.Aborted("stream closed"))
        return fut

    async def _read_acks(self) -> None:
        try:
            async for ack in self._call:
                fut = self._acks.pop("end" if ack.end else ack.round, None)
                if fut and not fut.done():
                    fut.set_result(ack)
            raise errors.Unavailable("the destination closed the stream")
        except grpc.RpcError as e:
            err = _dest_error(e.code(), e.details(), self.dest_address)
            self._fail_acks(err)
            raise err from None
        except errors.PvmigError as e:
            self._fail_acks(e)
            raise

    def _fail_acks(self, err: Exception) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()

    async def _close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._ack_reader is not None:
            self._ack_reader.cancel()
            await asyncio.gather(self._ack_reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()


def _dest_error(code, details: str, address: str) -> errors.PvmigError:
    if code == grpc.StatusCode.UNAVAILABLE or code is None:
        return errors.Unavailable(f"lost the destination agent at {address}: {details}")
    cls = errors._BY_CODE.get(code, errors.PvmigError)
    return cls(f"destination agent at {address} refused the stream: {details}")

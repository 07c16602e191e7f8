"""The restore side of one migration (Xen's xg_sr_restore.c, as asyncio).

prepare  reserve the domain, create its memory, start the guest process that will
         resume it (loaded and idle, so that resume costs no start-up)
streams  records from the source agent, one handler per record type, on several
         streams side by side (an unknown record type is refused)
ready    the whole stream is in and the waiting guest is alive: the coordinator asks
         before the source records the commit
commit   the decision is recorded durably
resume   hand the vCPU context to the waiting guest
abort    (any time before commit) discard everything
expire   the coordinator is gone: with the whole stream in, ask the source for the
         decision (pvmig.migration.recovery); without it, discard

Verification needs the destination's memory as it was at resume. Only the streams
write it before then, so each frame's hash is taken after its last write: frames
received are marked unhashed and hashed by a background task while the streams run;
the coordinator lets it catch up (hash_received) after each round, and the few frames the
final pass leaves are hashed just before resume.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from pvmig import errors, faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig.dom0.devices import normalise
from pvmig.dom0.domain import Domain, DomainState
from pvmig.host import domain_records as records
from pvmig.host.commit_log import Role, check_migration_id
from pvmig.host.host import Host
from pvmig.host.sessions import Lease
from pvmig.hv import logdirty
from pvmig.hv.foreign_writes import DOM0_BEFORE_ARRIVAL
from pvmig.hv.memory import save_image
from pvmig.migration import injector, pages, policy, recovery, verify
from pvmig.migration.device_state import DeviceState
from pvmig.migration.injector import InjectionPoint
from pvmig.migration.policy import PostcopyDom0, from_wire
from pvmig.migration.recovery import SideState, Status
from pvmig.migration.state import (
    RESTORE_COMMITTED,
    RESTORE_TRANSITIONS,
    PagingState,
    RestoreState,
    advance,
    require,
)
from pvmig.rpc import channel
from pvmig.rpc.client import AgentClient

from .channels import DataChannels
from .postcopy import Paging
from .storage import StorageTarget

log = logging.getLogger(__name__)
HASH_EVERY_S = 0.02  # keeps each pass, and so the wait at resume, to a few ms


@dataclass
class RestoreSession:
    host: Host
    domain: Domain
    migration_id: str
    source_agent: str  # its name
    lease: Lease
    source_address: str = ""  # where recovery reaches it
    source_instance: str = ""  # its instance as the migration began
    state: RestoreState = RestoreState.PREPARING
    why_discarded: str = ""
    device_state: DeviceState | None = None
    save_image: str = ""
    ends: int = 0
    hashes: np.ndarray | None = None
    unhashed: np.ndarray | None = None
    applied_round: np.ndarray | None = None
    _hasher: asyncio.Task | None = None
    data: DataChannels | None = None  # transport tcp: the data channels, by epoch
    paging: Paging | None = None  # may switch to post-copy: its frames still to come
    storage: StorageTarget | None = None  # migrate --copy-storage: the disks arriving
    inject: frozenset = frozenset()  # the injection points (those that act here)
    injected: dict = field(default_factory=dict)
    _hash_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _end_event: asyncio.Event = field(default_factory=asyncio.Event)
    _resuming: asyncio.Future | None = None

    def _set_state(self, new: RestoreState) -> None:
        """The only place the state changes (QEMU's migrate_set_state)."""
        self.state = advance(self.state, new, RESTORE_TRANSITIONS,
                             f"incoming migration {self.migration_id}")

    @property
    def committed(self) -> bool:
        return self.state in RESTORE_COMMITTED

    @property
    def ended(self) -> bool:
        """Every stream ended and the device state is in."""
        return self.state is RestoreState.READY or self.committed

    @property
    def switched(self) -> bool:
        """The source switched to post-copy: frames come after the resume."""
        return self.paging is not None and self.paging.total > 0

    @property
    def decided(self) -> bool:
        """The whole stream is in: the source may have committed (only it knows)."""
        return self.ended

    # ---- prepare

    @classmethod
    async def prepare(cls, host: Host, request: pb.PrepareRequest) -> "RestoreSession":
        check_migration_id(request.migration_id)
        if request.migration_id in host.restores:
            raise errors.AlreadyExists(f"migration {request.migration_id} already exists")
        if request.postcopy and request.save_image:
            raise errors.InvalidArgument("--save-images reads every frame at resume: not "
                                         "with post-copy, whose frames come after it")
        if request.copy_storage and request.postcopy:
            raise errors.InvalidArgument("--copy-storage with post-copy: not supported (the "
                                         "disk's last blocks go in a final pass)")
        storage = None
        if request.copy_storage:  # before anything is reserved: a refusal leaves nothing
            storage = StorageTarget.create(
                host, request.migration_id,
                [normalise(_device_dict(d)) for d in request.devices],
                fills_up=InjectionPoint.STORAGE_FILLS_UP in injector.parse(request.inject))
        try:
            dom = host.reserve(request.domain, request.ram_bytes, workload={},
                               devices=[_device_dict(d) for d in request.devices],
                               lazy=request.postcopy, labels=dict(request.labels))
        except BaseException:
            if storage is not None:
                storage.delete()
            raise
        dom.migration_id = request.migration_id
        session = cls(host, dom, request.migration_id, request.source_agent,
                      Lease(host.session_timeout_s, host.clock),
                      source_address=request.source_address,
                      source_instance=request.source_instance)
        session.save_image = request.save_image
        session.storage = storage
        session.inject = injector.parse(request.inject)
        n = dom.mem.nr_frames
        session.hashes = np.zeros(n, dtype=np.uint64)
        session.unhashed = np.zeros(n, dtype=np.uint8)
        session.applied_round = np.zeros(n, dtype=np.uint32)  # round + 1 of each frame's copy
        session.data = DataChannels(session, asyncio.get_running_loop())
        host.restores.add(session)
        try:
            # shared storage: the same disk; --copy-storage: the image made above
            host.start_devices(dom, fresh_disks=False)
            if storage is not None:
                storage.attach(dom.pv.disks)
            await dom.start_waiting(host.log_path(dom), lazy=request.postcopy)
            if request.postcopy:
                session.paging = Paging(session, dom.userfault, from_wire(
                    PostcopyDom0, request.postcopy_dom0, PostcopyDom0.DEMAND))
                dom.missing = session.paging.missing
                dom.grants.before_access = session.paging.dom0_access
            session._set_state(RestoreState.RECEIVING)
        except BaseException:
            await session.discard("the guest process did not start")
            raise
        host.migration_began("destination", session.migration_id, dom.name)
        return session

    # ---- the streams

    async def receive(self, records: AsyncIterator[pb.StreamRecord]) -> AsyncIterator[pb.StreamAck]:
        """One page stream of the migration (there may be several side by side)."""
        stream = _StreamState()
        with self.lease.hold():
            async for record in records:
                if isinstance(record, channel.Malformed):
                    raise record.error()
                self._check_open()
                if record.migration_id != self.migration_id:
                    raise errors.FailedPrecondition(
                        f"record for migration {record.migration_id!r} on a stream of "
                        f"{self.migration_id!r}")
                if stream.ended or self.ended:
                    raise errors.InvalidArgument("record after the end of the stream")
                kind = record.WhichOneof("body")
                handler = _HANDLERS.get(kind)
                if handler is None:
                    raise errors.InvalidArgument(f"unknown stream record {kind!r}")
                ack = handler(self, stream, getattr(record, kind))
                if ack is not None:
                    yield ack

    def on_pages(self, stream: "_StreamState", batch: pb.PageBatch) -> None:
        unpacked = pages.unpack(batch, self.domain.mem.nr_frames)
        self.host.metrics.received.labels("memory").inc(batch.ByteSize())
        stream.round_pages[batch.round] = stream.round_pages.get(batch.round, 0) + unpacked.pages
        # A batch of an older round than a frame's last copy straggles in on a stream that
        # broke (the source made new ones and sent the frame again): never over the newer.
        unpacked = pages.newer(unpacked, self.applied_round, batch.round + 1)
        pages.apply(self.domain.mem, unpacked)
        self.applied_round[unpacked.frames] = batch.round + 1
        self.applied_round[unpacked.zero_frames] = batch.round + 1
        # After the write, as with log-dirty: a frame is hashed after its last write.
        self.unhashed[unpacked.frames] = 1
        self.unhashed[unpacked.zero_frames] = 1
        if self._hasher is None:
            self._hasher = asyncio.create_task(self._hash_in_background())

    def received(self, frames: np.ndarray) -> None:
        """Frames a data channel's thread wrote (transport tcp), to hash."""
        self.unhashed[frames] = 1
        if self._hasher is None:
            self._hasher = False  # (asked for once: the loop makes it)
            self.data.loop.call_soon_threadsafe(self._start_hasher)

    def _start_hasher(self) -> None:
        if not self._hasher and not self.ended and self.state is RestoreState.RECEIVING:
            self._hasher = asyncio.create_task(self._hash_in_background())

    async def on_discard(self, to_come: np.ndarray) -> None:
        """The switch to post-copy: these frames (a mask) come later, after resume."""
        self._check_open()
        if self.paging is None:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} was not prepared for post-copy")
        if self.ended:
            raise errors.InvalidArgument("post-copy's frames after the end of the stream")
        async with self._hash_lock:  # no hashing pass on them while they go
            self.unhashed[to_come] = 0
            self.paging.discard(self.domain.mem, to_come)

    def on_round_end(self, stream: "_StreamState", end: pb.RoundEnd) -> pb.StreamAck:
        return pb.StreamAck(round=end.round, pages_received=stream.round_pages.pop(end.round, 0))

    def on_device_state(self, stream: "_StreamState", state: pb.DeviceState) -> None:
        self.device_state = DeviceState.from_pb(state)

    def on_end(self, stream: "_StreamState", end: pb.StreamEnd) -> pb.StreamAck:
        self.end_stream(end.streams)
        stream.ended = True
        return pb.StreamAck(end=True)

    def end_stream(self, streams: int) -> None:
        """One stream (or data connection) ended; `streams` is how many there are."""
        self._check_open()
        if not 0 < streams <= policy.MAX_STREAMS:
            raise errors.InvalidArgument(f"end of stream announces {streams} streams")
        if self.ended:
            raise errors.InvalidArgument("record after the end of the stream")
        self.ends += 1
        # Whole when every stream has ended and the device state is in: acknowledged
        # ends are what the source waits for before it commits.
        if self.ends >= streams:
            if self.device_state is None:
                raise errors.InvalidArgument("every stream ended without the device state")
            self._set_state(RestoreState.READY)
            self._end_event.set()
            # The last end's acknowledgement is the destination's "ready" (xl's): the
            # source commits only after it, so it must not be given unless this side
            # can resume the guest.
            self.ready()

    async def open_data(self, recover: bool = False) -> pb.DataChannels:
        """A new epoch of data channels (transport tcp); the old ones closed first. After
        a post-copy switch (a recovery, or a migration with one stream: otherwise the
        switch's connections go on as post-copy's): connection 0 the urgent lane.
        recover: post-copy
        goes on after its connections broke (paused here too, if this side had not
        noticed yet); the new lane begins with what is still missing."""
        self._check_open()
        postcopy = self.switched and self.ended
        if recover:
            if not postcopy or not self.committed:
                raise errors.FailedPrecondition(
                    f"migration {self.migration_id} is {self.state}: only a committed "
                    "post-copy is recovered")
            self.paging.pause("the source reconnects")
        if not postcopy and (self.ended or self.state is not RestoreState.RECEIVING):
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is {self.state}: data channels are opened "
                "while it receives")
        if self.host.data_endpoint is None:
            raise errors.FailedPrecondition(
                f"agent {self.host.name} has no data listener (--data-listen off): migrate "
                "with --transport grpc")
        with self.lease.hold():
            return await self.data.open(self.host.data_endpoint, postcopy=postcopy,
                                        recovered=recover)

    # ---- hashing what was received

    async def _hash_in_background(self) -> None:
        while not self.ended:
            await self._hash_pass()
            try:  # woken early by the end of the stream
                await asyncio.wait_for(self._end_event.wait(), HASH_EVERY_S)
            except asyncio.TimeoutError:
                pass

    async def _hash_pass(self) -> None:
        # One pass at a time: a slower pass must not store a hash older than a newer
        # pass's for the same frame.
        async with self._hash_lock:
            task = asyncio.create_task(asyncio.to_thread(self._hash_pending))
            try:
                await asyncio.shield(task)
            finally:  # even when cancelled: the thread must be off the memory first
                if not task.done():
                    await asyncio.wait([task])

    def _hash_pending(self) -> None:
        # Clear before hashing: a frame written meanwhile is marked again (see logdirty).
        frames = logdirty.take(self.unhashed)
        self.hashes[frames] = self.domain.mem.frame_hashes(frames)
        if self.storage is not None:
            self.storage.hash_pending()

    def received_blocks(self) -> None:
        """A data connection's thread wrote disk blocks: hashed as frames are."""
        if self._hasher is None:
            self._hasher = False
            self.data.loop.call_soon_threadsafe(self._start_hasher)

    async def hash_received(self) -> None:
        """Hash what has been received so far (called between rounds, while the guest
        still runs on the source), so that little is left to hash before resume."""
        self._check_open()
        with self.lease.hold():
            await self._hash_pass()

    # ---- ready, commit, resume

    def ready(self) -> None:
        """Everything needed to resume is here: refuse otherwise, before the source
        records a commit this side could not honour."""
        self._check_open()
        if not self.ended:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id}: the stream (final pass and device state) "
                "has not all arrived")
        if not self.domain.guest_alive:
            raise errors.GuestError(
                f"domain {self.domain.name}: the guest process waiting to resume it is gone "
                f"(see {self.domain.log_path})")

    def commit(self) -> None:
        if self.committed:  # (a repeated Commit: recorded already, and may have run since)
            return
        self.ready()
        # First what a crash of this agent before the resume needs to resume it anyway
        # (pvmig.host.parking), then the decision that makes it count.
        state = self.device_state
        if self.domain.pv is not None:
            self.domain.pv.restore_backend_records(state.backends)
        self.host.records.remember(self.domain, migration_id=self.migration_id,
                                   role=Role.DESTINATION, vcpu=state.vcpu,
                                   recovery=state.recovery,
                                   resumes=self._resumes())
        self.host.commits.record(self.migration_id, Role.DESTINATION, self.domain.name)
        if self.storage is not None:  # (a crash from here on keeps them: committed)
            self.storage.keep()
        faults.point("dest-committed")
        self._set_state(RestoreState.COMMITTED)

    def _resumes(self) -> int:
        """The RAM's resume count, for a revival after a crash; -1 (never matches) while
        post-copy's frames are still to come: such a crash loses the guest anyway (a
        revival would run it on holes)."""
        if self.paging is not None and self.paging.missing.any():
            return -1
        return records.resumes_of(self.domain.mem)

    async def commit_and_resume(self) -> int:
        """The commit recorded, then the guest resumed: one call inside the downtime.
        Once: the coordinator and recovery may both ask."""
        self.commit()
        return await self.resume()

    async def resume(self) -> int:
        """Hand the vCPU context to the waiting guest; its first step's time. Once,
        whoever asks (the coordinator, recovery, a Resume)."""
        if self._resuming is None:
            require(self.state, RestoreState.COMMITTED,
                    f"incoming migration {self.migration_id}", "resume (after commit)")
            self._resuming = asyncio.ensure_future(self._resume())
        return await asyncio.shield(self._resuming)

    async def _resume(self) -> int:
        self._set_state(RestoreState.RESUMING)
        if self._hasher:
            await self._hasher  # ends with the stream: at most one short pass to wait for
        await self._hash_pass()
        if self.save_image:  # asked for: costs a copy of memory inside the downtime
            save_image(self.domain.mem, self.save_image)
        postcopy = self.switched
        if postcopy:
            self.paging.start()  # before the guest runs: its first read may fault
            if InjectionPoint.DOM0_TOUCH_MISSING in self.inject:
                await asyncio.to_thread(self._dom0_touch_missing)
        t = await self.domain.resume(self.device_state.vcpu, self.device_state.recovery)
        self.domain.migration_id = ""
        self._set_state(RestoreState.RESUMED)
        if not postcopy:  # (post-copy: once every frame is here, postcopy_done)
            self.host.records.refresh(self.domain)
        return t

    def _dom0_touch_missing(self) -> None:
        """The injection point dom0-touch-missing: dom0 reads a frame not here yet, the
        way a backend's grant map reaches one (the policy's hook first)."""
        frame = self.domain.mem.nr_frames // 2
        self.injected[InjectionPoint.DOM0_TOUCH_MISSING] = int(self.paging.missing[frame])
        self.paging.dom0_access(frame)
        int(self.domain.mem.words[frame, 0])  # (the read itself)
        log.warning("migration %s: dom0 read frame %d %s", self.migration_id, frame,
                    "after it arrived (demand)" if self.paging.dom0 is PostcopyDom0.DEMAND
                    else "before it arrived (unsafe): the guest keeps a zero page there")

    def postcopy_state(self) -> pb.PostcopyStatus:
        if self.paging is None:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} was not prepared for post-copy")
        status = self.paging.status()
        for name, n in self.injected.items():
            status.injected[name] = n
        return status

    def postcopy_done(self) -> None:
        """Every frame is here (a data connection's end said so): the domain is whole
        again, its record as any running domain's. Once, whoever comes first."""
        if self.domain.missing is not None and self.paging.complete:
            self.host.metrics.postcopy_faults.inc(self.paging.status().faults)
            self.paging.finish()
            self.domain.missing = None
            self.paging.stop(wait=False)
            self.host.records.refresh(self.domain)

    async def frame_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of this side's memory as it was at resume."""
        if self.domain.state == DomainState.INCOMING:
            raise errors.FailedPrecondition("frame hashes are kept from resume on")
        if self.paging is not None and not self.paging.complete:
            raise errors.FailedPrecondition(
                f"post-copy of migration {self.migration_id}: "
                f"{int(self.paging.missing.sum())} frame(s) have not arrived")
        causes = None
        if self.paging is not None and self.paging.taken:
            causes = np.zeros(len(self.hashes), np.uint8)
            causes[self.paging.taken] = DOM0_BEFORE_ARRIVAL
        for chunk in verify.chunks(self.hashes, causes):
            yield chunk

    async def block_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of this side's disk images as they were at resume."""
        if self.storage is None:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} did not copy storage")
        if self.domain.state == DomainState.INCOMING:
            raise errors.FailedPrecondition("block hashes are kept from resume on")
        for chunk in verify.chunks(self.storage.hashes(), None):
            yield chunk

    def finish(self) -> None:
        """The session is no longer needed (the domain lives on)."""
        self.host.restores.remove(self.migration_id)
        if self.state is RestoreState.RESUMED:
            self._set_state(RestoreState.FINISHED)
            self.host.migration_ended("destination", self.migration_id, "completed")

    # ---- recovery: the coordinator is gone (pvmig recover, or this host's watchdog)

    def status(self) -> SideState:
        status = (Status.COMMITTED if self.committed else Status.READY if self.ended
                  else Status.RECEIVING)
        if self.committed and self.switched and not self.paging.complete:
            status = (Status.POSTCOPY_PAUSED if self.paging.state is PagingState.PAUSED
                      else Status.POSTCOPY_ACTIVE)
        return SideState(status, self.domain.name, source_agent=self.source_agent,
                         source_instance=self.source_instance)

    async def expire(self) -> None:
        """The lease ran out. Resumed: the session is done with. The stream not whole:
        the source cannot have committed, discard. Whole: only the source knows."""
        if self.committed:  # resumed (or committed by a lone Commit: resume it)
            await self.commit_and_resume()
            if self.switched and not self.paging.complete:
                # post-copy's frames still to come: the session stays for the transfer
                # and for a recovery of it (the source holds the rest)
                self.lease.renew()
                return
            self.finish()
            return
        if not self.ended:
            await self.abort(f"no word from the coordinator for {self.lease.timeout_s:.0f} s "
                             "before commit")
            return
        if not self.source_address:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id}: the coordinator named no source address to "
                "ask for the decision: run pvmig recover")
        async with AgentClient(self.source_address, "the source agent",
                               self.host.security) as source:
            await source.hello(f"agent {self.host.name}")
            outcome = await recovery.recover(recovery.RemoteSource(source), _Local(self),
                                            self.migration_id)
        log.warning("%s (the coordinator gone; settled by the destination)", outcome.describe())

    # ---- abort

    async def abort(self, reason: str, cancelled: bool = False) -> None:
        if self.committed:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is committed: it cannot be discarded")
        log.warning("migration %s discarded: %s", self.migration_id, reason)
        await self.discard(reason, cancelled)

    async def discard(self, reason: str, cancelled: bool = False) -> None:
        if self.state is not RestoreState.DISCARDED:
            begun = self.state is not RestoreState.PREPARING  # (counted as started)
            self.why_discarded = reason
            self._set_state(RestoreState.DISCARDED)
            if begun:
                self.host.migration_ended("destination", self.migration_id,
                                          "aborted" if cancelled else "failed")
        self.host.restores.remove(self.migration_id)
        if self.data is not None:  # no data channel's thread left on the memory
            await self.data.close()
        if self.paging is not None:
            await asyncio.to_thread(self.paging.stop)
        if self._hasher:
            self._hasher.cancel()
        async with self._hash_lock:  # no hashing pass left on the memory
            pass
        if self.storage is not None:  # before the domain goes: whoever sees it gone sees
            self.storage.delete()     # its images gone (blkback's open fd does not mind)
        if self.host.domains.get(self.domain.name) is self.domain:
            await self.host.drop(self.domain.name)

    def _check_open(self) -> None:
        if self.state is RestoreState.DISCARDED:
            raise errors.Aborted(f"migration {self.migration_id} was discarded: "
                                 f"{self.why_discarded}")


async def receive_stream(host: Host, records: AsyncIterator[pb.StreamRecord]
                         ) -> AsyncIterator[pb.StreamAck]:
    """A page stream as it arrives: its first record names the migration."""
    records = aiter(records)
    try:
        first = await anext(records)
    except StopAsyncIteration:
        return
    if isinstance(first, channel.Malformed):
        raise first.error()
    session = host.restores.lookup(first.migration_id)

    async def whole():
        yield first
        async for record in records:
            yield record
    async for ack in session.receive(whole()):
        yield ack


def _device_dict(d: pb.DeviceConfig) -> dict:
    return {f.name: v for f, v in d.ListFields()}


@dataclass
class _StreamState:
    round_pages: dict = field(default_factory=dict)
    ended: bool = False


_HANDLERS = {
    "pages": RestoreSession.on_pages,
    "round_end": RestoreSession.on_round_end,
    "device_state": RestoreSession.on_device_state,
    "end": RestoreSession.on_end,
}


def incoming_state(host: Host, migration_id: str) -> SideState:
    """Recovery's question to the destination: does it hold a copy, run it, or neither?"""
    session = host.restores.get(migration_id)
    if session is not None:
        return session.status()
    record = host.commits.read(migration_id, Role.DESTINATION)
    if record is None:
        return SideState(Status.NONE)
    # Committed here: the guest may have run here, whatever it does now (runs, moves on,
    # is parked and back): "lost" only when this host has no such domain at all.
    here = record.domain in host.domains
    return SideState(Status.RESUMED if here else Status.LOST, record.domain)


class _Local:
    """This agent's restore half, as recovery.settle drives a destination."""

    address = "this agent"

    def __init__(self, session: RestoreSession) -> None:
        self.session = session

    async def state(self, migration_id: str) -> SideState:
        return incoming_state(self.session.host, migration_id)

    async def commit_and_resume(self, migration_id: str) -> None:
        await self.session.commit_and_resume()
        self.session.finish()

    async def discard(self, migration_id: str, reason: str) -> None:
        await self.session.abort(reason)


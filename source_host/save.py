"""The save side of one migration (Xen's xg_sr_save.c, as asyncio).

Phases, each one call from the coordinator:
    begin       connect to the destination agent, open the page streams, log-dirty on
    storage     (--copy-storage) rounds of the disks alone: every block, then those
                blkback wrote since (their logs went on at begin)
    send_all    round 0: every frame
    send_dirty  a later round: the frames dirtied since the last read of the log
    suspend     the guest acknowledges and hands over its vCPU context
    quiesce     (quiesce=backend) the backends stop and unmap before the final pass
    send_final  the last dirty set (and the disks' last written blocks), then the device
                state and the end of the stream
    commit      the decision is recorded; from here the destination owns the guest
    complete    the source copy is destroyed
    abort       (any time before commit) the stream is cut and the guest goes on here

The session's state (pvmig.migration.state.SaveState) says which of them may come
next; it changes only through `_set_state`. The injection points, no-ops unless asked
for, are one Injector (pvmig.migration.injector) called at their places.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
import zstandard

from pvmig import errors, faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig.dom0.domain import Domain, DomainState
from pvmig.host import parking
from pvmig.host.commit_log import Decision, Role, check_migration_id
from pvmig.host.host import Host
from pvmig.host.sessions import Lease
from pvmig.hv.foreign_writes import TORN
from pvmig.hv.memory import PAGE_SIZE, save_image
from pvmig.migration import pages, policy, recovery, verify
from pvmig.migration.device_state import DeviceState
from pvmig.migration.injector import InjectionPoint, Injector
from pvmig.migration.policy import (
    Compression,
    GrantMode,
    PersistentGrants,
    Quiesce,
    Recovery,
    StorageMode,
    Transport,
    from_wire,
)
from pvmig.migration.recovery import SideState, Status
from pvmig.migration.state import (
    SAVE_COMMITTED,
    SAVE_ENDING,
    SAVE_POSTCOPY,
    SAVE_TRANSITIONS,
    SAVE_UNDECIDED,
    SaveState,
    advance,
    require,
)
from pvmig.pv import guestinfo
from pvmig.rpc import channel, data_channel
from pvmig.rpc.client import AgentClient

from .channels import Batches, DataStream, Mismatch, Source, Tally
from .postcopy import Transfer
from .ratelimit import RateLimit
from .storage import StorageCopy
from .stream import PageStream

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.1
POSTCOPY_PROGRESS_S = 0.5
# Post-copy's push batches: smaller than pre-copy's, so that a page asked for does not
# queue behind 4 MiB batches at either end (measured below in docs/PERFORMANCE.md)
POSTCOPY_BATCH_PAGES = 256
HELLO_TIMEOUT_S = 15.0  # under the coordinator's deadline for Begin, so this error wins
RECONNECT_S = 20.0     # page streams lost in pre-copy: made anew for this long at most
RECONNECT_TRY_S = 2.0  # (and no longer than the session's lease)
MAX_RECONNECTS = 3     # per migration: a failure that comes back each time is no drop

St = SaveState


@dataclass
class Settings:
    """What Begin asked for, checked."""

    batch_pages: int = 0  # 0: the transport's default
    streams: int = policy.STREAMS
    quiesce: Quiesce = Quiesce.NONE
    recovery: Recovery = Recovery.REPLAY
    compress: Compression = Compression.NONE
    transport: Transport | None = None  # None: the agent's own setting
    persistent_grants: PersistentGrants | None = None
    grant_mode: GrantMode | None = None
    max_bandwidth_mbps: float = 0.0
    backend_log: bool = False
    xenstore_track: bool = False
    save_image: str = ""
    copy_storage: bool = False
    storage_mode: StorageMode = StorageMode.BACKGROUND
    remove_source_storage: bool = False

    @classmethod
    def of(cls, request: pb.BeginRequest) -> "Settings":
        if not 0 <= request.streams <= policy.MAX_STREAMS:
            raise errors.InvalidArgument(
                f"streams must be within 1..{policy.MAX_STREAMS}, not {request.streams}")
        if not 0 <= request.batch_pages <= policy.MAX_BATCH_PAGES:
            raise errors.InvalidArgument(f"batch_pages must be within "
                                         f"1..{policy.MAX_BATCH_PAGES}, not {request.batch_pages}")
        if request.max_bandwidth_mbps < 0:
            raise errors.InvalidArgument(
                f"max bandwidth must be >= 0 Mbit/s, not {request.max_bandwidth_mbps}")
        return cls(batch_pages=request.batch_pages,
                   streams=request.streams or policy.STREAMS,
                   quiesce=from_wire(Quiesce, request.quiesce, Quiesce.NONE),
                   recovery=from_wire(Recovery, request.recovery, Recovery.REPLAY),
                   compress=from_wire(Compression, request.compress, Compression.NONE),
                   transport=from_wire(Transport, request.transport),
                   persistent_grants=from_wire(PersistentGrants, request.persistent_grants),
                   grant_mode=from_wire(GrantMode, request.grant_mode),
                   max_bandwidth_mbps=request.max_bandwidth_mbps,
                   backend_log=request.backend_log, xenstore_track=request.xenstore_track,
                   save_image=request.save_image, copy_storage=request.copy_storage,
                   storage_mode=from_wire(StorageMode, request.storage_mode,
                                          StorageMode.BACKGROUND),
                   remove_source_storage=request.remove_source_storage)


@dataclass
class SaveSession:
    host: Host
    domain: Domain
    migration_id: str
    dest_address: str
    lease: Lease
    settings: Settings = field(default_factory=Settings)
    inject: Injector = field(default_factory=Injector)
    state: SaveState = St.SETUP
    why_ended: str = ""  # why an abort or a rollback began: no commit may follow it
    rounds_done: int = 0
    reconnects: int = 0
    vcpu: bytes | None = None
    limit: RateLimit | None = None  # the bandwidth cap, if any
    transport: Transport = Transport.TCP
    corrupt_seq: int | None = None  # (an injection point: this batch goes out damaged)
    _dest: AgentClient | None = None
    _dest_instance: str = ""
    _streams: list[PageStream | DataStream] = field(default_factory=list)
    _tls: object = None  # the data channels' TLS context, made once
    _seq: int = 0
    _last_read: float = 0.0
    _final_acks: list = field(default_factory=list)  # the final pass's round ends
    postcopy_frames: np.ndarray | None = None  # a switch to post-copy: the frames to come (mask)
    _transfer: Transfer | None = None  # post-copy under way (or done)
    _postcopy_task: asyncio.Future | None = None  # the current epoch's
    _recovering: asyncio.Future | None = None
    _push_after_fault: bool = False  # (an injection point)
    allow_postcopy: bool = False  # the destination was prepared for a switch
    postcopy_asked: bool = False  # StartPostcopy: said with the next round's stats
    storage: StorageCopy | None = None  # --copy-storage: the disks' copy
    _mirror: DataStream | None = None  # write-blocking: the connection writes go through
    cancelled: bool = False  # its abort was asked for (pvmig cancel), not a failure
    _postcopy_counted: int = 0  # post-copy's bytes already in the metrics
    _completing: asyncio.Future | None = None  # each runs once, whoever asks
    _releasing: asyncio.Future | None = None

    def _set_state(self, new: SaveState) -> None:
        """The only place the state changes (QEMU's migrate_set_state)."""
        self.state = advance(self.state, new, SAVE_TRANSITIONS,
                             f"outgoing migration {self.migration_id}")

    def _require(self, allowed, doing: str) -> None:
        self._check_not_ended()
        require(self.state, allowed, f"outgoing migration {self.migration_id}", doing)

    @property
    def committed(self) -> bool:
        return self.state in SAVE_COMMITTED

    @property
    def decided(self) -> bool:
        return self.committed

    @property
    def injected(self) -> dict:
        return self.inject.fired

    # ---- begin

    @classmethod
    async def begin(cls, host: Host, request: pb.BeginRequest) -> "SaveSession":
        check_migration_id(request.migration_id)
        dom = host.domain(request.domain)
        if request.migration_id in host.saves:
            raise errors.AlreadyExists(f"migration {request.migration_id} already exists")
        settings = Settings.of(request)
        inject = Injector(request.inject)
        if dom.migration_id:
            raise errors.FailedPrecondition(
                f"domain {dom.name!r} is already migrating ({dom.migration_id})")
        if dom.state != DomainState.RUNNING:
            raise errors.FailedPrecondition(f"domain {dom.name!r} is {dom.state}, not running")
        if settings.copy_storage:
            _check_copy_storage(dom, settings, request, host)
        if dom.pv is not None:  # before anything is claimed: a refusal changes nothing
            dom.pv.set_grant_policy(persistent=settings.persistent_grants or "",
                                    grant_mode=settings.grant_mode or "")
        session = cls(host, dom, request.migration_id, request.dest_address,
                      Lease(host.session_timeout_s, host.clock), settings, inject,
                      transport=settings.transport or host.transport)
        session.corrupt_seq = inject.corrupt_seq
        settings.batch_pages = settings.batch_pages or policy.batch_pages(session.transport)
        session.allow_postcopy = request.allow_postcopy
        if settings.max_bandwidth_mbps:
            session.limit = RateLimit(settings.max_bandwidth_mbps)
        # Claim the domain before the first await: a second Begin must find it taken.
        dom.migration_id, dom.state = request.migration_id, DomainState.OUTGOING
        host.saves.add(session)
        try:
            await session._connect()
            session._check_not_ended()  # (aborted while connecting: given back already)
            # (a crash from here on: the next start revives the guest only if this
            # source never committed, and records the abort: pvmig.host.revival)
            host.records.remember(dom, migration_id=request.migration_id, role=Role.SOURCE,
                                  dest=request.dest_address,
                                  dest_name=session._dest.hello_reply.agent_name)
            if settings.copy_storage:  # the disks' logs on: the first round sends all
                session.storage = StorageCopy.start(
                    dom.pv, settings.storage_mode,
                    hold_halfway=InjectionPoint.STORAGE_HOLDS_HALFWAY in inject.points)
                session.storage.on_sent = host.metrics.sent.labels("disk").inc
            session._set_state(St.ACTIVE)
        except BaseException:
            await session._release()
            raise
        host.migration_began("source", session.migration_id, dom.name)
        if dom.pv is not None:
            dom.pv.set_policy(backend_log=settings.backend_log,
                              xenstore_track=settings.xenstore_track)
        # Log-dirty on: forget what was written before; round 0 sends every frame.
        dom.log.read_and_clear()
        dom.journal.reset()
        session._last_read = time.monotonic()
        return session

    async def _connect(self, hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        self._dest = AgentClient(self.dest_address, "the destination agent", self.host.security)
        hello = await self._dest.hello(f"agent {self.host.name}", timeout=hello_timeout_s)
        if hello.instance_id == self.host.instance_id:
            raise errors.InvalidArgument(
                f"{self.dest_address} is this same agent ({self.host.name}): "
                "a migration needs two hosts")
        if self._dest_instance and hello.instance_id != self._dest_instance:
            raise errors.FailedPrecondition(
                f"the destination agent at {self.dest_address} restarted: what it had "
                "received is gone")
        self._dest_instance = hello.instance_id
        if self.transport is Transport.TCP:
            await self._open_data_channels()
        else:
            self._streams = [PageStream(self._dest.channel, self.migration_id,
                                        self.dest_address)
                             for _ in range(self.settings.streams)]
        if self.settings.compress is Compression.ZSTD:
            for s in self._streams:  # a compressor is not to be shared between streams
                s.compressor = zstandard.ZstdCompressor(level=1)

    async def _open_data_channels(self, extra: int = 0, recover: bool = False) -> None:
        """A new epoch of data channels: the destination's endpoint and key, then one
        proven connection per stream (and `extra` more: post-copy's urgent lane)."""
        chans = await self._dest.call(self._dest.dest.OpenData,
                                      pb.MigrationRef(migration_id=self.migration_id,
                                                      recover=recover))
        if self.settings.batch_pages * PAGE_SIZE > chans.max_batch_bytes:
            raise errors.InvalidArgument(
                f"batches of {self.settings.batch_pages} pages are larger than the "
                f"destination takes ({chans.max_batch_bytes // PAGE_SIZE} pages)")
        if chans.tls and self._tls is None:
            if not self.host.security.tls:
                raise errors.FailedPrecondition(
                    "the destination's data channels are TLS, and this agent has no "
                    "certificate: give both agents --tls-* or neither")
            self._tls = data_channel.client_context(self.host.security)
        host = chans.host or channel.parse_address(self.dest_address)[0]
        # write-blocking: one more, the guest's writes go through it (never a round's)
        mirror = int(self.settings.storage_mode is StorageMode.WRITE_BLOCKING
                     and self.settings.copy_storage and not extra)
        opened = await asyncio.gather(*(
            DataStream.open(host, chans.port, migration_id=self.migration_id,
                            epoch=chans.epoch, index=i, key=chans.key,
                            tls=self._tls if chans.tls else None,
                            batch_pages=self.settings.batch_pages)
            for i in range(self.settings.streams + extra + mirror)), return_exceptions=True)
        self._streams = [s for s in opened if isinstance(s, DataStream)]
        failed = [e for e in opened if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        if mirror:
            self._mirror = self._streams.pop()
            if self.storage is not None and self.storage.copied:  # (made anew)
                self.storage.mirror_on(self._mirror)

    async def _reconnect(self, cause: errors.PvmigError) -> None:
        """New page streams to the destination, tried until its lease would have run
        out (the destination's session, kept by the streams, waits that long)."""
        self.reconnects += 1
        if self.reconnects > MAX_RECONNECTS:
            raise errors.Unavailable(f"{cause} (the page streams broke {MAX_RECONNECTS} "
                                     "times already: given up)")
        log.warning("migration %s: page streams lost (%s): reconnecting", self.migration_id,
                    cause)
        await self._close()
        deadline = time.monotonic() + min(RECONNECT_S, self.host.session_timeout_s)
        while True:
            self._check_not_ended()
            try:
                await self._connect(hello_timeout_s=RECONNECT_TRY_S)
            except errors.Unavailable as e:
                await self._close()
                if time.monotonic() + RECONNECT_TRY_S > deadline:
                    raise errors.Unavailable(f"{cause}; not back within the lease: {e}") from None
                await asyncio.sleep(RECONNECT_TRY_S / 2)
                continue
            if self.state in SAVE_ENDING:  # aborted while connecting: nobody else closes these
                await self._close()
                self._check_not_ended()
            log.warning("migration %s: page streams back", self.migration_id)
            return

    def _check_not_ended(self) -> None:
        if self.state in SAVE_ENDING:
            raise errors.Aborted(f"migration {self.migration_id} was aborted: {self.why_ended}")

    def _own(self) -> None:
        if self.domain.migration_id != self.migration_id:
            raise errors.FailedPrecondition(
                f"domain {self.domain.name!r} no longer belongs to migration {self.migration_id}")

    # ---- rounds: send_all, send_dirty, send_final

    async def round(self, number: int, final: bool, postcopy: bool = False,
                    storage: bool = False) -> AsyncIterator[pb.RoundProgress]:
        """One round, as the coordinator asks for it: the phase it is, by its place.
        postcopy: the final pass is the switch (no pages; they follow, see postcopy).
        storage: a round of the disks alone (numbered on their own), before memory's."""
        self._own()
        if storage:
            self._require(St.ACTIVE, "a storage round (while the guest runs)")
            if self.storage is None:
                raise errors.FailedPrecondition(
                    f"migration {self.migration_id} was begun without --copy-storage")
            if number != self.storage.rounds_done or self.rounds_done:
                raise errors.InvalidArgument(
                    f"storage round {number} requested: storage round "
                    f"{self.storage.rounds_done} is next, before memory's rounds")
            async for progress in self.storage_round(number):
                yield progress
            return
        if number != self.rounds_done:
            raise errors.InvalidArgument(
                f"round {number} requested, round {self.rounds_done} is next")
        if final:
            self._require(St.SUSPENDED, "the final pass")
            if (number == 0 and not postcopy) or self.domain.state != DomainState.SUSPENDED:
                raise errors.FailedPrecondition(
                    f"domain {self.domain.name} is {self.domain.state}: the final pass comes "
                    "after round 0 and suspend")
            if postcopy and self.transport is not Transport.TCP:
                raise errors.InvalidArgument("post-copy runs over the data channels: "
                                             "migrate with --transport tcp")
            phase = self.switch_to_postcopy() if postcopy else self.send_final()
        else:
            self._require(St.ACTIVE, "a pre-copy round (while the guest runs)")
            if self.domain.state != DomainState.OUTGOING:
                raise errors.FailedPrecondition(
                    f"domain {self.domain.name} is {self.domain.state}: pre-copy rounds run "
                    "while it is running")
            phase = self.send_all() if number == 0 else self.send_dirty(number)
        async for progress in phase:
            yield progress

    async def storage_round(self, number: int) -> AsyncIterator[pb.RoundProgress]:
        """The disks alone: every block first, then those blkback wrote since. In
        write-blocking mode, the guest's writes go through from the first round's end."""
        started = time.monotonic()
        stats = pb.RoundStats(round=number, started_ns=time.monotonic_ns())
        try:
            async for progress in self._send_disks(number, stats, first=number == 0):
                yield progress
        except errors.Unavailable as e:
            if self.state in SAVE_ENDING:
                self._check_not_ended()  # (why it ended, not the broken connection)
            await self._reconnect(e)  # (the blocks are marked again: the next round)
            stats.interrupted = str(e)
        self.host.metrics.rounds.labels("storage").inc()
        if not stats.interrupted:
            self.storage.copied = True  # (every block went once: round 0, or its redo)
            if self._mirror is not None:
                self.storage.mirror_on(self._mirror)
        self.storage.rounds_done += 1
        stats.duration_ns = int((time.monotonic() - started) * 1e9)
        stats.remaining_blocks = self.storage.count()
        self.storage.stats(stats)
        yield pb.RoundProgress(done_pages=stats.sent_blocks + stats.zero_blocks,
                               total_pages=stats.dirty_blocks, bytes=stats.bytes, stats=stats)

    async def _send_disks(self, number: int, stats: pb.RoundStats, first: bool = False,
                          final: bool = False, end: bool = True
                          ) -> AsyncIterator[pb.RoundProgress]:
        """Each disk's blocks for this round, on every stream, then (`end`) the round's
        end; the blocks taken go again if the round does not get through."""
        taken = self.storage.take(first)
        total = sum(len(b) for _, b in taken)
        stats.dirty_blocks = total
        try:
            for i, (disk, blocks) in enumerate(taken):
                async for progress in self._send(blocks, number, stats, total, disk=disk,
                                                 end=end and i == len(taken) - 1,
                                                 final=final):
                    yield progress
        except BaseException:
            self.storage.again(taken)
            raise

    async def send_all(self) -> AsyncIterator[pb.RoundProgress]:
        """Round 0: every frame. What the log holds by then (a storage phase ran since
        begin: all it wrote, 2.4 times the final pass's pages) goes with it: cleared."""
        nr = self.domain.mem.nr_frames

        def every_frame() -> np.ndarray:
            self.domain.log.read_and_clear()
            return np.arange(nr, dtype=np.uint32)
        async for progress in self._precopy_round(0, every_frame, time.monotonic()):
            yield progress

    async def send_dirty(self, number: int) -> AsyncIterator[pb.RoundProgress]:
        """A later round: what the guest dirtied since the last read of the log."""
        async for progress in self._precopy_round(number, self.domain.log.read_and_clear,
                                                  time.monotonic()):
            yield progress

    async def _precopy_round(self, number: int, read_frames, started: float
                             ) -> AsyncIterator[pb.RoundProgress]:
        """With disks being copied, the blocks written since the last round go first,
        then memory's log is read: what the guest dirties while they go waits for the
        next round, not for the final pass (measured: twice the final pass's pages, and
        4 ms more downtime, with the blocks after the frames)."""
        disk_stats, frames = pb.RoundStats(), None
        try:
            if self.storage is not None:
                # (no storage phase ran: --storage-with-memory, the disks' first copy
                # goes with memory's round 0)
                first = not self.storage.copied
                async for progress in self._send_disks(number, disk_stats, first=first,
                                                       end=False):
                    yield progress
                if first:
                    self.storage.copied = True
                    if self._mirror is not None:
                        self.storage.mirror_on(self._mirror)
            frames = read_frames()
            stats = self._round_stats(number, len(frames), time.monotonic())
            stats.MergeFrom(disk_stats)
            async for progress in self._send(frames, number, stats, len(frames)):
                yield progress
        except errors.Unavailable as e:
            if self.state in SAVE_ENDING:
                self._check_not_ended()  # (why it ended, not the broken connection)
            # The page streams broke (the network dropped): this round's frames (and
            # blocks) are dirty again, new streams carry them in the next round.
            if frames is None:
                frames = np.zeros(0, np.uint32)
                stats = self._round_stats(number, 0, time.monotonic())
                stats.MergeFrom(disk_stats)
            self.domain.log.mark(frames)
            await self._reconnect(e)
            stats.interrupted = str(e)
        yield self._round_done(frames, stats, started)

    async def send_final(self) -> AsyncIterator[pb.RoundProgress]:
        """After suspend (and quiesce): the last read of the dirty bitmap, the frames it
        found, the device state, the end of every stream. Delivered once the
        destination acknowledged every stream's end."""
        started = time.monotonic()
        number = self.rounds_done
        disks = self.storage is not None
        disk_first = disks and self.inject.storage_final_first  # (reversed, to show why not)
        disk_stats = pb.RoundStats()
        try:
            if disk_first:
                await self._seal_storage()
                async for progress in self._send_disks(number, disk_stats, final=True,
                                                       end=False):
                    yield progress
                await self.inject.between_final_reads(self.domain)
                self.storage.seal()  # written after this only: what came between is not
            await self.inject.before_final_read(self.domain)
            self.domain.journal.seal()
            frames = self.inject.shape_final(self.domain, self.domain.log.read_and_clear())
            rings = self.inject.rings_last()
            stats = self._round_stats(number, len(frames), started)
            stats.MergeFrom(disk_stats)
            total = len(frames) + (len(rings) if rings is not None else 0)
            stats.dirty_pages = total
            disks_after = disks and not disk_first
            async for progress in self._send(frames, number, stats, total,
                                             end=rings is None and not disks_after, final=True):
                yield progress
            if rings is not None:
                # write-after-final: the buffers are copied; the backends answer now;
                # the rings, copied last, carry their responses
                await self.inject.before_rings(self.domain)
                async for progress in self._send(rings, number, stats, total,
                                                 end=not disks_after, final=True):
                    yield progress
            if disks_after:
                # After every frame is read: a response the copied ring holds was
                # written after its data, whose block the log has by now.
                await self.inject.between_final_reads(self.domain)
                await self._seal_storage()
                async for progress in self._send_disks(number, stats, final=True):
                    yield progress
            # after the final pass's pages are on their way: nothing will send it
            self.inject.after_final_pass(self.domain)
            await self._end_streams()
        finally:  # a failed final pass leaves no round-end check behind
            for ack in self._final_acks:
                ack.cancel()
            self._final_acks = []
            self.inject.end_pass()
        self._check_not_ended()  # (aborted as the ends came back: no commit may follow)
        self._set_state(St.DELIVERED)
        yield self._round_done(frames, stats, started)

    async def _seal_storage(self) -> None:
        """Before the final read of the disks' logs: from here a write reaches only this
        image, and no mirrored write is left on its way (one that arrived after the
        guest resumed there would be written over the resumed guest's own)."""
        self.storage.seal()
        mirror, self._mirror = self._mirror, None
        if mirror is not None:  # (a write it still carried stays marked: in the take)
            await mirror.close()

    async def switch_to_postcopy(self) -> AsyncIterator[pb.RoundProgress]:
        """After suspend: the device state and the frames still to come (every one if no
        round ran; else what the guest dirtied since it was sent), no pages. Delivered
        once the destination acknowledged; the pages follow the commit (postcopy)."""
        started = time.monotonic()
        number = self.rounds_done
        self.domain.journal.seal()
        if number == 0:
            to_come = np.ones(self.domain.mem.nr_frames, bool)
        else:
            to_come = np.zeros(self.domain.mem.nr_frames, bool)
            to_come[self.domain.log.read_and_clear()] = True
        # The info page goes now, with the device state: the resumed guest's first
        # write is to it, and its fault would be waited for inside the downtime.
        info = np.array([guestinfo.INFO_FRAME], np.uint32)
        stats = self._round_stats(number, int(to_come.sum()), started)
        to_come[info] = False
        self.postcopy_frames = to_come
        self._push_after_fault = self.inject.push_after_fault
        for name, n in self.inject.fired.items():
            stats.injected[name] = n
        async for _ in self._send(info, number, stats, 1, end=True, final=True):
            pass
        await self._end_streams(discard=to_come)
        self._check_not_ended()
        self._set_state(St.DELIVERED)
        self.rounds_done += 1
        self.host.metrics.rounds.labels("memory").inc()
        stats.duration_ns = int((time.monotonic() - started) * 1e9)
        stats.remaining_pages = int(to_come.sum())
        yield pb.RoundProgress(done_pages=0, total_pages=0, bytes=0, stats=stats)

    async def postcopy(self) -> AsyncIterator[pb.PostcopyProgress]:
        """After the commit of a switch: every frame still to come, pushed in order and
        the destination's requests first, on the switch's data connections (connection
        0, which carried the device state, the urgent lane; a new epoch after a pause,
        or with one stream); progress until the destination has them all. The transfer
        is the session's, not the call's: a coordinator that goes away mid-way (its
        call cancelled) leaves it running, and asking again watches the same one. A
        broken connection pauses it (progress says so) until recover_postcopy."""
        self._own()
        if self._postcopy_task is None:
            if self.postcopy_frames is None or self.state is not St.COMMITTED:
                raise errors.FailedPrecondition(
                    f"migration {self.migration_id} is {self.state}: post-copy follows the "
                    "commit of a switch to it")
            self._set_state(St.POSTCOPY)
            self._transfer = Transfer(self.domain.mem, self.postcopy_frames,
                                      min(self.settings.batch_pages, POSTCOPY_BATCH_PAGES),
                                      push_after_fault=self._push_after_fault,
                                      limit=self.limit,
                                      halfway=self.inject.postcopy_halfway,
                                      last=self.inject.devices_last(self.domain))
            self._postcopy_task = self._epoch(self._transfer.lanes_up)
        t = self._transfer
        lanes = asyncio.ensure_future(t.lanes_up.wait())
        try:  # (the first progress: the lanes are up, the guest may resume; or paused)
            await asyncio.wait({self._postcopy_task, lanes}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lanes.cancel()
        while not t.finished:
            yield t.progress()
            task = self._postcopy_task
            if task.done():  # paused: a recovery starts the next epoch
                await asyncio.sleep(POSTCOPY_PROGRESS_S)
            else:
                await asyncio.wait({task}, timeout=POSTCOPY_PROGRESS_S)
        yield t.progress(done=True)

    def _epoch(self, up: asyncio.Event, recover: bool = False) -> asyncio.Future:
        task = asyncio.ensure_future(self._run_postcopy(self._transfer, up, recover))
        # (its failure is said in the log by _run_postcopy: retrieved here, or nobody may)
        task.add_done_callback(lambda f: f.cancelled() or f.exception())
        return task

    async def _run_postcopy(self, t: Transfer, up: asyncio.Event, recover: bool) -> None:
        """One epoch of post-copy's data channels: to the end of the transfer, or until
        a connection breaks (then paused: every frame not placed is still here)."""
        t.begin_epoch()
        try:
            if recover or len(self._streams) < 2:
                await self._close()
                self._dest = AgentClient(self.dest_address, "the destination agent",
                                         self.host.security)
                await self._open_data_channels(extra=1, recover=recover)
            # (else the switch's connections go on as post-copy's: the first, which
            # carried the device state, the urgent lane; none opened in the downtime)
            lane, *push = self._streams
            if recover:
                t.recover(await lane.read_missing(t.mem.nr_frames))
                self._set_state(St.POSTCOPY)
            tasks = [asyncio.create_task(lane.serve_requests(t)),
                     *(asyncio.create_task(s.push(t)) for s in push)]
            up.set()
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            t.finished = True
            self._count_postcopy_bytes(t)
            await self._close()
        except (errors.PvmigError, OSError) as e:
            t.end_epoch(str(e))
            self._count_postcopy_bytes(t)
            await self._close()
            self._set_state(St.POSTCOPY_PAUSED)
            log.error("migration %s: post-copy paused: %s; the guest at %s lacks up to %d "
                      "frame(s) that only this host holds: pvmig recover goes on",
                      self.migration_id, e, self.dest_address, t.left)
            return
        log.info("migration %s: post-copy done: %d frames, %d pushed, %d asked for (%d of "
                 "them sent twice), %d recover(ies), %d lost and sent again",
                 self.migration_id, len(t.frames), t.pushed, t.requested, t.resent,
                 t.epochs - 1, t.lost)

    def _count_postcopy_bytes(self, t: Transfer) -> None:
        """The metrics' sent bytes: what this epoch of the transfer added."""
        self.host.metrics.sent.labels("memory").inc(t.bytes - self._postcopy_counted)
        self._postcopy_counted = t.bytes

    async def recover_postcopy(self) -> pb.PostcopyProgress:
        """A paused post-copy goes on: new data channels (the destination's lane first
        names what it lacks). Answered once they are up; once, whoever asks (an
        operator's pvmig recover and the agents' watchdogs may at the same time)."""
        self._own()
        if self.state is St.POSTCOPY or (self.state in SAVE_COMMITTED and self._transfer
                                          and self._transfer.finished):
            return self._transfer.progress()  # not paused: nothing to recover
        if self._recovering is None:
            self._require(St.POSTCOPY_PAUSED, "recovering post-copy (paused)")
            self._set_state(St.POSTCOPY_RECOVER)
            self._recovering = asyncio.ensure_future(self._recover())
            self._recovering.add_done_callback(self._recovered)
        await asyncio.shield(self._recovering)
        return self._transfer.progress()

    async def _recover(self) -> None:
        up = asyncio.Event()
        self._postcopy_task = self._epoch(up, recover=True)
        lanes = asyncio.ensure_future(up.wait())
        try:
            await asyncio.wait({self._postcopy_task, lanes}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lanes.cancel()
        if not up.is_set():  # paused again
            raise errors.Unavailable(f"migration {self.migration_id}: post-copy not "
                                     f"recovered: {self._transfer.paused_reason}")
        log.warning("migration %s: post-copy recovered: %d frame(s) to go (%d lost on the "
                    "broken connections)", self.migration_id, self._transfer.left,
                    self._transfer.lost)

    def _recovered(self, _) -> None:
        self._recovering = None

    def ask_postcopy(self) -> None:
        """pvmig migrate-postcopy: the coordinator switches after the current round."""
        if not self.allow_postcopy:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} was not started with --allow-postcopy: its "
                "destination's memory cannot take pages after the guest resumes there")
        self._require(St.ACTIVE, "a switch to post-copy (asked during pre-copy)")
        self.postcopy_asked = True
        log.info("migration %s: post-copy asked for", self.migration_id)

    def _round_stats(self, number: int, dirty: int, started: float) -> pb.RoundStats:
        since, self._last_read = started - self._last_read, started
        return pb.RoundStats(round=number, dirty_pages=dirty,
                             started_ns=time.monotonic_ns(), interval_ns=int(since * 1e9),
                             dirty_rate=dirty / since if number and since > 0 else 0.0)

    def _round_done(self, frames: np.ndarray, stats: pb.RoundStats,
                    started: float) -> pb.RoundProgress:
        self.rounds_done += 1
        self.host.metrics.rounds.labels("memory").inc()
        stats.duration_ns = int((time.monotonic() - started) * 1e9)
        stats.remaining_pages = self.domain.log.count()
        if self.storage is not None:
            stats.remaining_blocks = self.storage.count()
            self.storage.stats(stats)
        for name, n in self.inject.fired.items():
            stats.injected[name] = n
        stats.postcopy_asked = self.postcopy_asked
        return pb.RoundProgress(done_pages=len(frames), total_pages=len(frames),
                                bytes=stats.bytes, stats=stats)

    async def _send(self, frames: np.ndarray, number: int, stats: pb.RoundStats,
                    total: int, end: bool = True, final: bool = False, disk=None
                    ) -> AsyncIterator[pb.RoundProgress]:
        """Send frames on every stream (or, with `disk`, that disk's blocks); with
        `end`, each stream then ends the round with the count of what it sent in it."""
        batches = Batches(frames, self.settings.batch_pages, self._seq)
        tally = Tally()
        pumps = [asyncio.create_task(self._pump(s, batches, number, tally, end, final, disk))
                 for s in self._streams]
        try:
            while True:
                done, pending = await asyncio.wait(pumps, timeout=PROGRESS_EVERY_S,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # the first failure ends the round
                if not pending:
                    break
                # A pump waiting for the transport's room is not woken by the call's
                # cancel (a crawling link): an aborted round ends here, the pumps below.
                self._check_not_ended()
                done = (stats.sent_blocks + stats.zero_blocks if disk is not None
                        else stats.sent_pages + stats.zero_pages)
                yield pb.RoundProgress(done_pages=done + tally.normal + tally.zero,
                                       total_pages=total, bytes=stats.bytes + tally.bytes)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._seq = batches.next_seq
            self.host.metrics.sent.labels("memory" if disk is None else "disk").inc(
                tally.bytes)
            if disk is not None:
                stats.sent_blocks += tally.normal
                stats.zero_blocks += tally.zero
                stats.block_bytes += tally.bytes
                self.storage.bytes += tally.bytes
                self.storage.blocks_sent += tally.normal + tally.zero
            else:
                stats.sent_pages += tally.normal
                stats.zero_pages += tally.zero
            stats.bytes += tally.bytes

    async def _pump(self, stream: PageStream | DataStream, batches: Batches, number: int,
                    tally: Tally, end: bool, final: bool = False, disk=None) -> None:
        """Send batches until there are none left, then (`end`) this stream's round end.
        The streams share one list: each batch goes on exactly one stream."""
        if isinstance(stream, DataStream):
            src = Source(self.domain, self.inject, asyncio.get_running_loop(), self.limit,
                         self.corrupt_seq, tally, disk=disk,
                         hold=self.storage.hold if disk is not None else None)
            if disk is not None:
                await stream.send_blocks(src, batches, number)
            else:
                await stream.send(src, batches, number)
            if end:
                self._settle(await stream.end_round(number, wait=not final), final=False)
            return
        journal = self.domain.journal
        for seq, frames in batches:
            record = stream.record()
            torn = await self.inject.tear(self.domain, frames) if self.inject.tearing else None
            packed = pages.pack(self.domain.mem, frames, seq=seq, round=number,
                                out=record.pages, torn=torn, compressor=stream.compressor)
            if seq == self.corrupt_seq:
                record.pages.checksum ^= 1
            journal.copy(frames)
            if torn is not None:
                journal.write(torn[0], TORN)
            if self.limit is not None:
                await self.limit.take(packed.wire_bytes)
            await stream.write(record)
            stream.sent_in_round += len(frames)
            tally.add(packed.normal, packed.zero, packed.wire_bytes)
        if end and final:  # its acknowledgement is awaited with the stream's end
            self._final_acks.append(await stream.end_round(number, wait=False))
        elif end:
            await stream.end_round(number)

    def _settle(self, mismatched: list[Mismatch], final: bool) -> None:
        """Batches whose checksum failed after they landed at the destination. The guest
        runs while its pages are sent from its RAM, so a batch may change between its
        checksum and its send. If the guest wrote some of its frames since (the dirty
        log has them: they go again in the next round) or dom0 did (the journal: marked
        to go again; in the final pass it explains them, as the verifier reports it),
        the batch raced a write. Only the frames written go again, not the batch: on a
        slow link a busy guest races most batches, and resending them whole kept a 64
        MiB guest in pre-copy for 8 rounds and 7 times its RAM (a 15 s link drop,
        tests/faults/test_netfaults.py). If nothing wrote them, the batch was damaged on
        the way: the migration aborts, and the destination's copy never runs. (Damage
        in a batch that also raced a write is left to the verifier, which compares
        every frame at the end.)"""
        for m in mismatched:
            dom0 = self.domain.journal.written_since(m.frames, m.tick)
            guest = (self.domain.log.map[m.frames] != 0 if not final
                     else np.zeros(len(m.frames), bool))
            if not (dom0 | guest).any():
                raise errors.DataLoss(
                    f"batch {m.seq}: checksum mismatch at the destination, and nothing "
                    "wrote its frames since they were sent: the data was damaged on the "
                    "way (the destination's copy will not run)")
            if not final:
                self.domain.log.mark(m.frames[dom0 & ~guest])
        if mismatched:
            log.info("migration %s: %d batch(es) changed while sent: %s", self.migration_id,
                     len(mismatched), "their written frames go again" if not final
                     else "explained by dom0")

    async def _end_streams(self, discard: np.ndarray | None = None) -> None:
        first, *rest = self._streams
        backends = self.domain.pv.backend_records() if self.domain.pv is not None else {}
        device_state = DeviceState(self.vcpu, backends, self.settings.recovery).to_pb()
        if isinstance(first, DataStream):
            answers = await asyncio.gather(
                first.end(len(self._streams), device_state.SerializeToString(), discard),
                *(s.end(len(self._streams)) for s in rest))
            self._settle([m for found in answers for m in found], final=True)
            return
        acks, self._final_acks = self._final_acks, []
        try:
            await asyncio.gather(first.end(len(self._streams), device_state),
                                 *(s.end(len(self._streams)) for s in rest), *acks)
        finally:
            for ack in acks:  # a failed end leaves no round check unawaited
                ack.cancel()

    # ---- suspend, quiesce, commit, complete, abort

    async def suspend(self) -> pb.SuspendReply:
        self._own()
        self._require(St.ACTIVE, "suspend")
        # while the guest still issues: what the injection points need in flight
        await self.inject.before_suspend(self.domain)
        self._check_not_ended()  # (an abort while it waited gave the guest back)
        self._own()
        self.vcpu, t = await self.domain.suspend()
        self._check_not_ended()  # (aborted meanwhile: the release resumes the guest)
        self._set_state(St.SUSPENDED)
        return pb.SuspendReply(suspended_ns=t, vcpu_bytes=len(self.vcpu))

    def throttle(self, percent: int) -> None:
        """auto-converge: the hypervisor keeps the guest's vCPU off `percent`% of the time."""
        self._own()
        self._require(St.ACTIVE, "throttling (only a running guest is throttled)")
        self.domain.set_throttle(percent)

    async def quiesce(self) -> pb.QuiesceReply:
        """After suspend, before the final pass: the backends stop and unmap."""
        self._own()
        self._require(St.SUSPENDED, "quiescing the backends (after the guest suspends)")
        started = time.monotonic()
        done = await self.domain.pv.quiesce() if self.domain.pv is not None else {}
        return pb.QuiesceReply(duration_ns=int((time.monotonic() - started) * 1e9), **done)

    def commit(self) -> None:
        """The point of no return. No await in here: Resolve (recovery) and Commit see
        each other whole, whichever comes first."""
        self._own()
        if self.state in SAVE_ENDING:
            raise errors.Aborted(f"migration {self.migration_id} is being aborted: "
                                 f"{self.why_ended}")
        if self.state is not St.DELIVERED or self.domain.state != DomainState.SUSPENDED:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is {self.state} (domain {self.domain.state}): "
                "commit comes after suspend and a final pass the destination acknowledged")
        faults.point("commit")
        self.host.commits.record(self.migration_id, Role.SOURCE, self.domain.name)
        faults.point("committed")
        self._set_state(St.COMMITTED)

    async def frame_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of the source's memory as the final pass left it (the guest is suspended)."""
        self._own()
        if self.domain.state != DomainState.SUSPENDED:
            raise errors.FailedPrecondition("frame hashes are taken after the final pass")
        image = self.settings.save_image
        if image:  # the image and the hashes are one snapshot
            hashes = await asyncio.to_thread(save_image, self.domain.mem, image)
        else:
            hashes = await asyncio.to_thread(self.domain.mem.frame_hashes)
        # After the hashes: backends go on writing while they are taken, and a write
        # the hashes saw must be in the journal the causes come from.
        causes = self.domain.journal.causes()
        if image:
            await asyncio.to_thread(verify.save_causes, causes, image)
        for chunk in verify.chunks(hashes, causes):
            yield chunk

    async def block_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of the source's disk images now (after the final pass), and which
        blocks blkback wrote after it (LATE: the frontend replays them there)."""
        self._own()
        if self.storage is None:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} did not copy storage")
        if not self.storage.sealed:
            raise errors.FailedPrecondition("block hashes are taken after the final pass")
        hashes = await asyncio.to_thread(self.storage.hashes)
        causes = self.storage.late()  # after the hashes: a write they saw is in it
        for chunk in verify.chunks(hashes, causes):
            yield chunk

    async def complete(self, abandon: bool = False, downtime_ns: int = 0) -> None:
        """Destroy the source copy; called by the coordinator, or by recovery (once, if
        both ask at the same time). abandon: post-copy's destination died with the
        guest, which ran there: this older copy must never run, sent or not.
        downtime_ns: the coordinator's measure, for the metrics (once)."""
        if not self.committed:
            raise errors.FailedPrecondition("the source copy is destroyed only after commit")
        if abandon and self.state in SAVE_POSTCOPY:
            self._transfer.end_epoch("abandoned: the destination lost the guest")
            if self._postcopy_task is not None:
                self._postcopy_task.cancel()
        elif self.state in SAVE_POSTCOPY and not (self._transfer and self._transfer.finished):
            raise errors.FailedPrecondition(
                f"migration {self.migration_id}: post-copy has not delivered every frame, "
                "and this host holds the only copy of the rest")
        faults.point("complete")
        if self._completing is None:
            self._own()
            if downtime_ns > 0:
                self.host.metrics.downtime.observe(downtime_ns / 1e9)
            self._set_state(St.COMPLETING)
            self._completing = asyncio.ensure_future(self._destroy())
        await asyncio.shield(self._completing)

    async def _destroy(self) -> None:
        await self._close()
        self.host.saves.remove(self.migration_id)
        paths = self.storage.paths if self.storage is not None else []
        if self.storage is not None:
            self.storage.stop()
        await self.host.drop(self.domain.name)
        if self.settings.remove_source_storage:  # asked for: the copy is the disk now
            for path in paths:
                path.unlink(missing_ok=True)
                log.info("migration %s: removed the source's disk image %s",
                         self.migration_id, path)
        self._set_state(St.COMPLETED)
        self.host.migration_ended("source", self.migration_id, "completed")

    async def abort(self, reason: str, cancelled: bool = False) -> None:
        if self.committed:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is committed: the guest belongs to the "
                "destination now")
        if self.state in SAVE_UNDECIDED:
            self.why_ended = reason
            self.cancelled = cancelled
            self._set_state(St.ABORTING)
        log.warning("migration %s aborted: %s", self.migration_id, reason)
        await self._release()

    # ---- recovery: the coordinator is gone (pvmig recover, or this host's watchdog)

    @property
    def holds_copy(self) -> bool:
        """Its suspended copy is still here (not being destroyed)."""
        return self.state is St.COMMITTED and self.domain.migration_id == self.migration_id

    async def resolve(self, reason: str) -> Status:
        """The decision, made now: committed stays committed (post-copy's frames may
        still be going, or paused); anything else is aborted (the guest resumes here)
        before a late Commit could land."""
        if self.committed:
            if self.state in SAVE_POSTCOPY and not self._transfer.finished:
                return (Status.POSTCOPY_ACTIVE if self.state is St.POSTCOPY
                        else Status.POSTCOPY_PAUSED)
            return Status.COMMITTED
        if self.state is St.ROLLED_BACK:
            await self._release()
            return Status.ROLLED_BACK
        await self.abort(reason)
        return Status.ABORTED

    async def rollback(self, reason: str) -> None:
        """Committed, but the destination holds no running copy: the only copy left is
        this suspended one. Recorded first, so that no recovery resumes the other side."""
        if self.state is not St.ROLLED_BACK:
            if self.state is not St.COMMITTED:
                raise errors.FailedPrecondition(
                    f"migration {self.migration_id}: only a committed migration whose "
                    "source copy is still here is rolled back")
            self.host.commits.record(self.migration_id, Role.SOURCE, self.domain.name,
                                     Decision.ROLLED_BACK)
            log.warning("migration %s rolled back: %s", self.migration_id, reason)
            self.why_ended = reason
            self._set_state(St.ROLLED_BACK)
            self.host.migration_ended("source", self.migration_id, "failed")
        await self._release()  # once, whoever asks

    async def expire(self) -> None:
        """The lease ran out: no coordinator. Before commit, abort; after it, finish
        from what the destination holds (pvmig.migration.recovery)."""
        if not self.committed:
            await self.abort(f"no word from the coordinator for {self.lease.timeout_s:.0f} s "
                             "before commit")
            return
        async with AgentClient(self.dest_address, "the destination agent",
                               self.host.security) as dest:
            await dest.hello(f"agent {self.host.name}")  # (the same protocol, or a clear no)
            outcome = await recovery.recover(_Local(self), recovery.RemoteDest(dest),
                                             self.migration_id)
        log.warning("%s (the coordinator gone; settled by the source)", outcome.describe())
        if self.state in SAVE_POSTCOPY:  # its frames still going: asked again after a lease
            self.lease.renew()

    async def _release(self) -> None:
        """Close the streams and give the domain back, running where it was: once, and
        to the end even if the caller gives up (an abort, a rollback and a recovery may
        all ask). The session stays findable until the guest runs again."""
        if self._releasing is None:
            self._releasing = asyncio.ensure_future(self._give_back())
        await asyncio.shield(self._releasing)

    async def _give_back(self) -> None:
        if self.storage is not None:  # (first: a held round's thread lets go)
            self.storage.stop()
        try:
            await self._close()
            await self._resume_here()
        finally:
            self.host.saves.remove(self.migration_id)
            if self.state is St.ABORTING:
                self._set_state(St.ABORTED)
                self.host.migration_ended("source", self.migration_id,
                                          "aborted" if self.cancelled else "failed")

    async def _resume_here(self) -> None:
        dom = self.domain
        if dom.migration_id != self.migration_id:
            return
        dom.journal.disarm()
        await dom.wait_suspend_outcome()
        dom.set_throttle(0)
        dom.migration_id = ""
        self.inject.disarm(dom)
        if dom.pv is not None:
            dom.pv.set_policy(backend_log=False, xenstore_track=False)
            dom.pv.set_grant_policy()
            dom.pv.unquiesce()  # (a no-op unless quiesce=backend stopped them)
        if dom.state == DomainState.SUSPENDED:
            await dom.cancel_suspend()
        elif dom.state == DomainState.OUTGOING:
            dom.state = DomainState.RUNNING
        if dom.state == DomainState.RUNNING:
            self.host.records.refresh(dom)

    async def _close(self) -> None:
        if self.storage is not None:
            self.storage.mirror_off()  # (back on with new connections: _open_data_channels)
        mirror, self._mirror = self._mirror, None
        await asyncio.gather(*(s.close() for s in [*self._streams, *([mirror] if mirror else [])]))
        self._streams = []
        if self._dest is not None:
            await self._dest.close()


def _check_copy_storage(dom: Domain, settings: Settings, request: pb.BeginRequest,
                        host: Host) -> None:
    if dom.pv is None or not dom.pv.disks:
        raise errors.InvalidArgument(f"--copy-storage: domain {dom.name!r} has no disk")
    if (settings.transport or host.transport) is not Transport.TCP:
        raise errors.InvalidArgument("--copy-storage runs over the data channels: migrate "
                                     "with --transport tcp")
    if request.allow_postcopy:
        raise errors.InvalidArgument("--copy-storage with post-copy: not supported (the "
                                     "disk's last blocks go in a final pass)")
    if (settings.storage_mode is StorageMode.WRITE_BLOCKING
            and settings.streams >= policy.MAX_STREAMS):
        raise errors.InvalidArgument(
            f"write-blocking takes a data connection of its own beside the streams: at "
            f"most {policy.MAX_STREAMS - 1} streams with it, not {settings.streams}")


async def resolve(host: Host, migration_id: str, reason: str, domain: str = "",
                  instance: str = "") -> SideState:
    """Recovery's question to the source: the decision, made now if need be."""
    session = host.saves.get(migration_id)
    if session is not None:
        status = await session.resolve(reason)
        return SideState(status, session.domain.name,
                         holds_copy=status is Status.COMMITTED and session.holds_copy)
    record = host.commits.read(migration_id, Role.SOURCE)
    if record is not None:
        return SideState(Status(record.state.value), record.domain,
                         holds_copy=parking.holds(host, migration_id))
    if domain and instance and instance != host.instance_id and domain not in host.domains:
        # this agent restarted since the migration began (the domains it parked or a
        # crash left are back before it serves), and the guest died with its host.
        # Said once for good: nothing may revive this copy after the destination's.
        host.commits.record(migration_id, Role.SOURCE, domain, Decision.LOST)
        return SideState(Status.LOST, domain)
    return SideState(Status.UNKNOWN, domain)


class _Local:
    """This agent's save half, as recovery.recover drives a source."""

    address = "this agent"

    def __init__(self, session: SaveSession) -> None:
        self.session = session
        self.name = session.host.name

    async def resolve(self, migration_id: str, domain: str, instance: str) -> SideState:
        status = await self.session.resolve("its coordinator is gone")
        return SideState(status, self.session.domain.name,
                         holds_copy=status is Status.COMMITTED and self.session.holds_copy)

    async def complete(self, migration_id: str) -> None:
        await self.session.complete()

    async def rollback(self, migration_id: str, reason: str) -> None:
        await self.session.rollback(reason)

    async def recover_postcopy(self, migration_id: str) -> None:
        await self.session.recover_postcopy()

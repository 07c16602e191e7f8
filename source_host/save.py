"""The save side of one migration (Xen's xg_sr_save.c, as asyncio).

Phases, each one call from the coordinator:
    begin    connect to the destination agent, open the page streams, log-dirty on
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
from typing import AsyncIterator, Iterator

import msgpack
import numpy as np

from pvmig import errors, faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig.dom0.domain import OUTGOING, RUNNING, SUSPENDED, Domain
from pvmig.host import parking
from pvmig.host.host import Host, Lease, check_migration_id
from pvmig.hv.foreign_writes import TORN
from pvmig.hv.memory import PAGE_SIZE, save_image
from pvmig.migration import pages, verify
from pvmig.rpc.client import AgentClient

from .ratelimit import RateLimit
from .stream import PageStream

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.1
HELLO_TIMEOUT_S = 15.0  # under the coordinator's deadline for Begin, so this error wins
RECONNECT_S = 20.0     # page streams lost in pre-copy: made anew for this long at most
RECONNECT_TRY_S = 2.0  # (and no longer than the session's lease)
MAX_RECONNECTS = 3     # per migration: a failure that comes back each time is no drop
INJECTION_POINTS = {"response-before-final", "write-after-final", "torn-copy",
                    "xenstore-after-final"}
DEFAULT_STREAMS = pages.DEFAULT_STREAMS


@dataclass
class SaveSession:
    host: Host
    domain: Domain
    migration_id: str
    dest_address: str
    lease: Lease
    batch_pages: int = pages.BATCH_PAGES
    nr_streams: int = DEFAULT_STREAMS
    committed: bool = False
    aborting: str = ""  # why, once an abort has begun: no commit may follow it
    rolled_back: bool = False
    delivered: bool = False  # the destination acknowledged the end of every stream
    rounds_done: int = 0
    quiesce_policy: str = "none"
    quiesced: bool = False
    recovery: str = "replay"
    injected: dict = field(default_factory=dict)
    save_image: str = ""
    compress: str = ""  # "" or "zstd": each stream compresses what it sends
    limit: RateLimit | None = None  # the bandwidth cap, if any
    vcpu: bytes | None = None
    _dest: AgentClient | None = None
    _streams: list[PageStream] = field(default_factory=list)
    _seq: int = 0
    _last_read: float = 0.0
    _torn: tuple | None = None  # (frame, finish): injection point torn-copy
    _keep: frozenset = frozenset()  # its frame, which write-after-final leaves alone
    _ring_last: np.ndarray | None = None  # injection point write-after-final
    _final_acks: list = field(default_factory=list)  # the final pass's round ends
    _completing: asyncio.Future | None = None
    _releasing: asyncio.Future | None = None
    _dest_instance: str = ""
    reconnects: int = 0

    # ---- begin

    @classmethod
    async def begin(cls, host: Host, request: pb.BeginRequest) -> "SaveSession":
        check_migration_id(request.migration_id)
        dom = host.domain(request.domain)
        if request.migration_id in host.saves:
            raise errors.AlreadyExists(f"migration {request.migration_id} already exists")
        if not 0 <= request.streams <= pages.MAX_STREAMS:
            raise errors.InvalidArgument(
                f"streams must be within 1..{pages.MAX_STREAMS}, not {request.streams}")
        if not 0 <= request.batch_pages <= pages.MAX_BATCH_PAGES:
            raise errors.InvalidArgument(
                f"batch_pages must be within 1..{pages.MAX_BATCH_PAGES}, not {request.batch_pages}")
        if dom.migration_id:
            raise errors.FailedPrecondition(
                f"domain {dom.name!r} is already migrating ({dom.migration_id})")
        if dom.state != RUNNING:
            raise errors.FailedPrecondition(f"domain {dom.name!r} is {dom.state}, not running")
        if request.quiesce not in ("", "none", "backend"):
            raise errors.InvalidArgument(
                f"quiesce policy {request.quiesce!r}: use 'none' or 'backend'")
        session = cls(host, dom, request.migration_id, request.dest_address,
                      Lease(host.session_timeout_s),
                      request.batch_pages or pages.BATCH_PAGES,
                      request.streams or DEFAULT_STREAMS)
        session.quiesce_policy = request.quiesce or "none"
        if request.recovery not in ("", "replay", "naive"):
            raise errors.InvalidArgument(
                f"recovery policy {request.recovery!r}: use 'replay' or 'naive'")
        session.recovery = request.recovery or "replay"
        session.save_image = request.save_image
        if request.persistent_grants not in ("", "on", "off"):
            raise errors.InvalidArgument(
                f"persistent grants {request.persistent_grants!r}: use 'on' or 'off'")
        if request.compress not in ("", "none", pages.ZSTD):
            raise errors.InvalidArgument(
                f"compression {request.compress!r}: use 'none' or '{pages.ZSTD}'")
        session.compress = request.compress if request.compress != "none" else ""
        if request.max_bandwidth_mbps < 0:
            raise errors.InvalidArgument(
                f"max bandwidth must be >= 0 Mbit/s, not {request.max_bandwidth_mbps}")
        if request.max_bandwidth_mbps:
            session.limit = RateLimit(request.max_bandwidth_mbps)
        if request.grant_mode not in ("", "map", "copy"):
            raise errors.InvalidArgument(f"grant mode {request.grant_mode!r}: use 'map' or 'copy'")
        if dom.pv is not None:  # before anything is claimed: a refusal changes nothing
            dom.pv.set_grant_policy(persistent=request.persistent_grants,
                                    grant_mode=request.grant_mode)
        # Claim the domain before the first await: a second Begin must find it taken.
        dom.migration_id, dom.state = request.migration_id, OUTGOING
        host.saves[request.migration_id] = session
        try:
            await session._connect()
            # (a crash from here on: the next start revives the guest only if this
            # source never committed, and records the abort: pvmig.host.parking)
            parking.remember(host, dom, migration_id=request.migration_id, role="source",
                             dest=request.dest_address,
                             dest_name=session._dest.hello_reply.agent_name)
        except BaseException:
            await session._release()
            raise
        if dom.pv is not None:
            unknown = set(request.inject) - INJECTION_POINTS
            if unknown:
                await session._release()
                raise errors.InvalidArgument(
                    f"unknown injection point(s) {sorted(unknown)}: "
                    f"known are {sorted(INJECTION_POINTS)}")
            dom.pv.set_policy(backend_log=request.backend_log,
                              xenstore_track=request.xenstore_track,
                              inject=tuple(request.inject))
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
        self._streams = [PageStream(self._dest.channel, self.migration_id, self.dest_address)
                         for _ in range(self.nr_streams)]
        if self.compress:
            import zstandard
            for s in self._streams:  # a compressor is not to be shared between streams
                s.compressor = zstandard.ZstdCompressor(level=1)

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
            self._check_not_aborted()
            try:
                await self._connect(hello_timeout_s=RECONNECT_TRY_S)
            except errors.Unavailable as e:
                await self._close()
                if time.monotonic() + RECONNECT_TRY_S > deadline:
                    raise errors.Unavailable(f"{cause}; not back within the lease: {e}") from None
                await asyncio.sleep(RECONNECT_TRY_S / 2)
                continue
            if self.aborting:  # aborted while connecting: nobody else will close these
                await self._close()
                self._check_not_aborted()
            log.warning("migration %s: page streams back", self.migration_id)
            return

    def _check_not_aborted(self) -> None:
        if self.aborting:
            raise errors.Aborted(f"migration {self.migration_id} was aborted: {self.aborting}")

    def _own(self) -> None:
        if self.domain.migration_id != self.migration_id:
            raise errors.FailedPrecondition(
                f"domain {self.domain.name!r} no longer belongs to migration {self.migration_id}")

    # ---- rounds

    async def round(self, number: int, final: bool) -> AsyncIterator[pb.RoundProgress]:
        self._own()
        if final and (self.domain.state != SUSPENDED or self.rounds_done == 0):
            raise errors.FailedPrecondition("the final pass comes after round 0 and suspend")
        if not final and self.domain.state != OUTGOING:
            raise errors.FailedPrecondition(
                f"domain {self.domain.name} is {self.domain.state}: pre-copy rounds run "
                "while it is running")
        if number != self.rounds_done:
            raise errors.InvalidArgument(f"round {number} requested, round {self.rounds_done} is next")
        started = time.monotonic()
        if number == 0:
            frames = np.arange(self.domain.mem.nr_frames, dtype=np.uint32)
        elif final:
            frames = await self._final_read()
        else:
            frames = self.domain.log.read_and_clear()
        since, self._last_read = started - self._last_read, started
        stats = pb.RoundStats(round=number, dirty_pages=len(frames), started_ns=time.monotonic_ns(),
                              interval_ns=int(since * 1e9),
                              dirty_rate=len(frames) / since if number and since > 0 else 0.0)
        rings, self._ring_last = self._ring_last, None
        total = len(frames) + (len(rings) if rings is not None else 0)
        stats.dirty_pages = total
        try:
            try:
                async for progress in self._send(frames, number, stats, total,
                                                 end=rings is None, final=final):
                    yield progress
            except errors.Unavailable as e:
                if final or self.aborting:
                    raise
                # The page streams broke (the network dropped): this round's frames are
                # dirty again, new streams carry them in the next round.
                self.domain.log.mark(frames)
                await self._reconnect(e)
                stats.interrupted = str(e)
            if rings is not None:
                # injection point write-after-final: the final pass has copied the I/O
                # buffers; the backends answer now; the rings, copied last, carry them
                self.injected.update(await self.domain.pv.after_final_read(self._keep))
                async for progress in self._send(rings, number, stats, total, end=True,
                                                 final=final):
                    yield progress
            if final:
                if self.domain.pv is not None and self.domain.pv.inject:
                    # after the final pass's pages are on their way: nothing will send it
                    self.injected.update(self.domain.pv.after_final_pass())
                await self._end_streams()
        finally:  # a failed final pass leaves no round-end check behind
            for ack in self._final_acks:
                ack.cancel()
            self._final_acks, self._torn = [], None
        self.rounds_done += 1
        stats.duration_ns = int((time.monotonic() - started) * 1e9)
        stats.remaining_pages = self.domain.log.count()
        for name, n in self.injected.items():
            stats.injected[name] = n
        yield pb.RoundProgress(done_pages=len(frames), total_pages=len(frames),
                               bytes=stats.bytes, stats=stats)

    async def _send(self, frames: np.ndarray, number: int, stats: pb.RoundStats,
                    total: int, end: bool = True, final: bool = False
                    ) -> AsyncIterator[pb.RoundProgress]:
        """Send frames on every stream; with `end`, each stream then ends the round
        with the count of what it sent in it."""
        batches = self._batches(frames)
        pumps = [asyncio.create_task(self._pump(s, batches, number, stats, end, final))
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
                self._check_not_aborted()
                yield pb.RoundProgress(done_pages=stats.sent_pages + stats.zero_pages,
                                       total_pages=total, bytes=stats.bytes)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _final_read(self) -> np.ndarray:
        """The last read of the dirty bitmap, and the injection points around it."""
        pv = self.domain.pv
        if pv is not None and pv.inject:
            self.injected.update(await pv.before_final_read())
        self.domain.journal.seal()
        frames = self.domain.log.read_and_clear()
        if pv is None or not pv.inject:
            return frames
        self._torn = pv.torn_target()
        if self._torn is not None:
            # as though the guest had touched the frame last: the final pass copies it
            self._keep = frozenset([self._torn[0]])
            frames = np.union1d(frames, np.array([self._torn[0]], dtype=frames.dtype))
        if "torn-copy" in pv.inject:
            self.injected["torn-copy"] = 0  # until the copy reaches the frame
        if "write-after-final" in pv.inject:
            # The worst order, forced: buffers copied before the backends write them,
            # rings copied after they publish the responses (as where a guest's ring
            # lies above its buffers in its pseudo-physical map).
            rings = np.array(pv.ring_frames(), dtype=frames.dtype)
            self._ring_last = rings
            frames = np.setdiff1d(frames, rings)
        return frames

    def _batches(self, frames: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, len(frames), self.batch_pages):
            yield self._seq, frames[lo:lo + self.batch_pages]
            self._seq += 1

    async def _pump(self, stream: PageStream, batches, number: int, stats: pb.RoundStats,
                    end: bool, final: bool = False) -> None:
        """Send batches until there are none left, then (`end`) this stream's round end.
        The streams share one iterator: each batch goes on exactly one stream."""
        journal = self.domain.journal
        for seq, frames in batches:
            record = stream.record()
            torn = await self._tear(frames) if self._torn is not None else None
            packed = pages.pack(self.domain.mem, frames, seq=seq, round=number,
                                out=record.pages, torn=torn, compressor=stream.compressor)
            journal.copy(frames)
            if torn is not None:
                journal.write(torn[0], TORN)
            if self.limit is not None:
                await self.limit.take(packed.wire_bytes)
            await stream.write(record)
            stream.sent_in_round += len(frames)
            stats.sent_pages += packed.normal
            stats.zero_pages += packed.zero
            stats.bytes += packed.wire_bytes
        if end and final:  # its acknowledgement is awaited with the stream's end
            self._final_acks.append(await stream.end_round(number, wait=False))
        elif end:
            await stream.end_round(number)

    async def _tear(self, frames: np.ndarray) -> tuple[int, np.ndarray] | None:
        """Injection point torn-copy: the copy of the target frame has read its first
        half when the backend finishes the read into it."""
        frame, finish = self._torn
        if not (frames == frame).any():
            return None
        self._torn = None
        head = self.domain.mem.pages[frame, :PAGE_SIZE // 2].copy()
        self.injected["torn-copy"] += await finish()
        return frame, head

    async def _end_streams(self) -> None:
        first, *rest = self._streams
        records = self.domain.pv.backend_records() if self.domain.pv is not None else {}
        records["policy"] = {"recovery": self.recovery}
        device_state = pb.DeviceState(vcpu=self.vcpu, devices=msgpack.packb(records))
        acks, self._final_acks = self._final_acks, []
        try:
            await asyncio.gather(first.end(len(self._streams), device_state),
                                 *(s.end(len(self._streams)) for s in rest), *acks)
        finally:
            for ack in acks:  # a failed end leaves no round check unawaited
                ack.cancel()
        self.delivered = True

    # ---- suspend, commit, complete, abort

    async def suspend(self) -> pb.SuspendReply:
        self._own()
        if self.domain.pv is not None and self.domain.pv.inject:
            # while the guest still issues: a read held in flight across the suspend,
            # so that the injection points find one at the final pass every time
            await self.domain.pv.hold_reads()
            self._check_not_aborted()  # (an abort while it waited gave the guest back)
            self._own()
        self.vcpu, t = await self.domain.suspend()
        return pb.SuspendReply(suspended_ns=t, vcpu_bytes=len(self.vcpu))

    def throttle(self, percent: int) -> None:
        """auto-converge: the hypervisor keeps the guest's vCPU off `percent`% of the time."""
        self._own()
        if self.domain.state != OUTGOING:
            raise errors.FailedPrecondition(
                f"domain {self.domain.name} is {self.domain.state}: only a running guest "
                "is throttled")
        self.domain.set_throttle(percent)

    async def quiesce(self) -> pb.QuiesceReply:
        """After suspend, before the final pass: the backends stop and unmap."""
        self._own()
        if self.domain.state != SUSPENDED:
            raise errors.FailedPrecondition("backends are quiesced after the guest suspends")
        started = time.monotonic()
        self.quiesced = True
        done = await self.domain.pv.quiesce() if self.domain.pv is not None else {}
        return pb.QuiesceReply(duration_ns=int((time.monotonic() - started) * 1e9), **done)

    def commit(self) -> None:
        """The point of no return. No await in here: Resolve (recovery) and Commit see
        each other whole, whichever comes first."""
        self._own()
        if self.aborting:
            raise errors.Aborted(f"migration {self.migration_id} is being aborted: "
                                 f"{self.aborting}")
        if self.domain.state != SUSPENDED or not self.delivered:
            raise errors.FailedPrecondition(
                "commit comes after suspend and a final pass the destination acknowledged")
        faults.point("commit")
        self.host.record_commit(self.migration_id, "source", self.domain.name)
        faults.point("committed")
        self.committed = True

    async def frame_hashes(self) -> AsyncIterator[pb.HashChunk]:
        """Hashes of the source's memory as the final pass left it (the guest is suspended)."""
        self._own()
        if self.domain.state != SUSPENDED:
            raise errors.FailedPrecondition("frame hashes are taken after the final pass")
        if self.save_image:  # the image and the hashes are one snapshot
            hashes = await asyncio.to_thread(save_image, self.domain.mem, self.save_image)
        else:
            hashes = await asyncio.to_thread(self.domain.mem.frame_hashes)
        # After the hashes: backends go on writing while they are taken, and a write
        # the hashes saw must be in the journal the causes come from.
        causes = self.domain.journal.causes()
        if self.save_image:
            await asyncio.to_thread(verify.save_causes, causes, self.save_image)
        for chunk in verify.chunks(hashes, causes):
            yield chunk

    async def complete(self) -> None:
        """Destroy the source copy; called by the coordinator, or by recovery (once, if
        both ask at the same time)."""
        if not self.committed:
            raise errors.FailedPrecondition("the source copy is destroyed only after commit")
        faults.point("complete")
        if self._completing is None:
            self._own()
            self._completing = asyncio.ensure_future(self._destroy())
        await asyncio.shield(self._completing)

    async def _destroy(self) -> None:
        await self._close()
        self.host.saves.pop(self.migration_id, None)
        await self.host.drop(self.domain.name)

    async def abort(self, reason: str) -> None:
        if self.committed:
            raise errors.FailedPrecondition(
                f"migration {self.migration_id} is committed: the guest belongs to the "
                "destination now")
        self.aborting = self.aborting or reason
        log.warning("migration %s aborted: %s", self.migration_id, reason)
        await self._release()

    # ---- recovery: the coordinator is gone (pvmig recover, or this host's watchdog)

    @property
    def holds_copy(self) -> bool:
        """Its suspended copy is still here (not being destroyed)."""
        return self._completing is None and self.domain.migration_id == self.migration_id

    async def resolve(self, reason: str) -> str:
        """The decision, made now: committed stays committed; anything else is aborted
        (the guest resumes here) before a late Commit could land."""
        if self.committed:
            return "committed"
        if self.rolled_back:
            await self._release()
            return "rolled-back"
        await self.abort(reason)
        return "aborted"

    async def rollback(self, reason: str) -> None:
        """Committed, but the destination holds no running copy: the only copy left is
        this suspended one. Recorded first, so that no recovery resumes the other side."""
        if not self.rolled_back:
            if not self.committed or self._completing is not None:
                raise errors.FailedPrecondition(
                    f"migration {self.migration_id}: only a committed migration whose "
                    "source copy is still here is rolled back")
            self.host.record_commit(self.migration_id, "source", self.domain.name,
                                    "rolled-back")
            log.warning("migration %s rolled back: %s", self.migration_id, reason)
            self.rolled_back, self.committed, self.aborting = True, False, reason
        await self._release()  # once, whoever asks

    async def expire(self) -> None:
        """The lease ran out: no coordinator. Before commit, abort; after it, finish
        from what the destination holds (pvmig.migration.recovery)."""
        if not self.committed:
            await self.abort(f"no word from the coordinator for {self.lease.timeout_s:.0f} s "
                             "before commit")
            return
        from pvmig.migration import recovery
        async with AgentClient(self.dest_address, "the destination agent",
                               self.host.security) as dest:
            outcome = await recovery.settle(_Local(self), recovery.RemoteDest(dest),
                                            self.migration_id)
        log.warning("%s (the coordinator gone; settled by the source)", outcome.describe())

    async def _release(self) -> None:
        """Close the streams and give the domain back, running where it was: once, and
        to the end even if the caller gives up (an abort, a rollback and a recovery may
        all ask). The session stays findable until the guest runs again."""
        if self._releasing is None:
            self._releasing = asyncio.ensure_future(self._give_back())
        await asyncio.shield(self._releasing)

    async def _give_back(self) -> None:
        try:
            await self._close()
            await self._resume_here()
        finally:
            self.host.saves.pop(self.migration_id, None)

    async def _resume_here(self) -> None:
        dom = self.domain
        if dom.migration_id != self.migration_id:
            return
        dom.journal.disarm()
        await dom.settle_suspend()
        dom.set_throttle(0)
        dom.migration_id = ""
        if dom.pv is not None:
            dom.pv.set_policy(backend_log=False, xenstore_track=False)
            dom.pv.set_grant_policy()
            if self.quiesced:
                dom.pv.unquiesce()
        if dom.state == SUSPENDED:
            await dom.cancel_suspend()
        elif dom.state == OUTGOING:
            dom.state = RUNNING
        if dom.state == RUNNING:
            parking.refresh(self.host, dom)

    async def _close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))
        self._streams = []
        if self._dest is not None:
            await self._dest.close()


async def resolve(host: Host, migration_id: str, reason: str, domain: str = "",
                  instance: str = "") -> pb.MigrationState:
    """Recovery's question to the source: the decision, made now if need be."""
    session = host.saves.get(migration_id)
    if session is not None:
        state = await session.resolve(reason)
        return pb.MigrationState(state=state, domain=session.domain.name,
                                 holds_copy=state == "committed" and session.holds_copy)
    record = host.commit_record(migration_id, "source")
    if record is not None:
        return pb.MigrationState(state=record["state"], domain=record["domain"],
                                 holds_copy=parking.holds(host, migration_id))
    if domain and instance and instance != host.instance_id and domain not in host.domains:
        # this agent restarted since the migration began (the domains it parked or a
        # crash left are back before it serves), and the guest died with its host.
        # Said once for good: nothing may revive this copy after the destination's.
        host.record_commit(migration_id, "source", domain, "lost")
        return pb.MigrationState(state="lost", domain=domain)
    return pb.MigrationState(state="unknown", domain=domain)


class _Local:
    """This agent's save half, as recovery.settle drives a source."""

    address = "this agent"

    def __init__(self, session: SaveSession) -> None:
        self.session = session
        self.name = session.host.name

    async def resolve(self, migration_id: str, domain: str, instance: str) -> pb.MigrationState:
        return pb.MigrationState(state=await self.session.resolve("its coordinator is gone"),
                                 domain=self.session.domain.name)

    async def complete(self, migration_id: str) -> None:
        await self.session.complete()

    async def rollback(self, migration_id: str, reason: str) -> None:
        await self.session.rollback(reason)

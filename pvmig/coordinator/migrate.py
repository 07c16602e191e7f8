"""The coordinator: drives one migration through both agents, top to bottom.

    connect    handshake with both agents, clocks, the two must be different hosts
    prepare    the destination reserves the domain and starts its guest process, waiting
    begin      the source connects to the destination and turns log-dirty on
    storage    (--copy-storage) the disks alone: every block, then rounds of the blocks
               blkback wrote, until what is left fits the downtime (background) or the
               guest's writes go through to both copies (write-blocking)
    precopy    round 0, then rounds until the policy says stop (with the disks' writes)
    suspend    the guest acknowledges; its last step on the source
    final      the last dirty set, then the device state; the stream ends
    ready      the destination confirms it has the whole stream and a live guest
    -- any failure up to here aborts: the destination discards, the source resumes
    commit     recorded durably by the source (the point of no return), then the
               destination
    resume     the destination's guest takes its first step
    verify     frame hashes of both memories (and block hashes of both disks), the
               source copy destroyed, then the resumed guest's own checks

Pages never pass through here: the source agent streams them to the destination agent.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pvmig import errors, faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.progress import Reporter
from pvmig.coordinator.report import Report
from pvmig.migration import policy, recovery, verify
from pvmig.migration.policy import (
    Compression,
    GrantMode,
    PersistentGrants,
    PostcopyDom0,
    Quiesce,
    Recovery,
    StorageMode,
    TimeoutAction,
    Transport,
    from_wire,
    to_wire,
)
from pvmig.migration.precopy import AutoConverge, PrecopyPolicy, RoundStats
from pvmig.rpc.client import AgentClient

RECOVER_RETRY_S = 20.0  # as the source's page streams wait for the network (RECONNECT_S)

# What the source's Commit answers when it did not commit: anything else may hide one
_REFUSED = (errors.FailedPrecondition, errors.Aborted, errors.NotFound, errors.InvalidArgument)


@dataclass
class Options:
    """A migration's settings; the policies and defaults are pvmig.migration.policy's."""

    downtime_limit_ms: float = policy.DOWNTIME_LIMIT_MS
    max_rounds: int = policy.MAX_ROUNDS
    no_progress_rounds: int = policy.NO_PROGRESS_ROUNDS  # 0: never stop for lack of progress
    batch_pages: int = 0  # 0: the agents' default
    streams: int = 0      # 0: the agents' default
    quiesce: Quiesce = Quiesce.NONE
    backend_log: bool = False    # backends log their writes (vhost's dirty log)
    xenstore_track: bool = False  # xenstored's writes into the magic page are logged
    recovery: Recovery = Recovery.REPLAY
    persistent_grants: PersistentGrants | None = None  # None: as the disks negotiated them
    grant_mode: GrantMode | None = None  # None: as the domain's disks were created
    compress: Compression = Compression.NONE
    transport: Transport | None = None  # None: the source agent's own setting (tcp)
    max_bandwidth_mbps: float = 0.0  # the page streams' cap in all; 0: none
    auto_converge: bool = False  # throttle the guest's vCPU while rounds do not shrink
    inject: tuple = ()           # injection points forcing hazards (tests, the matrix)
    save_images: str = ""        # a directory both agents write: source.ram, dest.ram
    verify_timeout_s: float = policy.VERIFY_TIMEOUT_S
    postcopy: bool = False  # resume at the destination after setup; memory follows
    postcopy_after_precopy: bool = False  # switch after round 0 (libvirt's flag)
    postcopy_on_stall: bool = False  # switch where pre-copy would stop without converging
    allow_postcopy: bool = False  # prepare for a switch asked later (pvmig migrate-postcopy)
    postcopy_dom0: PostcopyDom0 = PostcopyDom0.DEMAND
    copy_storage: bool = False  # the disks come too (no shared storage)
    storage_mode: StorageMode = StorageMode.BACKGROUND
    remove_source_storage: bool = False  # once complete (the default keeps it, as libvirt)
    storage_with_memory: bool = False  # no storage phase: the disks' first copy in round 0

    @property
    def may_postcopy(self) -> bool:
        """The destination is prepared for a switch (QEMU's postcopy-ram capability)."""
        return (self.postcopy or self.postcopy_after_precopy or self.postcopy_on_stall
                or self.allow_postcopy)

    def __post_init__(self) -> None:
        # (names given as plain strings, by the CLI or a script, are checked here)
        self.quiesce, self.recovery = Quiesce(self.quiesce), Recovery(self.recovery)
        self.compress = Compression(self.compress or Compression.NONE)
        self.transport = Transport(self.transport) if self.transport else None
        self.persistent_grants = (PersistentGrants(self.persistent_grants)
                                  if self.persistent_grants else None)
        self.grant_mode = GrantMode(self.grant_mode) if self.grant_mode else None
        self.postcopy_dom0 = PostcopyDom0(self.postcopy_dom0 or PostcopyDom0.DEMAND)
        self.storage_mode = StorageMode(self.storage_mode or StorageMode.BACKGROUND)
        if self.copy_storage and self.may_postcopy:
            raise errors.InvalidArgument("--copy-storage with post-copy: not supported (the "
                                         "disk's last blocks go in a final pass)")
        if self.storage_with_memory and not self.copy_storage:
            raise errors.InvalidArgument("--storage-with-memory goes with --copy-storage")
        if self.remove_source_storage and not self.copy_storage:
            raise errors.InvalidArgument("--remove-source-storage goes with --copy-storage "
                                         "(on shared storage the image is the destination's)")


class Intervened(errors.Aborted):
    """Stopped on purpose by whoever runs the migration (a fleet's completion timeout, a
    stall): counted as aborted, not as failed."""


@dataclass
class Migration:
    source: AgentClient
    dest: AgentClient
    domain: str
    options: Options
    reporter: Reporter
    migration_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    report: Report = field(init=False)
    _begun: bool = False
    _prepared: bool = False
    _committed: bool = False
    _commit_asked: bool = False
    _postcopy: bool = False  # the final pass is a switch to post-copy
    _postcopy_asked: bool = False  # pvmig migrate-postcopy, said by the last round
    _steps: tuple = (0.0, 0)  # (when, the guest's step count): its pace, across post-copy
    _progress: dict = field(default_factory=lambda: {"before-steps-s": None, "during": [],
                                                     "after-steps-s": None})
    _offsets: dict = field(default_factory=dict)
    _suspended_ns: int = 0
    _devices: list = field(default_factory=list)
    _device_stats_before: list = field(default_factory=list)
    _labels: dict = field(default_factory=dict)
    # Asked at each pre-copy round boundary (a fleet's timeouts): None to go on, or
    # (TimeoutAction, why) to stop iterating that way.
    control: object = None

    def __post_init__(self) -> None:
        self.report = Report(migration_id=self.migration_id, domain=self.domain,
                             source=self.source.address, dest=self.dest.address,
                             policies={"quiesce": self.options.quiesce,
                                       "backend-log": self.options.backend_log,
                                       "xenstore-track": self.options.xenstore_track,
                                       "recovery": self.options.recovery,
                                       "inject": list(self.options.inject)},
                             compression=self.options.compress or "none",
                             auto_converge=self.options.auto_converge)
        self.report.policies["max-bandwidth-mbps"] = self.options.max_bandwidth_mbps or None
        self.policy = PrecopyPolicy(downtime_limit_s=self.options.downtime_limit_ms / 1e3,
                                    max_rounds=self.options.max_rounds,
                                    no_progress_rounds=self.options.no_progress_rounds)

    async def run(self) -> Report:
        t0 = self.report.t0 = time.monotonic()
        try:
            try:
                await self.connect()
                await self.prepare()
                await self.begin()
                self.report.setup_time_s = time.monotonic() - t0
                if self.options.copy_storage:
                    await self.storage()  # (or its start, --storage-with-memory)
                self._postcopy = self.options.postcopy
                if not self._postcopy:
                    await self.precopy()
                await self.suspend()
                if self.options.quiesce is Quiesce.BACKEND:
                    await self.quiesce()
                if self._postcopy:
                    await self.switch_to_postcopy()
                else:
                    await self.final_pass()
                await self.commit()
            except BaseException as e:
                if not self._committed:
                    await self.abort(e)
                raise
            if self._postcopy:
                await self.postcopy()
            else:
                await self.resume()
            # As QEMU's total-time: the migration ends when the guest runs there; what
            # the verification takes after that is reported on its own.
            self.report.total_time_s = time.monotonic() - t0
            await self.verify()
        except (errors.PvmigError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                e = errors.Aborted("interrupted")
            self.report.fail(e, started=self._prepared or self._begun,
                             committed=self._committed)
        finally:
            self.report.committed = self._committed
            if not self.report.total_time_s:  # failed before resume: until now
                self.report.total_time_s = time.monotonic() - t0
            self._phase("done", status=self.report.status)
        return self.report

    # ---- phases

    async def connect(self) -> None:
        self._phase("connect", source=self.source.address, dest=self.dest.address,
                    migration=self.migration_id)
        src, dst = await asyncio.gather(self.source.hello("coordinator"),
                                        self.dest.hello("coordinator"))
        if src.instance_id == dst.instance_id:
            raise errors.InvalidArgument(
                f"source {self.source.address} and destination {self.dest.address} are the "
                f"same agent ({src.agent_name}): a migration needs two hosts")
        info = await self.source.call(self.source.agent.QueryDomain, pb.DomainRef(name=self.domain))
        if info.state != "running":
            raise errors.FailedPrecondition(
                f"domain {self.domain!r} on {src.agent_name} is {info.state}, not running")
        self.report.ram_bytes = info.ram_bytes
        self._steps = (time.monotonic(), info.guest.steps)  # the guest's progress, for post-copy
        self._devices = self._with_grant_policy(info.devices)
        self._labels = dict(info.labels)
        self._device_stats_before = list(info.device_stats)
        self.report.source_agent, self.report.dest_agent = src.agent_name, dst.agent_name
        for name, client in (("source", self.source), ("dest", self.dest)):
            self._offsets[name] = await client.clock_offset()

    def _with_grant_policy(self, devices) -> list:
        """The domain's devices as the destination should serve them: the grant
        policies of this migration applied (the source's backends apply them at Begin)."""
        out = []
        for given in devices:
            d = pb.DeviceConfig()
            d.CopyFrom(given)
            if d.kind == "vbd":
                if self.options.persistent_grants == "on" and not d.persistent:
                    raise errors.FailedPrecondition(
                        f"vbd{d.devid} of domain {self.domain!r} was created without "
                        "persistent grants, and a frontend negotiates them only when it "
                        "connects: create the domain with --persistent-grants to study them")
                if self.options.persistent_grants:
                    d.persistent = self.options.persistent_grants == "on"
                d.grant_mode = self.options.grant_mode or d.grant_mode or GrantMode.MAP
            out.append(d)
        vbds = [d for d in out if d.kind == "vbd"]
        if vbds:
            self.report.policies["persistent-grants"] = vbds[0].persistent
            self.report.policies["grant-mode"] = vbds[0].grant_mode
        return out

    async def prepare(self) -> None:
        self._phase("prepare")
        await self.dest.call(self.dest.dest.Prepare, pb.PrepareRequest(
            migration_id=self.migration_id, domain=self.domain,
            ram_bytes=self.report.ram_bytes, source_agent=self.report.source_agent,
            source_address=self._source_address(),
            source_instance=self.source.hello_reply.instance_id,
            devices=self._devices, save_image=self._image("dest"),
            postcopy=self.options.may_postcopy,
            postcopy_dom0=to_wire(self.options.postcopy_dom0, PostcopyDom0),
            inject=list(self.options.inject), copy_storage=self.options.copy_storage,
            labels=self._labels),
            timeout=120.0)
        self._prepared = True

    async def begin(self) -> None:
        self._phase("begin", migration=self.migration_id)
        reply = await self.source.call(self.source.source.Begin, pb.BeginRequest(
            migration_id=self.migration_id, domain=self.domain,
            dest_address=self.dest.hello_reply.advertise or self.dest.address,
            batch_pages=self.options.batch_pages, streams=self.options.streams,
            quiesce=to_wire(self.options.quiesce), backend_log=self.options.backend_log,
            xenstore_track=self.options.xenstore_track,
            recovery=to_wire(self.options.recovery), inject=list(self.options.inject),
            save_image=self._image("source"),
            persistent_grants=to_wire(self.options.persistent_grants, PersistentGrants),
            grant_mode=to_wire(self.options.grant_mode, GrantMode),
            compress=to_wire(self.options.compress),
            transport=to_wire(self.options.transport, Transport),
            allow_postcopy=self.options.may_postcopy,
            max_bandwidth_mbps=self.options.max_bandwidth_mbps,
            copy_storage=self.options.copy_storage,
            storage_mode=to_wire(self.options.storage_mode, StorageMode),
            remove_source_storage=self.options.remove_source_storage))
        self._begun = True
        self.report.transport = from_wire(Transport, reply.transport) or ""

    async def storage(self) -> None:
        """The disks first (libvirt's order: memory pre-copy starts when the mirror is
        ready): a round of every block, then rounds of the blocks written since, until
        what is left would fit the downtime limit at the bandwidth the rounds showed
        (background), or once the guest's writes go through to both copies and one
        round has caught up (write-blocking). At the cap on rounds, memory's rounds go
        on carrying the disks' writes."""
        s = self.report.start_storage(self.options.storage_mode, self._devices)
        s["order"] = "with-memory" if self.options.storage_with_memory else "storage-first"
        if self.options.storage_with_memory:  # QEMU's old `migrate -b`: in memory's rounds
            return
        self._phase("storage", mode=str(self.options.storage_mode),
                    size_mib=round(s["size-bytes"] / 2**20, 1))
        started = time.monotonic()
        while True:
            stats = await self._round(len(s["storage-rounds"]), final=False, storage=True)
            if stats.interrupted:
                continue
            expected = policy_expected(s["storage-rounds"], stats.remaining_blocks)
            n = len(s["storage-rounds"])
            whole = sum(not r.get("interrupted") for r in s["storage-rounds"])
            if self.options.storage_mode is StorageMode.WRITE_BLOCKING:
                ready = whole >= 2  # the first copy, then one round under the mirror
            else:
                ready = expected <= self.options.downtime_limit_ms / 1e3
            if ready or n >= policy.MAX_STORAGE_ROUNDS:
                break
        s["ready"] = ready
        s["ready-ms"] = round((time.monotonic() - started) * 1e3, 3)
        if ready:
            self._phase("storage-ready", rounds=n, remaining_blocks=stats.remaining_blocks)
        else:  # memory's rounds carry the rest
            self._phase("storage-not-converged", rounds=n,
                        remaining_blocks=stats.remaining_blocks)

    async def precopy(self) -> None:
        self._phase("precopy")
        rounds: list[RoundStats] = []
        converge = AutoConverge() if self.options.auto_converge else None
        while True:
            stats = await self._round(len(self.report.rounds), final=False)
            self.report.rounds[-1]["throttle-percent"] = converge.percent if converge else 0
            if self.report.rounds[-1].get("interrupted"):
                # its pages go again in the next round: it says nothing of the guest's
                # dirty rate or of convergence, and no stop follows it
                await self._hash_received()
                continue
            rounds.append(stats)
            # The destination catches up while the guest still runs here: what it
            # leaves undone it must do before resume, inside the downtime.
            t = time.monotonic()
            await self._hash_received()
            self.report.rounds[-1]["hash-ms"] = round((time.monotonic() - t) * 1e3, 3)
            decision = self.policy(rounds, can_throttle=bool(converge and converge.can_throttle))
            self.report.expected_downtime_s = decision.expected_downtime_s
            if self.control is not None and await self._intervene():
                return
            switch = self._switch_reason(decision)
            if switch:
                self.report.stop_reason = switch
                self._postcopy = True
                return
            if decision.stop:
                self.report.stop_reason = decision.reason
                self.report.converged = decision.converged
                self._phase("stop-and-copy", reason=decision.reason)
                return
            throttle = converge.next(rounds) if converge else None
            if throttle is not None:
                await self.source.call(self.source.source.Throttle, pb.ThrottleRequest(
                    migration_id=self.migration_id, percent=throttle))
                self.report.max_throttle = throttle
                self._phase("throttle", percent=throttle)

    async def _intervene(self) -> bool:
        """The control's word at a round boundary: True when pre-copy ends here (to
        stop and copy, or to switch); an abort raises."""
        asked = self.control(self.report)
        if asked is None:
            return False
        action, why = TimeoutAction(asked[0]), asked[1]
        self.report.intervention = {"action": str(action), "reason": why,
                                    "round": len(self.report.rounds) - 1}
        self._phase("intervention", action=str(action), reason=why)
        if action is TimeoutAction.ABORT:
            raise Intervened(f"stopped: {why}")
        if action is TimeoutAction.POSTCOPY and self.options.may_postcopy:
            self.report.stop_reason = f"postcopy-forced ({why})"
            self._postcopy = True
            return True
        # pause (or post-copy the destination was not prepared for): stop and copy now
        self.report.stop_reason = f"forced ({why})"
        self.report.converged = False
        self._phase("stop-and-copy", reason=self.report.stop_reason)
        return True

    def _switch_reason(self, decision) -> str:
        """Why pre-copy ends here in a switch to post-copy, or "" (it goes on, or stops
        and copies as its policy says)."""
        if self.options.postcopy_after_precopy:
            return "postcopy-after-precopy"
        if self._postcopy_asked:
            return "postcopy-asked"
        if self.options.postcopy_on_stall and decision.stop and not decision.converged:
            return f"postcopy-on-stall ({decision.reason})"
        return ""

    async def _hash_received(self) -> None:
        """The destination catches up; through a network drop its answer is waited for as
        long as the source waits for its page streams (the destination's lease)."""
        deadline = time.monotonic() + RECOVER_RETRY_S
        while True:
            try:
                await self.dest.call(self.dest.dest.HashReceived, self._ref(), timeout=300.0)
                return
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    async def suspend(self) -> None:
        if self._postcopy:  # the guest's pace before: its steps since connect
            self._progress["before-steps-s"] = await self._step_rate(self.source)
        self._phase("suspend")
        reply = await self.source.call(self.source.source.Suspend, self._ref(), timeout=90.0)
        self._suspended_ns = reply.suspended_ns

    async def quiesce(self) -> None:
        self._phase("quiesce")
        reply = await self.source.call(self.source.source.Quiesce, self._ref(), timeout=60.0)
        self.report.quiesce = {"duration-ms": round(reply.duration_ns / 1e6, 3),
                               "finished": reply.finished, "abandoned": reply.abandoned,
                               "unmapped": reply.unmapped}

    async def final_pass(self) -> None:
        self._phase("final")
        await self._round(len(self.report.rounds), final=True)

    async def switch_to_postcopy(self) -> None:
        """The final pass of a post-copy migration: the device state and the frames still
        to come, no pages (the destination drops what it holds of those)."""
        self._phase("switch", rounds=len(self.report.rounds))
        await self._round(len(self.report.rounds), final=True, postcopy=True)

    async def postcopy(self) -> None:
        """After the commit: the source opens its lanes and pushes; the guest resumes at
        the destination as soon as they are up, and runs while its memory follows. A
        broken data connection pauses the transfer at both ends: this waits, and says
        how to go on (pvmig recover, once the link is back)."""
        progress = aiter(self.source.stream(self.source.source.Postcopy, self._ref()))
        pauses: list[dict] = []
        try:
            last = await anext(progress)  # the lanes are up: a fault is served at once
            self.report.mark("lanes-up")
            await self.resume()
            self._phase("postcopy-active", pages=last.total_pages)
            self._steps = (time.monotonic(), 0)  # (resumed: its count goes on from the info page)
            async for last in progress:
                await self._watch_pause(last, pauses)
                self.reporter.phase("postcopy", pushed=last.pushed_pages,
                                    requested=last.requested_pages, total=last.total_pages,
                                    paused=last.paused)
                rate = None if last.paused else await self._step_rate(self.dest, quiet=True)
                if rate is not None:
                    t = round((time.monotonic() - self.report.t0) * 1e3, 1)
                    self._progress["during"].append([t, rate])
        except errors.PvmigError as e:
            raise errors.Unavailable(
                f"post-copy broke ({e}): the guest runs at the destination and the frames "
                "it lacks are only at the source") from None
        state = await self._after_drop(self.dest.dest.PostcopyState)
        self.report.injected.update(state.injected)
        self.report.postcopy = {
            "total-pages": last.total_pages, "pushed-pages": last.pushed_pages,
            "requested-pages": last.requested_pages, "resent-pages": last.resent_pages,
            "bytes": last.bytes,
            "time-ms": round(last.duration_ns / 1e6, 3), "requests": state.requests,
            "faults": state.faults, "blocktime-ms": round(state.blocktime_ns / 1e6, 3),
            "latency-ms": {"p50": round(state.latency_p50_ns / 1e6, 3),
                           "p99": round(state.latency_p99_ns / 1e6, 3),
                           "max": round(state.latency_max_ns / 1e6, 3)},
            "dom0": {"policy": str(self.options.postcopy_dom0), "waits": state.dom0_waits,
                     "touched-missing": state.dom0_touched,
                     "taken-pages": state.taken_pages},
            "recoveries": last.recoveries, "paused-ms": round(last.paused_ns / 1e6, 3),
            "lost-pages": last.lost_pages, "pauses": pauses}
        self.report.postcopy["guest-progress"] = self._progress
        self._phase("postcopy-done", missing=state.missing_pages)
        if state.missing_pages:
            raise errors.DataLoss(f"post-copy ended with {state.missing_pages} frame(s) "
                                  "missing at the destination")

    async def _after_drop(self, method):
        """A call to the destination that a network drop just over may fail at first
        (its channel still in backoff): on a fresh channel, for as long as the source
        waits for its page streams."""
        deadline = time.monotonic() + RECOVER_RETRY_S
        while True:
            try:
                return await self.dest.call(method, self._ref())
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                await self.dest.reconnect()
                await asyncio.sleep(0.5)

    async def _watch_pause(self, p: pb.PostcopyProgress, pauses: list[dict]) -> None:
        """Said once as the transfer pauses, and once as it goes on again (the link to
        the destination is back then: a fresh channel to it, not one in backoff)."""
        paused = bool(pauses) and "for-ms" not in pauses[-1]
        if p.paused and not paused:
            at = time.monotonic()
            pauses.append({"at-ms": round((at - self.report.t0) * 1e3, 1),
                           "reason": p.paused_reason, "_at": at})
            self._phase("postcopy-paused", reason=p.paused_reason,
                        recover=f"pvmig recover --migration {self.migration_id} --source "
                                f"{self.source.address} --dest {self.dest.address}")
        elif paused and not p.paused:
            pauses[-1]["for-ms"] = round((time.monotonic() - pauses[-1].pop("_at")) * 1e3, 1)
            self._phase("postcopy-recovered", recoveries=p.recoveries, lost=p.lost_pages)
            await self.dest.reconnect()

    async def commit(self) -> None:
        # As xl's handshake: the destination has said it holds the whole stream and can
        # resume (the acknowledgement of the stream's end); the source records the
        # decision, the point of no return; only then does the destination record it,
        # and at once resume the guest.
        self._phase("commit")
        self._commit_asked = True
        await self.source.call(self.source.source.Commit, self._ref())
        self._committed = True
        self._phase("committed")

    async def resume(self) -> None:
        try:
            reply = await self.dest.call(self.dest.dest.CommitAndResume, self._ref())
        except errors.PvmigError as e:
            # committed at the source: finish it (or undo it, if the destination cannot
            # commit) as recovery would, not leave the guest suspended nowhere
            await self.recover(e)
            raise
        src_off, src_err = self._offsets["source"]
        dst_off, dst_err = self._offsets["dest"]
        self.report.downtime_s = ((reply.resumed_ns - dst_off)
                                  - (self._suspended_ns - src_off)) / 1e9
        self.report.downtime_uncertainty_s = (src_err + dst_err) / 1e9
        self._phase("resumed", downtime_ms=round(self.report.downtime_s * 1e3, 2))

    async def verify(self) -> None:
        self._phase("verify")
        disks = self.options.copy_storage
        try:
            src, causes = await self._hashes(self.source, self.source.source.FrameHashes)
            if disks:
                src_blocks, late = await self._hashes(self.source, self.source.source.BlockHashes)
            on_source = await self.source.call(self.source.agent.QueryDomain,
                                               pb.DomainRef(name=self.domain))
        finally:  # the guest runs on the destination: the source copy goes regardless
            ref = self._ref()
            ref.downtime_ns = int(self.report.downtime_s * 1e9) if self.report.downtime_s else 0
            await self.source.call(self.source.source.Complete, ref)
        if disks:  # (before FrameHashes, which ends the destination's session)
            dst_blocks, _ = await self._hashes(self.dest, self.dest.dest.BlockHashes)
            self.report.set_storage_verdict(verify.differing(src_blocks, dst_blocks), late,
                                            removed=self.options.remove_source_storage)
        dst, dst_causes = await self._hashes(self.dest, self.dest.dest.FrameHashes)
        if len(dst_causes) == len(causes) == len(src):  # (post-copy's, where dom0 was first)
            causes = np.where(dst_causes != 0, dst_causes, causes)
        self.report.set_memory_verdict(verify.differing(src, dst), on_source.shared_frames,
                                       causes if len(causes) == len(src) else None)
        self.report.guest = await self._guest_checks()
        if self.report.postcopy is not None:  # the pace after: from post-copy's end to now
            self._progress["after-steps-s"] = await self._step_rate(self.dest)
        on_dest = await self.dest.call(self.dest.agent.QueryDomain, pb.DomainRef(name=self.domain))
        self.report.set_devices(self._device_stats_before, on_source.device_stats,
                                on_dest.device_stats)
        self.report.classify()

    async def abort(self, cause: BaseException) -> None:
        if self._commit_asked and not isinstance(cause, _REFUSED):
            # The source may have recorded the commit before the answer was lost (or the
            # wait for it cut short): only it can say. Aborting the destination now
            # could discard the only copy.
            await self.recover(cause)
            return
        reason = str(cause) or type(cause).__name__
        self._phase("abort", reason=reason)
        # interrupted here, or aborted at an agent by request (pvmig cancel, whose
        # reason the agent's error repeats): not a failure
        cancelled = isinstance(cause, (asyncio.CancelledError, KeyboardInterrupt,
                                       Intervened)) or (
            isinstance(cause, errors.Aborted) and policy.CANCEL_REASON in str(cause))
        ref = pb.MigrationRef(migration_id=self.migration_id, reason=reason,
                              cancelled=cancelled)
        if self._begun:
            await _best_effort(self.source.call(self.source.source.Abort, ref, timeout=90.0),
                               self.report.abort_errors)
        if self._prepared:
            await _best_effort(self.dest.call(self.dest.dest.Abort, ref),
                               self.report.abort_errors)

    async def recover(self, cause: BaseException) -> None:
        """The commit's answer lost, or the destination's: settle the migration as
        recovery does (pvmig.migration.recovery), or say how to once both agents answer."""
        self._phase("recover", reason=str(cause))
        try:
            outcome = await recovery.recover(recovery.RemoteSource(self.source),
                                            recovery.RemoteDest(self.dest), self.migration_id)
        except errors.PvmigError as e:
            self.report.abort_errors.append(
                f"not settled ({e}): when both agents answer, run pvmig recover "
                f"--migration {self.migration_id} --source {self.source.address} "
                f"--dest {self.dest.address}")
            self.report.unrecovered = True
            return
        self.report.recovered = outcome.describe()
        self._committed = outcome.decision == "committed"

    # ---- helpers

    async def _round(self, number: int, final: bool, postcopy: bool = False,
                     storage: bool = False):
        """One round at the source; its stats (a storage round's: the proto's)."""
        req = pb.RoundRequest(migration_id=self.migration_id, round=number, final=final,
                              postcopy=postcopy, storage=storage)
        started_ms = round((time.monotonic() - self.report.t0) * 1e3, 3)
        interrupted = ""
        async for p in self.source.stream(self.source.source.Round, req):
            self.reporter.round_progress(number, p.done_pages, p.total_pages, p.bytes, final)
            if p.HasField("stats"):
                stats = _stats(p.stats)
                interrupted = p.stats.interrupted
                self._postcopy_asked = p.stats.postcopy_asked
                if p.stats.injected:
                    self.report.injected = dict(p.stats.injected)
                raw = p.stats
        if storage:
            self.report.add_storage_round(raw, started_ms)
            if raw.interrupted:
                self._phase("streams-reconnected", storage_round=number)
            self.reporter.round_done(self.report.storage["storage-rounds"][-1])
            return raw
        self.report.add_round(stats, final=final, blocks=raw if self.options.copy_storage
                              else None)
        self.report.rounds[-1]["started-ms"] = started_ms
        if interrupted:  # the streams broke and were made anew: the next round resends
            self.report.rounds[-1]["interrupted"] = interrupted
            self._phase("streams-reconnected", round=number)
        self.reporter.round_done(self.report.rounds[-1])
        return stats

    async def _step_rate(self, client: AgentClient, quiet: bool = False) -> float | None:
        """The guest's steps per second since the last sample (its vCPU's pace: 100 when
        nothing holds it up); None while its info page has not arrived (post-copy), or
        (quiet) while its agent does not answer: a sample is not worth a failure."""
        try:
            info = await client.call(client.agent.QueryDomain, pb.DomainRef(name=self.domain),
                                     **({"timeout": 5.0} if quiet else {}))
        except errors.Unavailable:
            if not quiet:
                raise
            return None
        now, steps = time.monotonic(), info.guest.steps
        if not steps:
            return None
        (then, before), self._steps = self._steps, (now, steps)
        if not before or now <= then:  # the first sample where the guest runs now
            return None
        return round((steps - before) / (now - then), 1)

    async def _hashes(self, client: AgentClient, method) -> tuple[np.ndarray, np.ndarray]:
        """Frame hashes, and the causes the source gives with them (empty from the
        destination)."""
        parts = [(np.frombuffer(c.hashes, dtype="<u8"), np.frombuffer(c.causes, dtype=np.uint8))
                 async for c in client.stream(method, self._ref(), timeout=300.0)]
        if not parts:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint8)
        return (np.concatenate([h for h, _ in parts]), np.concatenate([c for _, c in parts]))

    async def _guest_checks(self) -> dict:
        deadline = time.monotonic() + self.options.verify_timeout_s
        while True:
            info = await self.dest.call(self.dest.agent.QueryDomain,
                                        pb.DomainRef(name=self.domain))
            g = info.guest
            if info.state != "running":
                raise errors.GuestError(
                    f"domain {self.domain!r} is {info.state} on {self.dest.address} after resume")
            if g.sweeps_since_resume >= 1 or time.monotonic() > deadline:
                return {"run": g.checks_since_resume, "failed": g.failed_since_resume,
                        "sweeps": g.sweeps_since_resume, "resumes": g.resumes,
                        "failures": [{"frame": f.frame, "expected": f.expected_generation,
                                      "found": f.found_generation} for f in g.failures]}
            await asyncio.sleep(0.1)

    def _image(self, side: str) -> str:
        if not self.options.save_images:
            return ""
        return str(Path(self.options.save_images).resolve() / f"{self.migration_id}.{side}.ram")

    def _phase(self, name: str, **fields) -> None:
        self.report.mark(name)
        self.reporter.phase(name, **fields)
        faults.phase(name)  # the fault suite's coordinator crash or stall, if named

    def _source_address(self) -> str:
        return self.source.hello_reply.advertise or self.source.address

    def _ref(self) -> pb.MigrationRef:
        return pb.MigrationRef(migration_id=self.migration_id)


def _stats(s: pb.RoundStats) -> RoundStats:
    """A round as the stop policy sees it: a disk's blocks are 4 KiB as pages are, and
    what is left of both must fit the downtime together."""
    return RoundStats(round=s.round, dirty_pages=s.dirty_pages + s.dirty_blocks,
                      sent_pages=s.sent_pages + s.sent_blocks,
                      zero_pages=s.zero_pages + s.zero_blocks, bytes=s.bytes,
                      duration_s=s.duration_ns / 1e9, dirty_rate=s.dirty_rate,
                      remaining_pages=s.remaining_pages + s.remaining_blocks,
                      interval_s=s.interval_ns / 1e9)


def policy_expected(rounds: list[dict], remaining_blocks: int) -> float:
    """Seconds to send what is left of the disks at the best bandwidth a storage round
    of 1 MiB or more has shown (any, if none has)."""
    rates = [r["bytes"] / (r["duration-ms"] / 1e3) for r in rounds
             if r["duration-ms"] > 0 and r["bytes"] >= 1 << 20] or \
        [r["bytes"] / (r["duration-ms"] / 1e3) for r in rounds if r["duration-ms"] > 0]
    best = max(rates, default=0.0)
    if not remaining_blocks:
        return 0.0
    return remaining_blocks * 4096 / best if best else float("inf")


async def _best_effort(call, errors_out: list) -> None:
    try:
        await call
    except errors.PvmigError as e:
        errors_out.append(str(e))


async def migrate(source: str, dest: str, domain: str, options: Options,
                  reporter: Reporter) -> Report:
    # SIGTERM aborts like Ctrl-C does: the guest must not be left half-migrated.
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        async with AgentClient(source, "the source agent") as src, \
                AgentClient(dest, "the destination agent") as dst:
            return await Migration(src, dst, domain, options, reporter).run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)

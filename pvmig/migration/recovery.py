"""Recovery: finishing a migration whose coordinator is gone.

The source's commit record is the decision (two-phase commit with the source as the
decider). Whoever finds a migration without its coordinator (`pvmig recover`, or an
agent whose session lease ran out) recovers it the same way (`recover`):

    ask the destination what it holds (receiving, ready, committed, resumed, none)
    ask the source to resolve: committed stays committed; anything else is aborted
        there and then (its guest resumes), so that no late Commit can land
    post-copy      committed, the guest resumed at the destination and its frames still
                   going from the source: paused (a data connection broke), the source
                   reconnects and goes on (QEMU's migrate-recover); under way, nothing
                   to do until the last frame is there
    committed      the destination commits and resumes (it holds the whole stream: the
                   source commits only after that), then the source copy is destroyed;
                   if the destination never committed and holds no copy any more (its
                   agent died and took the waiting guest with it), the source rolls
                   back and resumes its suspended copy, the only one left; if it did
                   commit, it may have run the guest: the source's copy never runs
    not committed  the destination discards -- unless the source lost the guest (its
                   agent restarted since, the domain gone) while the destination holds
                   the whole stream: then that copy is the only one, and resumes

Every step is idempotent, so both agents' watchdogs and an operator's `pvmig recover`
may run at once and still leave exactly one running guest. The two sides are reached
through small adapters: remote agents (AgentClient), or an agent's own session.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.rpc.client import AgentClient

REASON = "recovered: its coordinator is gone"
CALL_TIMEOUT_S = 120.0  # a resume, a rollback or a destroy may take a while


class Status(StrEnum):
    """What one side knows of a migration (proto MigrationStatus)."""

    UNKNOWN = "unknown"          # source: no session and no record
    NONE = "none"                # destination: no session and no record
    RECEIVING = "receiving"      # destination: the stream is not all in
    READY = "ready"              # destination: the whole stream in
    COMMITTED = "committed"
    RESUMED = "resumed"          # destination: recorded, and the guest runs here
    ABORTED = "aborted"          # source
    ROLLED_BACK = "rolled-back"  # source
    LOST = "lost"
    # committed and switched, frames still going (or held up by a broken connection):
    # the source holds them, the destination runs the guest without them
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"

    def to_pb(self) -> int:
        return pb.MigrationStatus.Value("STATUS_" + self.name)

    @classmethod
    def from_pb(cls, number: int) -> "Status":
        try:
            return cls[pb.MigrationStatus.Name(number).removeprefix("STATUS_")]
        except (ValueError, KeyError):  # (UNSPECIFIED: an answer that says nothing)
            raise errors.InvalidArgument(f"unknown migration status {number}") from None


HAS_COPY = (Status.READY, Status.COMMITTED)  # what a destination may hold
POSTCOPY = (Status.POSTCOPY_ACTIVE, Status.POSTCOPY_PAUSED)  # a source's, switched
RUNS_IT = Status.RESUMED


@dataclass(frozen=True)
class SideState:
    """One side's answer: its status, and what it knows of the domain and the source."""

    status: Status
    domain: str = ""
    source_agent: str = ""  # destination: the source agent's name and instance,
    source_instance: str = ""  # as the migration began
    holds_copy: bool = False  # source, committed: its suspended copy is still there

    def to_pb(self) -> pb.MigrationState:
        return pb.MigrationState(status=self.status.to_pb(), domain=self.domain,
                                 source_agent=self.source_agent,
                                 source_instance=self.source_instance,
                                 holds_copy=self.holds_copy)

    @classmethod
    def from_pb(cls, msg: pb.MigrationState) -> "SideState":
        return cls(Status.from_pb(msg.status), msg.domain, msg.source_agent,
                   msg.source_instance, msg.holds_copy)


@dataclass(frozen=True)
class Outcome:
    migration_id: str
    decision: Status  # the source's: committed, aborted, rolled-back, unknown, lost
    runs_on: str    # "source", "destination", or "nowhere" (a host died with it)
    domain: str = ""
    postcopy: str = ""  # "resumed" (was paused, goes on), "under way", or ""

    def describe(self) -> str:
        where = {"source": "runs on the source", "destination": "runs on the destination",
                 "nowhere": "is lost: the host that held its only copy died"}[self.runs_on]
        said = (f"migration {self.migration_id}: {self.decision}; domain "
                f"{self.domain or '?'} {where}")
        if self.postcopy == "resumed":
            said += "; post-copy was paused and goes on (its frames from the source)"
        elif self.postcopy:
            said += "; post-copy under way (its frames still coming from the source)"
        return said


async def recover(source, dest, migration_id: str) -> Outcome:
    """Bring a migration to its one outcome from wherever it stopped."""
    held = await dest.state(migration_id)
    if held.source_agent and source.name and held.source_agent != source.name:
        raise errors.InvalidArgument(
            f"migration {migration_id} came from agent {held.source_agent!r}, not from "
            f"{source.name!r} at {source.address}")
    decision = await source.resolve(migration_id, held.domain, held.source_instance)
    domain = held.domain or decision.domain
    if decision.status in POSTCOPY:
        return await _finish_postcopy(source, dest, migration_id, held.status,
                                      decision.status, domain)
    if held.status in POSTCOPY and decision.status is not Status.LOST:
        # the destination runs the guest with frames still to come, and the source has
        # no post-copy under way (its agent restarted): only a held copy there has them
        raise errors.FailedPrecondition(
            f"migration {migration_id}: the destination is {held.status} (frames still "
            f"to come) but the source says {decision.status}: its held copy, if any, is "
            "the only one of those frames; resolve by hand")
    if decision.status is Status.COMMITTED:
        runs_on = await _finish_committed(source, dest, migration_id, held.status,
                                          decision.holds_copy)
        status = {"source": Status.ROLLED_BACK, "nowhere": Status.LOST}.get(
            runs_on, Status.COMMITTED)
        return Outcome(migration_id, status, runs_on, domain)
    if decision.status is Status.LOST:
        # the source's copy is gone: the destination's, if whole, is the only one
        if held.status in HAS_COPY:
            await dest.commit_and_resume(migration_id)
        if held.status in (*HAS_COPY, RUNS_IT, *POSTCOPY):
            return Outcome(migration_id, Status.LOST, "destination", domain)
    elif held.status in (Status.COMMITTED, RUNS_IT, Status.LOST, *POSTCOPY):
        # a destination commits only after the source did: two stories, changed nothing
        raise errors.FailedPrecondition(
            f"migration {migration_id}: the source says {decision.status} but the "
            f"destination says '{held.status}' (it committed): resolve by hand")
    if held.status in (Status.RECEIVING, Status.READY):
        await dest.discard(migration_id, f"the source resolved it: {decision.status}")
    runs_on = "nowhere" if decision.status is Status.LOST else "source"
    return Outcome(migration_id, decision.status, runs_on, domain)


async def _finish_committed(source, dest, migration_id: str, state: Status,
                            source_holds_copy: bool) -> str:
    if state in HAS_COPY:
        try:
            await dest.commit_and_resume(migration_id)
            state = RUNS_IT
        except errors.Unavailable:
            raise  # no answer: it may have resumed; only asking again can tell
        except errors.PvmigError as e:
            state = (await dest.state(migration_id)).status  # another recovery's doing?
            if state == RUNS_IT:  # resumed there by another recovery meanwhile
                return await _finish_committed(source, dest, migration_id, state,
                                               source_holds_copy)
            if state is not Status.READY:  # committed there but failing to resume: by hand
                raise
            if not source_holds_copy:
                raise errors.FailedPrecondition(
                    f"migration {migration_id}: the destination holds the only copy and "
                    f"cannot commit it ({e}): free what it needs and run pvmig recover "
                    "again") from None
            # It cannot commit (its disk is full, its waiting guest died) and never ran
            # the guest: its copy goes first (it refuses if it committed meanwhile),
            # then the source's resumes.
            await dest.discard(migration_id, f"cannot commit: {e}")
            return await _roll_back(source, migration_id,
                                    f"the destination cannot commit: {e}")
    if state == RUNS_IT:
        await source.complete(migration_id)
        return "destination"
    if state is Status.NONE:  # never committed there, so never run there: the source's copy
        return await _roll_back(source, migration_id, f"the destination {dest.address} "
                                                      "never committed it")
    if state is Status.LOST:
        # It committed there, so it may have run there (and written to its disk): the
        # source's older copy must not run. The guest died with the destination's host.
        await source.complete(migration_id)
        return "nowhere"
    # the source commits only after the destination acknowledged the whole stream
    raise errors.FailedPrecondition(
        f"migration {migration_id} is committed at the source but the destination says "
        f"'{state}': resolve by hand")


async def _finish_postcopy(source, dest, migration_id: str, state: Status, decision: Status,
                           domain: str) -> Outcome:
    """Committed and switched: the destination's copy is the guest (it may have run),
    the source holds the frames it lacks. It resumes there if it has not, and a paused
    transfer goes on. If the destination's host died with it, the guest is lost: the
    source's copy (older) must never run, and goes."""
    if state is Status.LOST:
        await source.complete(migration_id, abandon=True)
        return Outcome(migration_id, Status.LOST, "nowhere", domain)
    if state not in (*HAS_COPY, RUNS_IT, *POSTCOPY):
        raise errors.FailedPrecondition(
            f"migration {migration_id}: the source is in {decision} but the destination "
            f"says '{state}': resolve by hand")
    if state in HAS_COPY:
        await dest.commit_and_resume(migration_id)
    if decision is Status.POSTCOPY_PAUSED:
        await source.recover_postcopy(migration_id)
    return Outcome(migration_id, Status.COMMITTED, "destination", domain,
                   postcopy="resumed" if decision is Status.POSTCOPY_PAUSED else "under way")


async def _roll_back(source, migration_id: str, reason: str) -> str:
    try:
        await source.rollback(migration_id, reason)
    except errors.NotFound:
        # rolled back by another recovery just now, or the source copy is gone
        again = await source.resolve(migration_id, "", "")
        return "source" if again.status is Status.ROLLED_BACK else "nowhere"
    return "source"


class RemoteSource:
    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self.address = agent.address
        self.name = agent.hello_reply.agent_name if agent.hello_reply else ""

    async def resolve(self, migration_id: str, domain: str, instance: str) -> SideState:
        ref = pb.MigrationRef(migration_id=migration_id, reason=REASON, domain=domain,
                              source_instance=instance)
        return SideState.from_pb(await self.agent.call(self.agent.source.Resolve, ref,
                                                       timeout=CALL_TIMEOUT_S))

    async def complete(self, migration_id: str, abandon: bool = False) -> None:
        try:
            await self.agent.call(self.agent.source.Complete,
                                  pb.MigrationRef(migration_id=migration_id, abandon=abandon),
                                  timeout=CALL_TIMEOUT_S)
        except errors.NotFound:  # completed already (by an agent's own recovery)
            pass

    async def rollback(self, migration_id: str, reason: str) -> None:
        await self.agent.call(self.agent.source.Rollback,
                              pb.MigrationRef(migration_id=migration_id, reason=reason),
                              timeout=CALL_TIMEOUT_S)

    async def recover_postcopy(self, migration_id: str) -> None:
        await self.agent.call(self.agent.source.RecoverPostcopy,
                              pb.MigrationRef(migration_id=migration_id),
                              timeout=CALL_TIMEOUT_S)


class RemoteDest:
    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self.address = agent.address

    async def state(self, migration_id: str) -> SideState:
        return SideState.from_pb(await self.agent.call(
            self.agent.dest.State, pb.MigrationRef(migration_id=migration_id)))

    async def commit_and_resume(self, migration_id: str) -> None:
        await self.agent.call(self.agent.dest.CommitAndResume,
                              pb.MigrationRef(migration_id=migration_id), timeout=CALL_TIMEOUT_S)

    async def discard(self, migration_id: str, reason: str) -> None:
        try:
            await self.agent.call(self.agent.dest.Abort,
                                  pb.MigrationRef(migration_id=migration_id, reason=reason))
        except errors.NotFound:  # discarded already
            pass

"""Recovery: finishing a migration whose coordinator is gone.

The source's commit record is the decision (two-phase commit with the source as the
decider). Whoever finds a migration without its coordinator (`pvmig recover`, or an
agent whose session lease ran out) settles it the same way:

    ask the destination what it holds (receiving, ready, committed, resumed, none)
    ask the source to resolve: committed stays committed; anything else is aborted
        there and then (its guest resumes), so that no late Commit can land
    committed      the destination commits and resumes (it holds the whole stream: the
                   source commits only after that), then the source copy is destroyed;
                   if the destination holds no copy any more (its agent died and took
                   the waiting guest with it), the source rolls back and resumes its
                   suspended copy, the only one left
    not committed  the destination discards -- unless the source lost the guest (its
                   agent restarted since, the domain gone) while the destination holds
                   the whole stream: then that copy is the only one, and resumes

Every step is idempotent, so both agents' watchdogs and an operator's `pvmig recover`
may run at once and still leave exactly one running guest. The two sides are reached
through small adapters: remote agents (AgentClient), or an agent's own session.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import errors
from ._proto import pvmig_pb2 as pb
from .client import AgentClient

HAS_COPY = ("ready", "committed")  # what a destination may say (MigrationState.state)
RUNS_IT = "resumed"
NO_COPY = ("none", "lost")
REASON = "recovered: its coordinator is gone"


@dataclass(frozen=True)
class Outcome:
    migration_id: str
    decision: str   # the source's: committed, aborted, rolled-back, unknown, lost
    runs_on: str    # "source", "destination", or "nowhere" (a host died with it)
    domain: str = ""

    def describe(self) -> str:
        where = {"source": "runs on the source", "destination": "runs on the destination",
                 "nowhere": "is lost: the host that held its only copy died"}[self.runs_on]
        return f"migration {self.migration_id}: {self.decision}; domain {self.domain or '?'} {where}"


async def settle(source, dest, migration_id: str) -> Outcome:
    """Bring a migration to its one outcome from wherever it stopped."""
    held = await dest.state(migration_id)
    if held.source_agent and source.name and held.source_agent != source.name:
        raise errors.InvalidArgument(
            f"migration {migration_id} came from agent {held.source_agent!r}, not from "
            f"{source.name!r} at {source.address}")
    decision = (await source.resolve(migration_id, held.domain, held.source_instance)).state
    domain = held.domain
    if decision == "committed":
        runs_on = await _finish_committed(source, dest, migration_id, held.state)
        if runs_on == "source":
            decision = "rolled-back"
        elif runs_on == "nowhere":
            decision = "lost"
    elif decision == "lost" and held.state in HAS_COPY:
        await dest.commit_and_resume(migration_id)
        runs_on = "destination"
    else:
        if held.state in ("receiving", "ready"):
            await dest.discard(migration_id, f"the source resolved it: {decision}")
        runs_on = "nowhere" if decision == "lost" else "source"
    return Outcome(migration_id, decision, runs_on, domain)


async def _finish_committed(source, dest, migration_id: str, state: str) -> str:
    if state in HAS_COPY:
        try:
            await dest.commit_and_resume(migration_id)
        except errors.Unavailable:
            raise  # no answer: it may have resumed; only asking again can tell
        except errors.PvmigError as e:
            if state != "ready":
                raise  # committed there: it must resume, never be undone
            # It cannot commit (its disk is full, its waiting guest died): it never ran
            # the guest, so the source's copy may, once that side has let go of it.
            await dest.discard(migration_id, f"cannot commit: {e}")
            await source.rollback(migration_id, f"the destination cannot commit: {e}")
            return "source"
        state = RUNS_IT
    if state == RUNS_IT:
        await source.complete(migration_id)
        return "destination"
    if state in NO_COPY:
        try:
            await source.rollback(migration_id, f"the destination {dest.address} has no "
                                                f"copy ({state})")
        except errors.NotFound:
            # the source copy was destroyed after the resume, and the destination's
            # host died with the guest since: nothing is left to run
            return "nowhere"
        return "source"
    # the source commits only after the destination acknowledged the whole stream
    raise errors.FailedPrecondition(
        f"migration {migration_id} is committed at the source but the destination says "
        f"{state!r}: resolve by hand")


class RemoteSource:
    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self.address = agent.address
        self.name = agent.hello_reply.agent_name if agent.hello_reply else ""

    async def resolve(self, migration_id: str, domain: str, instance: str) -> pb.MigrationState:
        ref = pb.MigrationRef(migration_id=migration_id, reason=REASON, domain=domain,
                              source_instance=instance)
        return await self.agent.call(self.agent.source.Resolve, ref, timeout=120.0)

    async def complete(self, migration_id: str) -> None:
        try:
            await self.agent.call(self.agent.source.Complete,
                                  pb.MigrationRef(migration_id=migration_id), timeout=120.0)
        except errors.NotFound:  # completed already (by an agent's own recovery)
            pass

    async def rollback(self, migration_id: str, reason: str) -> None:
        await self.agent.call(self.agent.source.Rollback,
                              pb.MigrationRef(migration_id=migration_id, reason=reason),
                              timeout=120.0)


class RemoteDest:
    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self.address = agent.address

    async def state(self, migration_id: str) -> pb.MigrationState:
        return await self.agent.call(self.agent.dest.State,
                                     pb.MigrationRef(migration_id=migration_id))

    async def commit_and_resume(self, migration_id: str) -> None:
        await self.agent.call(self.agent.dest.CommitAndResume,
                              pb.MigrationRef(migration_id=migration_id), timeout=120.0)

    async def discard(self, migration_id: str, reason: str) -> None:
        try:
            await self.agent.call(self.agent.dest.Abort,
                                  pb.MigrationRef(migration_id=migration_id, reason=reason))
        except errors.NotFound:  # discarded already
            pass

"""Recovery's decision, every source decision against every destination state, with
fake sides that keep score of the copies: each cell ends with the outcome the table
says and at most one running guest (none only where a host died with the only copy)."""

from __future__ import annotations

import asyncio

import pytest

from pvmig import errors
from pvmig.migration.recovery import HAS_COPY, POSTCOPY, SideState, Status, recover

S = Status
MID = "m-1"


class FakeSource:
    def __init__(self, decision: Status, holds_copy: bool) -> None:
        self.decision, self.holds_copy = decision, holds_copy
        self.name, self.address = "a", "fake-a"
        # the guest runs at the source after an abort, a rollback or an unknown end
        self.running = decision in (S.ABORTED, S.ROLLED_BACK, S.UNKNOWN)
        self.calls: list[str] = []

    async def resolve(self, migration_id, domain, instance) -> SideState:
        self.calls.append("resolve")
        return SideState(self.decision, "vm",
                         holds_copy=self.decision is S.COMMITTED and self.holds_copy)

    async def complete(self, migration_id, abandon=False) -> None:
        self.calls.append("complete")
        if self.decision in POSTCOPY and not abandon:
            raise errors.FailedPrecondition("post-copy has not delivered every frame")
        self.holds_copy = False

    async def recover_postcopy(self, migration_id) -> None:
        self.calls.append("recover_postcopy")
        assert self.decision is S.POSTCOPY_PAUSED
        self.decision = S.POSTCOPY_ACTIVE

    async def rollback(self, migration_id, reason) -> None:
        self.calls.append("rollback")
        if not self.holds_copy:
            raise errors.NotFound("no copy here")
        self.decision, self.holds_copy, self.running = S.ROLLED_BACK, False, True


class FakeDest:
    def __init__(self, status: Status) -> None:
        self.status, self.address = status, "fake-b"
        self.running = status in (S.RESUMED, *POSTCOPY)
        self.calls: list[str] = []

    async def state(self, migration_id) -> SideState:
        self.calls.append("state")
        return SideState(self.status, "vm", source_agent="a")

    async def commit_and_resume(self, migration_id) -> None:
        self.calls.append("commit_and_resume")
        if self.status not in HAS_COPY:
            raise errors.FailedPrecondition(f"nothing to resume: {self.status}")
        self.status, self.running = S.RESUMED, True

    async def discard(self, migration_id, reason) -> None:
        self.calls.append("discard")
        if self.status in (S.COMMITTED, S.RESUMED):
            raise errors.FailedPrecondition("committed: it cannot be discarded")
        self.status = S.NONE


DESTS = [S.NONE, S.RECEIVING, S.READY, S.COMMITTED, S.RESUMED, S.LOST, *POSTCOPY]
BY_HAND = "by hand"
# (source decision, the source still holds its copy) -> per destination state:
# (the decision reported, where the guest runs) or BY_HAND (nothing changed)
TABLE = {
    (S.COMMITTED, True): [(S.ROLLED_BACK, "source"), BY_HAND, (S.COMMITTED, "destination"),
                          (S.COMMITTED, "destination"), (S.COMMITTED, "destination"),
                          (S.LOST, "nowhere"), BY_HAND, BY_HAND],
    (S.COMMITTED, False): [(S.LOST, "nowhere"), BY_HAND, (S.COMMITTED, "destination"),
                           (S.COMMITTED, "destination"), (S.COMMITTED, "destination"),
                           (S.LOST, "nowhere"), BY_HAND, BY_HAND],
    (S.ABORTED, False): [(S.ABORTED, "source"), (S.ABORTED, "source"), (S.ABORTED, "source"),
                         BY_HAND, BY_HAND, BY_HAND, BY_HAND, BY_HAND],
    (S.ROLLED_BACK, False): [(S.ROLLED_BACK, "source"), (S.ROLLED_BACK, "source"),
                             (S.ROLLED_BACK, "source"), BY_HAND, BY_HAND, BY_HAND,
                             BY_HAND, BY_HAND],
    (S.UNKNOWN, False): [(S.UNKNOWN, "source"), (S.UNKNOWN, "source"), (S.UNKNOWN, "source"),
                         BY_HAND, BY_HAND, BY_HAND, BY_HAND, BY_HAND],
    (S.LOST, False): [(S.LOST, "nowhere"), (S.LOST, "nowhere"), (S.LOST, "destination"),
                      (S.LOST, "destination"), (S.LOST, "destination"), (S.LOST, "nowhere"),
                      (S.LOST, "destination"), (S.LOST, "destination")],
    # switched to post-copy: the destination's copy is the guest; a paused transfer
    # goes on; a destination that died with it lost it (the source's copy goes)
    **{(pc, False): [BY_HAND, BY_HAND, (S.COMMITTED, "destination"),
                     (S.COMMITTED, "destination"), (S.COMMITTED, "destination"),
                     (S.LOST, "nowhere"), (S.COMMITTED, "destination"),
                     (S.COMMITTED, "destination")] for pc in POSTCOPY},
}
CELLS = [(decision, copy, dest, expected)
         for (decision, copy), row in TABLE.items() for dest, expected in zip(DESTS, row)]


def test_the_table_covers_every_decision_and_destination_state():
    assert {d for d, _c in TABLE} == set(S) - {S.NONE, S.RECEIVING, S.READY, S.RESUMED}
    assert set(DESTS) == set(S) - {S.UNKNOWN, S.ABORTED, S.ROLLED_BACK}
    assert all(len(row) == len(DESTS) for row in TABLE.values())


@pytest.mark.parametrize("decision,copy,dest_status,expected", CELLS,
                         ids=[f"{d}{'+copy' if c else ''}-x-{s}" for d, c, s, _e in CELLS])
def test_recovery_decides(decision, copy, dest_status, expected):
    source, dest = FakeSource(decision, copy), FakeDest(dest_status)
    if expected == BY_HAND:
        with pytest.raises(errors.FailedPrecondition, match="by hand"):
            asyncio.run(recover(source, dest, MID))
        assert source.calls == ["resolve"] and dest.calls == ["state"]  # nothing changed
        return
    outcome = asyncio.run(recover(source, dest, MID))
    assert (outcome.decision, outcome.runs_on) == expected
    running = {"source": source.running, "destination": dest.running}
    assert [where for where, on in running.items() if on] == (
        [] if outcome.runs_on == "nowhere" else [outcome.runs_on])
    if dest.running:
        assert not source.holds_copy  # the source's older copy never runs after it
    assert outcome.describe().startswith(f"migration {MID}: {outcome.decision}")


@pytest.mark.parametrize("decision,copy,dest_status,expected",
                         [c for c in CELLS if c[3] != BY_HAND])
def test_recovery_again_changes_nothing(decision, copy, dest_status, expected):
    """Idempotent: a second recovery (another agent's watchdog, the operator) of the same
    migration reaches the same place."""
    source, dest = FakeSource(decision, copy), FakeDest(dest_status)
    first = asyncio.run(recover(source, dest, MID))
    second = asyncio.run(recover(source, dest, MID))
    assert second.runs_on == first.runs_on


def test_a_destination_from_another_source_is_refused_by_name():
    source, dest = FakeSource(S.COMMITTED, True), FakeDest(S.READY)
    source.name = "c"
    with pytest.raises(errors.InvalidArgument, match="came from agent 'a', not from 'c'"):
        asyncio.run(recover(source, dest, MID))


def test_statuses_cross_the_wire_and_back():
    for status in S:
        assert Status.from_pb(status.to_pb()) is status
    state = SideState(S.READY, "vm", "a", "inst", holds_copy=False)
    assert SideState.from_pb(state.to_pb()) == state
    with pytest.raises(errors.InvalidArgument, match="unknown migration status 99"):
        Status.from_pb(99)
    with pytest.raises(errors.InvalidArgument, match="unknown migration status 0"):
        Status.from_pb(0)  # an answer without a status says nothing: never "unknown"


@pytest.mark.parametrize("dest_status", [S.READY, S.COMMITTED, S.RESUMED])
def test_a_paused_postcopy_goes_on_and_an_active_one_is_left_to_run(dest_status):
    paused, dest = FakeSource(S.POSTCOPY_PAUSED, False), FakeDest(dest_status)
    outcome = asyncio.run(recover(paused, dest, MID))
    assert paused.calls == ["resolve", "recover_postcopy"] and outcome.postcopy == "resumed"
    assert "post-copy was paused and goes on" in outcome.describe()
    active = FakeSource(S.POSTCOPY_ACTIVE, False)
    outcome = asyncio.run(recover(active, FakeDest(dest_status), MID))
    assert active.calls == ["resolve"] and outcome.postcopy == "under way"  # not completed

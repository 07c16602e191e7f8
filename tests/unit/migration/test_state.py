"""The sessions' states change only along their tables (pvmig.migration.state)."""

from __future__ import annotations

import pytest

from pvmig import errors
from pvmig.migration.state import (
    RESTORE_TRANSITIONS,
    SAVE_COMMITTED,
    SAVE_ENDING,
    SAVE_TRANSITIONS,
    SAVE_UNDECIDED,
    RestoreState,
    SaveState,
    advance,
    require,
)


def _reachable(start, table):
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("start,table,enum", [(SaveState.SETUP, SAVE_TRANSITIONS, SaveState),
                                               (RestoreState.PREPARING, RESTORE_TRANSITIONS,
                                                RestoreState)])
def test_every_state_is_in_the_table_and_reachable(start, table, enum):
    assert set(table) == set(enum)
    assert _reachable(start, table) == set(enum)


def test_a_committed_save_is_never_aborted_and_an_aborted_one_never_committed():
    for state in SAVE_COMMITTED:
        assert not (_reachable(state, SAVE_TRANSITIONS) & {SaveState.ABORTING, SaveState.ABORTED})
    for state in SAVE_ENDING:
        assert not _reachable(state, SAVE_TRANSITIONS) & SAVE_COMMITTED
    for state in SAVE_UNDECIDED:
        assert SaveState.ABORTING in SAVE_TRANSITIONS[state]


def test_a_committed_restore_is_never_discarded():
    committed = _reachable(RestoreState.COMMITTED, RESTORE_TRANSITIONS)
    assert RestoreState.DISCARDED not in committed
    assert RestoreState.DISCARDED not in RESTORE_TRANSITIONS[RestoreState.RESUMED]


def test_a_change_off_the_table_is_refused_by_name():
    assert advance(SaveState.DELIVERED, SaveState.COMMITTED, SAVE_TRANSITIONS, "m") \
        is SaveState.COMMITTED
    with pytest.raises(errors.FailedPrecondition,
                       match="outgoing migration m is active: it cannot become committed"):
        advance(SaveState.ACTIVE, SaveState.COMMITTED, SAVE_TRANSITIONS, "outgoing migration m")
    with pytest.raises(errors.FailedPrecondition, match="is receiving: resume needs it committed"):
        require(RestoreState.RECEIVING, RestoreState.COMMITTED, "m", "resume")
    require(SaveState.SUSPENDED, frozenset({SaveState.SUSPENDED, SaveState.DELIVERED}), "m", "x")

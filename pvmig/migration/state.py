"""The states of a migration's two sessions, and the one function that changes them.

As QEMU's MigrationStatus and migrate_set_state: each side's session holds one state,
and every change goes through `advance`, which refuses a change the table does not
allow from the state the session is in. What a session may do next follows from its
state, not from a set of flags.

Save side (source_host/save.py):

    SETUP -> ACTIVE -> SUSPENDED -> DELIVERED -> COMMITTED -> COMPLETING -> COMPLETED
      (pre-copy)   (suspend acked)  (final pass acked)   |  \
      any of the first four -> ABORTING -> ABORTED        |   POSTCOPY -> COMPLETING
                                                          |     ^   \
                                                          |     |   POSTCOPY_PAUSED
                                                          |   POSTCOPY_RECOVER <-/
                                                          +-> ROLLED_BACK (resumed here)

POSTCOPY (QEMU's postcopy-active): the guest runs at the destination and this side
still holds the frames it has not sent; there is no way back from it. A broken data
connection pauses it (postcopy-paused: nothing is lost, the frames are still here)
until a recovery reconnects (postcopy-recover) and the transfer goes on.

Restore side (dest_host/restore.py):

    PREPARING -> RECEIVING -> READY -> COMMITTED -> RESUMING -> RESUMED -> FINISHED
      (guest process)  (whole stream in)   (recorded)                (session dropped)
      any of the first three -> DISCARDED

The destination's paging after a switch to post-copy (dest_host/postcopy.py), beside
its session's state:

    ACTIVE <-> PAUSED (its data connections broke: faults wait for a recovery)
      +-> COMPLETE (every frame is here)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Mapping, TypeVar

from pvmig import errors


class SaveState(StrEnum):
    SETUP = "setup"            # connecting to the destination, claiming the domain
    ACTIVE = "active"          # pre-copy: the guest runs, rounds send what it dirtied
    SUSPENDED = "suspended"    # the guest acknowledged; quiesce and the final pass
    DELIVERED = "delivered"    # the destination acknowledged the whole stream
    COMMITTED = "committed"    # recorded durably: the guest belongs to the destination
    POSTCOPY = "postcopy-active"  # the guest runs there; its missing frames go from here
    POSTCOPY_PAUSED = "postcopy-paused"  # the data connections broke: waiting for recover
    POSTCOPY_RECOVER = "postcopy-recover"  # reconnecting: the destination says what it lacks
    COMPLETING = "completing"  # the source copy is being destroyed
    COMPLETED = "completed"
    ABORTING = "aborting"      # streams closing, the guest resuming here
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"  # committed, but the destination had no copy: back here


class RestoreState(StrEnum):
    PREPARING = "preparing"    # memory reserved, the guest process starting
    RECEIVING = "receiving"    # the streams come in
    READY = "ready"            # every stream ended and the device state is in
    COMMITTED = "committed"    # recorded durably
    RESUMING = "resuming"
    RESUMED = "resumed"        # the guest runs here
    FINISHED = "finished"      # the session is no longer needed
    DISCARDED = "discarded"    # everything received is gone; the guest never ran here


class PagingState(StrEnum):
    ACTIVE = "postcopy-active"  # frames come; the guest's faults are asked for at once
    PAUSED = "postcopy-paused"  # no data connection: faults are kept until a recovery
    COMPLETE = "postcopy-done"  # every frame is here


_S, _R, _P = SaveState, RestoreState, PagingState
SAVE_TRANSITIONS: Mapping[SaveState, frozenset[SaveState]] = {
    _S.SETUP: frozenset({_S.ACTIVE, _S.ABORTING}),
    _S.ACTIVE: frozenset({_S.SUSPENDED, _S.ABORTING}),
    _S.SUSPENDED: frozenset({_S.DELIVERED, _S.ABORTING}),
    _S.DELIVERED: frozenset({_S.COMMITTED, _S.ABORTING}),
    _S.COMMITTED: frozenset({_S.COMPLETING, _S.ROLLED_BACK, _S.POSTCOPY}),
    _S.POSTCOPY: frozenset({_S.COMPLETING, _S.POSTCOPY_PAUSED}),
    # (-> COMPLETING from a pause: the destination died with the guest, abandoned)
    _S.POSTCOPY_PAUSED: frozenset({_S.POSTCOPY_RECOVER, _S.COMPLETING}),
    _S.POSTCOPY_RECOVER: frozenset({_S.POSTCOPY, _S.POSTCOPY_PAUSED, _S.COMPLETING}),
    _S.COMPLETING: frozenset({_S.COMPLETED}),
    _S.COMPLETED: frozenset(),
    _S.ABORTING: frozenset({_S.ABORTED}),
    _S.ABORTED: frozenset(),
    _S.ROLLED_BACK: frozenset(),
}
RESTORE_TRANSITIONS: Mapping[RestoreState, frozenset[RestoreState]] = {
    _R.PREPARING: frozenset({_R.RECEIVING, _R.DISCARDED}),
    _R.RECEIVING: frozenset({_R.READY, _R.DISCARDED}),
    _R.READY: frozenset({_R.COMMITTED, _R.DISCARDED}),
    _R.COMMITTED: frozenset({_R.RESUMING}),
    _R.RESUMING: frozenset({_R.RESUMED}),
    _R.RESUMED: frozenset({_R.FINISHED}),
    _R.FINISHED: frozenset(),
    _R.DISCARDED: frozenset(),
}
PAGING_TRANSITIONS: Mapping[PagingState, frozenset[PagingState]] = {
    _P.ACTIVE: frozenset({_P.PAUSED, _P.COMPLETE}),
    _P.PAUSED: frozenset({_P.ACTIVE, _P.COMPLETE}),
    _P.COMPLETE: frozenset(),
}

# before these, an abort is still the answer; from them on, only the decision counts
SAVE_UNDECIDED = frozenset({_S.SETUP, _S.ACTIVE, _S.SUSPENDED, _S.DELIVERED})
SAVE_ENDING = frozenset({_S.ABORTING, _S.ABORTED, _S.ROLLED_BACK})  # going back home
SAVE_POSTCOPY = frozenset({_S.POSTCOPY, _S.POSTCOPY_PAUSED, _S.POSTCOPY_RECOVER})
SAVE_COMMITTED = frozenset({_S.COMMITTED, *SAVE_POSTCOPY, _S.COMPLETING, _S.COMPLETED})
RESTORE_COMMITTED = frozenset({_R.COMMITTED, _R.RESUMING, _R.RESUMED, _R.FINISHED})

S = TypeVar("S", SaveState, RestoreState, PagingState)


def advance(current: S, new: S, transitions: Mapping[S, frozenset[S]], what: str) -> S:
    """The state after `current` -> `new`, or FailedPrecondition naming both if the table
    does not allow it. The only way a session's state changes."""
    if new not in transitions[current]:
        raise errors.FailedPrecondition(f"{what} is {current}: it cannot become {new}")
    return new


def require(current: S, allowed: frozenset[S] | S, what: str, doing: str) -> None:
    """FailedPrecondition unless `current` is one of `allowed`: `doing` is not for now."""
    allowed = frozenset({allowed}) if isinstance(allowed, StrEnum) else allowed
    if current not in allowed:
        raise errors.FailedPrecondition(
            f"{what} is {current}: {doing} needs it {' or '.join(sorted(allowed))}")

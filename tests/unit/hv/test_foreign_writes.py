"""The journal of dom0's writes into a guest, and the causes it gives (foreign_writes.py)."""

from __future__ import annotations

import itertools

import numpy as np

from pvmig.hv.foreign_writes import (
    CAUSES,
    COPY_RACE,
    GRANT_MAP,
    MAPPED,
    NONE,
    POST_SUSPEND,
    TORN,
    TRACKED,
    XENSTORE_RING,
    XENSTORED,
    ForeignWrites,
    explain,
)


def journal_after_round0(n: int = 16) -> ForeignWrites:
    j = ForeignWrites(n)
    j.reset()  # a migration begins
    j.copy(np.arange(n))
    return j


def test_nothing_written_after_its_copy_has_no_cause():
    j = ForeignWrites(8)
    j.reset()
    j.write(3, MAPPED)
    j.write(4, XENSTORED)
    j.copy(np.arange(8))  # round 0 comes after: it carries both writes
    assert (j.causes() == NONE).all()


def test_each_kind_of_late_write_gets_its_cause():
    j = journal_after_round0()
    j.write(1, MAPPED)      # through a persistent grant, before the final read
    j.write(2, XENSTORED)
    j.write(3, TRACKED)     # logged: the final pass copies it again
    j.seal()
    j.copy(np.array([3]))
    j.write(4, TRACKED)     # a grant copy after the final read
    j.write(5, MAPPED)      # a write through a mapping after it
    j.copy(np.array([6]))
    j.write(6, TORN)        # landed in the middle of the copy of frame 6
    c = j.causes()
    assert c[1] == GRANT_MAP and c[2] == XENSTORE_RING and c[3] == NONE
    assert c[4] == POST_SUSPEND and c[5] == POST_SUSPEND and c[6] == COPY_RACE
    assert (c[[0, 7, 8]] == NONE).all()
    assert explain(c[[1, 4, 6, 0]]) == ["grant-map", "post-suspend-write", "copy-race",
                                        "unexplained"]


def test_a_copy_after_the_write_covers_it_and_reset_forgets_all():
    j = journal_after_round0()
    j.write(9, MAPPED)
    j.copy(np.array([8, 9, 10]))  # the guest touched the page: the next round sent it
    assert j.causes()[9] == NONE
    j.write(9, MAPPED)
    assert j.causes()[9] == GRANT_MAP
    j.reset()
    assert (j.causes() == NONE).all() and j.final_read == 0


def test_every_code_has_a_name():
    assert len(set(CAUSES)) == len(CAUSES)
    assert explain(np.arange(len(CAUSES)))[0] == "unexplained"


def test_it_records_only_while_a_migration_is_under_way():
    j = ForeignWrites(4)
    j.disarm()
    j.write(1, MAPPED)  # a backend at work between migrations: nothing kept
    assert not j.written.any() and (j.causes() == NONE).all()
    j.reset()
    j._ticks = itertools.count(2**32 + 6)  # far past what a u32 clock could hold
    j.write(2, MAPPED)
    assert j.causes()[2] == GRANT_MAP and int(j.written[2]) == 2**32 + 6

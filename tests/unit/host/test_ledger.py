"""The migrations a host took part in (ListMigrations), and what a fleet reads from them:
the most migrations open at one instant."""

from __future__ import annotations

import itertools
import time

from hypothesis import given
from hypothesis import strategies as st

from pvmig.fleet.inventory import most_at_once
from pvmig.host import ledger
from pvmig.host.ledger import Entry, Ledger


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 10
        return self.now


def test_a_new_ledger_is_empty():
    assert Ledger(Clock()).entries() == []


def test_began_then_ended():
    book = Ledger(Clock())
    book.began("m1", "source", "dom-a")
    (e,) = book.entries()
    assert e == Entry("m1", "dom-a", "source", 1_010)
    assert e.ended_unix_ns == 0 and e.outcome == ""  # (under way)
    book.ended("m1", "source", "completed")
    assert book.entries() == [Entry("m1", "dom-a", "source", 1_010, 1_020, "completed")]


def test_entries_are_in_the_order_they_began():
    book = Ledger(Clock())
    book.began("m1", "source", "a")
    book.began("m2", "destination", "b")
    book.began("m3", "source", "c")
    book.ended("m2", "destination", "failed")
    assert [(e.migration_id, e.outcome) for e in book.entries()] == [
        ("m1", ""), ("m2", "failed"), ("m3", "")]


def test_a_second_end_changes_nothing():
    book = Ledger(Clock())
    book.began("m1", "source", "a")
    book.ended("m1", "source", "completed")
    book.ended("m1", "source", "aborted")  # (a late abort)
    (e,) = book.entries()
    assert (e.ended_unix_ns, e.outcome) == (1_020, "completed")


def test_an_end_of_what_never_began_changes_nothing():
    book = Ledger(Clock())
    book.began("m1", "source", "a")
    book.ended("m2", "source", "failed")
    book.ended("m1", "destination", "failed")
    (e,) = book.entries()
    assert e.ended_unix_ns == 0 and e.outcome == ""


def test_both_roles_of_one_migration_on_one_host_are_two_entries():
    # (source and destination on one agent: a loopback migration)
    book = Ledger(Clock())
    book.began("m1", "source", "a")
    book.began("m1", "destination", "a")
    book.ended("m1", "destination", "completed")
    src, dst = book.entries()
    assert (src.role, src.outcome, src.ended_unix_ns) == ("source", "", 0)
    assert (dst.role, dst.outcome) == ("destination", "completed")
    book.ended("m1", "source", "completed")
    assert book.entries()[0].outcome == "completed"


def test_entries_is_a_copy():
    book = Ledger(Clock())
    book.began("m1", "source", "a")
    book.entries().clear()
    assert len(book.entries()) == 1


def test_the_wall_clock_by_default():
    before = time.time_ns()
    book = Ledger()
    book.began("m1", "source", "a")
    book.ended("m1", "source", "completed")
    (e,) = book.entries()
    assert before <= e.began_unix_ns <= e.ended_unix_ns <= time.time_ns()


def test_the_newest_keep_are_kept():
    book = Ledger(Clock())
    for i in range(ledger.KEEP + 10):
        book.began(f"m{i}", "source", "a")
    entries = book.entries()
    assert len(entries) == ledger.KEEP
    assert entries[0].migration_id == "m10" and entries[-1].migration_id == f"m{ledger.KEEP + 9}"
    # the newest still end as usual; ending one already dropped is harmless
    book.ended(f"m{ledger.KEEP + 9}", "source", "completed")
    book.ended("m0", "source", "completed")
    assert book.entries()[-1].outcome == "completed"
    assert all(e.migration_id != "m0" for e in book.entries())
    assert len(book.entries()) == ledger.KEEP


# ---- most_at_once


def test_none_at_all():
    assert most_at_once([]) == 0


def test_one():
    assert most_at_once([(5, 10)]) == 1


def test_disjoint_intervals_are_one_at_a_time():
    assert most_at_once([(0, 10), (20, 30), (40, 50)]) == 1


def test_overlapping_and_nested():
    assert most_at_once([(0, 10), (5, 15)]) == 2
    assert most_at_once([(0, 100), (10, 20), (15, 30), (25, 26)]) == 3
    assert most_at_once([(0, 10)] * 4) == 4


def test_an_end_and_a_start_at_the_same_instant_are_not_two_at_once():
    assert most_at_once([(0, 10), (10, 20)]) == 1
    assert most_at_once([(10, 20), (0, 10)]) == 1
    assert most_at_once([(0, 10), (10, 20), (20, 30), (5, 10), (10, 15)]) == 2


def test_an_interval_that_ends_where_it_begins_holds_no_instant():
    assert most_at_once([(5, 5)]) == 0
    assert most_at_once([(0, 10), (5, 5)]) == 1
    assert most_at_once([(5, 5), (5, 10), (0, 5)]) == 1


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=12))
def test_most_at_once_is_the_most_half_open_intervals_over_any_instant(spans):
    brute = max((sum(b <= t < e for b, e in spans) for t in range(0, 72)), default=0)
    assert most_at_once(spans) == brute
    # the order they come in does not matter
    for perm in itertools.islice(itertools.permutations(spans), 3):
        assert most_at_once(list(perm)) == brute

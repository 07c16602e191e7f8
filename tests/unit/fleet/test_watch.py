"""A migration's timeouts, judged at its round boundaries, on a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvmig.fleet.config import GIB, Settings
from pvmig.fleet.watch import Watch
from pvmig.migration.policy import TimeoutAction


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Report:
    """What Watch reads of a migration's report: its rounds so far."""

    rounds: list = field(default_factory=list)

    def boundary(self, remaining: int, disk: int | None = None) -> Report:
        r = {"remaining": remaining, "pages": 123}
        if disk is not None:
            r["disk"] = {"remaining": disk, "sent": 7}
        self.rounds.append(r)
        return self


def watch(clock, ram=GIB, **kw) -> Watch:
    return Watch(Settings(**kw), ram, clock=clock)


def run(w: Watch, clock: Clock, series, every: float, disk=None):
    """Boundaries at `every` seconds apart with these remaining counts; the verdicts."""
    report, out = Report(), []
    for i, left in enumerate(series):
        clock.now += every
        report.boundary(left, None if disk is None else disk[i])
        out.append(w(report))
    return out


# ---- completion


@pytest.mark.parametrize("gib, per_gib, limit", [(1, 150, 150), (2, 10, 20), (0.5, 10, 5),
                                                 (4, 2.5, 10)])
def test_the_completion_timeout_scales_with_the_guests_ram(gib, per_gib, limit):
    clock = Clock()
    w = watch(clock, ram=int(gib * GIB), completion_timeout_per_gib_s=per_gib,
              progress_timeout_s=0)
    assert w.limit_s == pytest.approx(limit)
    assert w.deadline == pytest.approx(1000.0 + limit)
    report = Report().boundary(100)
    clock.now = 1000.0 + limit  # (at the limit: not past it)
    assert w(report) is None
    clock.now += 0.01
    action, why = w(report.boundary(50))
    assert action is TimeoutAction.ABORT
    assert why.startswith("completion timeout: ")
    assert f"> {limit:.1f} s ({per_gib:g} s per GiB)" in why


def test_completion_fires_even_while_progressing():
    clock = Clock()
    w = watch(clock, ram=GIB, completion_timeout_per_gib_s=10)
    verdicts = run(w, clock, [1000 - i for i in range(15)], every=1.0)
    assert verdicts[:10] == [None] * 10
    assert verdicts[10][1].startswith("completion timeout: 11.0 s > 10.0 s")


def test_completion_timeout_zero_is_none():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=0)
    assert w.limit_s is None and w.deadline is None
    assert run(w, clock, [5] * 10, every=1e6) == [None] * 10


@pytest.mark.parametrize("action", list(TimeoutAction))
def test_the_action_is_the_settings(action):
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=1, timeout_action=action)
    clock.now += 2
    assert w(Report().boundary(1))[0] is action


def test_the_clock_starts_when_the_watch_is_made():
    clock = Clock(50.0)
    w = watch(clock, completion_timeout_per_gib_s=10, progress_timeout_s=0)
    assert w.started == 50.0 and w.deadline == 60.0


# ---- progress


def test_a_saw_tooth_with_new_lows_at_its_boundaries_is_not_a_stall():
    # inside each round what is left falls then jumps back up; at the boundaries (all Watch
    # sees) it keeps reaching new lows, slowly, each within the progress timeout
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    series = [10_000 - 10 * i for i in range(100)]
    assert run(w, clock, series, every=29.0) == [None] * 100
    assert w.best == series[-1] and w.boundaries == 100


def test_a_boundary_series_that_dips_now_and_then_is_not_a_stall():
    # up, down to a new low, up again...: a new low every other boundary, 20 s apart
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    series = []
    for i in range(40):
        series += [5000 + 100 * i, 4000 - 50 * i]  # (the high never a new low)
    assert run(w, clock, series, every=10.0) == [None] * 80


@pytest.mark.parametrize("series", [
    [1000] * 20,                          # flat
    [1000 + 10 * i for i in range(20)],   # rising
    [1000, 1500, 1000, 1500, 1000] * 4,   # back to the low, never under it
])
def test_a_flat_or_rising_boundary_series_is_a_stall_after_the_progress_timeout(series):
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    verdicts = run(w, clock, series, every=10.0)
    # the first boundary (t+10) sets the low; boundaries at +10 .. +30 after it are fine,
    # the one at +40 past it is a stall
    assert verdicts[:4] == [None] * 4
    action, why = verdicts[4]
    assert action is TimeoutAction.ABORT
    assert why == ("stalled: no round boundary in 40.0 s left fewer than 1000 pages "
                   "(progress timeout 30 s)")
    assert all(v is not None for v in verdicts[4:])


def test_a_new_low_restarts_the_progress_clock():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30,
              timeout_action=TimeoutAction.PAUSE)
    report = Report()
    for t, left, stalled in [(0, 900, False), (20, 950, False), (30, 950, False),
                             (31, 899, False), (60, 899, False), (61, 950, False),
                             (61.5, 899, True)]:
        clock.now = 1000.0 + t
        verdict = w(report.boundary(left))
        assert (verdict is not None) == stalled, (t, left)
    assert verdict[0] is TimeoutAction.PAUSE and "fewer than 899 pages" in verdict[1]


def test_the_progress_clock_starts_at_the_first_boundary():
    # (a long first round is the completion timeout's to judge, not a stall)
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    clock.now += 500
    assert w(Report().boundary(1000)) is None


def test_progress_timeout_zero_is_none():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=0)
    assert run(w, clock, [1000] * 50, every=1e5) == [None] * 50


def test_the_completion_timeout_is_reported_before_a_stall():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=100, progress_timeout_s=30)
    verdicts = run(w, clock, [1000] * 3, every=40.0)  # (40: first; 80: stalled; 120: both)
    assert verdicts[0] is None
    assert verdicts[1][1].startswith("stalled")
    assert verdicts[2][1].startswith("completion timeout")


def test_only_the_last_round_counts():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    report = Report().boundary(10).boundary(20).boundary(1000)  # (earlier rounds: history)
    assert w(report) is None and w.best == 1000


# ---- the disk


def test_the_disks_remaining_blocks_count_too():
    # memory flat, the disk still draining: progress
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    assert run(w, clock, [1000] * 10, every=20.0,
               disk=[5000 - 100 * i for i in range(10)]) == [None] * 10
    assert w.best == 1000 + 4100


def test_memory_falling_while_the_disk_rises_more_is_a_stall():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    verdicts = run(w, clock, [1000 - 10 * i for i in range(5)], every=10.0,
                   disk=[100 + 20 * i for i in range(5)])
    assert verdicts[:4] == [None] * 4
    assert "fewer than 1100 pages" in verdicts[4][1]


def test_a_round_without_a_disk_counts_none():
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=30)
    report = Report().boundary(1000, disk=500)
    assert w(report) is None and w.best == 1500
    clock.now += 10
    assert w(report.boundary(1200)) is None and w.best == 1200  # (no disk key: 0 blocks)


# ---- a property


@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False),
                          st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=40),
       st.sampled_from([0, 1, 30, 75.5]))
def test_a_stall_is_exactly_a_progress_timeout_without_a_new_low(steps, progress):
    clock = Clock()
    w = watch(clock, completion_timeout_per_gib_s=0, progress_timeout_s=progress)
    report = Report()
    best = best_at = None
    for dt, mem, disk in steps:
        clock.now += dt
        verdict = w(report.boundary(mem, disk))
        if best is None or mem + disk < best:
            best, best_at = mem + disk, clock.now
        expect = bool(progress) and clock.now - best_at > progress
        assert (verdict is not None) == expect
        if verdict:
            assert verdict[1].startswith("stalled") and f"fewer than {best} pages" in verdict[1]

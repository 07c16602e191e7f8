"""When to stop iterating (pvmig/migration/precopy.py)."""

from __future__ import annotations

import math

import pytest

from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration.precopy import (
    PrecopyPolicy,
    RoundStats,
    dirty_estimate,
    dirty_rate,
    expected_downtime,
)

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


def rs(remaining: int, *, bytes: int = 64 * MiB, duration_s: float = 1.0, round: int = 0,
       dirty: int | None = None, dirty_rate: float = 0.0) -> RoundStats:
    """One round; by default a steady one: it sent as many pages as it left dirty."""
    return RoundStats(round=round, dirty_pages=remaining if dirty is None else dirty,
                      sent_pages=bytes // PAGE_SIZE, zero_pages=0, bytes=bytes,
                      duration_s=duration_s, dirty_rate=dirty_rate, remaining_pages=remaining)


def history(*remaining: int, **kw) -> list[RoundStats]:
    return [rs(r, round=i, **kw) for i, r in enumerate(remaining)]


# ---- RoundStats.bandwidth and expected_downtime


def test_bandwidth():
    assert rs(0, bytes=10 * MiB, duration_s=2.0).bandwidth == 5 * MiB
    assert rs(0, bytes=10 * MiB, duration_s=0.0).bandwidth == 0.0
    assert rs(0, bytes=0, duration_s=1.0).bandwidth == 0.0


def test_expected_downtime_is_dirty_bytes_over_bandwidth():
    # 4 MiB/s; 100 pages = 400 KiB -> 0.09765625 s
    rounds = [rs(100, bytes=4 * MiB, duration_s=1.0)]
    assert expected_downtime(rounds) == pytest.approx(100 * PAGE_SIZE / (4 * MiB))
    assert expected_downtime(rounds) == pytest.approx(0.09765625)


def test_expected_downtime_uses_the_last_rounds_remaining_and_the_best_bandwidth():
    rounds = [rs(5000, bytes=8 * MiB, duration_s=1.0),    # 8 MiB/s
              rs(3000, bytes=40 * MiB, duration_s=2.0),   # 20 MiB/s: the best
              rs(2560, bytes=10 * MiB, duration_s=1.0)]   # 10 MiB/s
    assert expected_downtime(rounds) == pytest.approx(2560 * PAGE_SIZE / (20 * MiB))


def test_small_rounds_do_not_set_the_bandwidth():
    """A round under 1 MiB measures latency more than bandwidth: it is ignored while a
    round of at least 1 MiB exists, however fast it looked."""
    rounds = [rs(1000, bytes=2 * MiB, duration_s=1.0),          # 2 MiB/s
              rs(500, bytes=MiB - 1, duration_s=0.001)]         # ~1 GiB/s but small
    assert expected_downtime(rounds) == pytest.approx(500 * PAGE_SIZE / (2 * MiB))
    # exactly 1 MiB counts
    rounds = [rs(1000, bytes=2 * MiB, duration_s=1.0),
              rs(500, bytes=MiB, duration_s=0.1)]                # 10 MiB/s
    assert expected_downtime(rounds) == pytest.approx(500 * PAGE_SIZE / (10 * MiB))


def test_only_small_rounds_use_the_best_of_them():
    rounds = [rs(10, bytes=4096, duration_s=0.01),     # 400 KiB/s
              rs(20, bytes=8192, duration_s=0.01)]     # 800 KiB/s
    assert expected_downtime(rounds) == pytest.approx(20 * PAGE_SIZE / (8192 / 0.01))


def test_no_bandwidth_measured():
    assert expected_downtime([rs(0, bytes=0, duration_s=0.0)]) == 0.0
    assert expected_downtime([rs(1, bytes=0, duration_s=0.0)]) == math.inf
    assert expected_downtime([rs(1, bytes=MiB, duration_s=0.0)]) == math.inf


# ---- the policy


def test_stops_when_the_expected_downtime_is_within_the_limit():
    policy = PrecopyPolicy(downtime_limit_s=0.3)
    # 64 MiB/s: 0.3 s = 19.2 MiB = 4915.2 pages
    d = policy(history(60000, 4915))
    assert d.stop
    assert "within" in d.reason and "300 ms" in d.reason
    assert d.expected_downtime_s == pytest.approx(4915 * PAGE_SIZE / (64 * MiB))


def test_stops_exactly_at_the_limit():
    policy = PrecopyPolicy(downtime_limit_s=0.25)
    # 64 MiB/s * 0.25 s = 16 MiB = 4096 pages exactly
    d = policy(history(60000, 4096))
    assert d.expected_downtime_s == 0.25
    assert d.stop


def test_continues_when_the_expected_downtime_is_over_the_limit():
    policy = PrecopyPolicy(downtime_limit_s=0.3)
    rounds = history(60000, 4916)
    d = policy(rounds)
    assert not d.stop
    assert d.reason == "iterate"
    assert d.expected_downtime_s == pytest.approx(expected_downtime(rounds))
    assert d.expected_downtime_s > 0.3


def test_stops_when_nothing_is_left():
    d = PrecopyPolicy()(history(60000, 0))
    assert d.stop and d.expected_downtime_s == 0.0


def test_continues_with_no_bandwidth_and_pages_left():
    d = PrecopyPolicy()([rs(100, bytes=0, duration_s=0.0)])
    assert not d.stop and d.expected_downtime_s == math.inf


def test_stops_at_max_rounds():
    policy = PrecopyPolicy(downtime_limit_s=0.001, max_rounds=6, no_progress_rounds=50)
    shrinking = [100000 - 1000 * i for i in range(6)]
    assert not policy(history(*shrinking[:5])).stop          # 5 rounds: go on
    d = policy(history(*shrinking))                          # the 6th: stop
    assert d.stop
    assert "cap of 6 rounds" in d.reason
    assert d.expected_downtime_s > 0.001


def test_the_downtime_test_comes_before_the_cap():
    policy = PrecopyPolicy(downtime_limit_s=0.3, max_rounds=2)
    d = policy(history(60000, 10))
    assert d.stop and "within" in d.reason


def test_stops_when_remaining_does_not_shrink():
    policy = PrecopyPolicy(downtime_limit_s=0.001, max_rounds=100, no_progress_rounds=3)
    flat = history(50000, 50000, 50000, 50000)
    d = policy(flat)
    assert d.stop
    assert "no progress in 3 rounds" in d.reason and "50000 pages" in d.reason
    # growing is no progress either
    assert policy(history(40000, 41000, 45000, 42000)).stop


def test_needs_a_full_window_before_calling_no_progress():
    policy = PrecopyPolicy(downtime_limit_s=0.001, max_rounds=100, no_progress_rounds=3)
    assert not policy(history(50000, 50000, 50000)).stop   # 3 rounds: only 2 compared
    assert not policy(history(50000)).stop


def test_any_shrink_in_the_window_is_progress():
    policy = PrecopyPolicy(downtime_limit_s=0.001, max_rounds=100, no_progress_rounds=3)
    # the window is the last 4 rounds: 50000 then 3 rounds, one of them below it
    assert not policy(history(50000, 60000, 49999, 60000)).stop
    assert not policy(history(50000, 60000, 60000, 49999)).stop
    # a shrink before the window does not count
    assert policy(history(90000, 50000, 50000, 50000, 50000)).stop


def test_a_steady_shrink_iterates():
    policy = PrecopyPolicy(downtime_limit_s=0.001, max_rounds=100, no_progress_rounds=5)
    rounds = history(*[100000 - 1000 * i for i in range(20)])
    for n in range(1, len(rounds) + 1):
        assert not policy(rounds[:n]).stop, f"stopped after {n} rounds"


# ---- the dirty rate over a window of rounds


def test_a_round_that_found_nothing_does_not_make_the_guest_idle():
    """A guest that writes in bursts every 10 ms, rounds of 4 ms: the last round found
    nothing, the window's rate still says 20000 pages/s."""
    rounds = [rs(0, round=0, dirty=16384, bytes=64 * MiB, duration_s=0.1)]
    rounds += [RoundStats(round=i, dirty_pages=dirty, sent_pages=dirty, zero_pages=0,
                          bytes=dirty * PAGE_SIZE, duration_s=0.004, dirty_rate=0.0,
                          remaining_pages=0, interval_s=0.005)
               for i, dirty in enumerate([200, 0, 200, 0, 0], start=1)]
    assert dirty_rate(rounds) == pytest.approx(400 / 0.025)
    assert dirty_estimate(rounds) == pytest.approx(400 / 0.025 * 0.004)
    decision = PrecopyPolicy(downtime_limit_s=1e-5)(rounds)
    assert not decision.stop and decision.expected_downtime_s > 1e-5


def test_the_window_reaches_back_far_enough_and_no_further():
    old = RoundStats(round=1, dirty_pages=10_000, sent_pages=0, zero_pages=0, bytes=0,
                     duration_s=0.1, dirty_rate=0.0, remaining_pages=0, interval_s=0.3)
    new = RoundStats(round=2, dirty_pages=100, sent_pages=0, zero_pages=0, bytes=0,
                     duration_s=0.1, dirty_rate=0.0, remaining_pages=0, interval_s=0.25)
    assert dirty_rate([old, new]) == pytest.approx(100 / 0.25)  # the window is full
    assert dirty_rate([old, new], window_s=0.5) == pytest.approx(10_100 / 0.55)
    assert dirty_rate([rs(5, round=0)]) == 0.0  # round 0 tells nothing


def test_no_progress_detection_can_be_turned_off():
    flat = history(16384, 500, 500, 500, 500, 500, 500, 500)
    assert PrecopyPolicy(downtime_limit_s=1e-9, no_progress_rounds=5)(flat).stop
    assert not PrecopyPolicy(downtime_limit_s=1e-9, no_progress_rounds=0)(flat).stop

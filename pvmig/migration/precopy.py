"""When to stop iterating: one pluggable function of the rounds so far.

Xen's default stops under 50 dirty pages or after 5 rounds; QEMU's stops when the
pages left would go in the downtime limit at the bandwidth measured. pvmig takes
QEMU's test as the goal, with a cap on rounds and a no-progress detector as guards.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvmig.hv.memory import PAGE_SIZE


@dataclass(frozen=True)
class RoundStats:
    round: int
    dirty_pages: int      # frames the round had to send
    sent_pages: int
    zero_pages: int
    bytes: int
    duration_s: float
    dirty_rate: float     # pages dirtied per second during the previous round
    remaining_pages: int  # dirty again when the round ended (a peek)
    interval_s: float = 0.0  # the time over which dirty_pages were dirtied

    @property
    def bandwidth(self) -> float:
        """Bytes per second this round achieved."""
        return self.bytes / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    expected_downtime_s: float
    converged: bool = False  # stopped because what is left fits in the downtime limit


@dataclass(frozen=True)
class PrecopyPolicy:
    downtime_limit_s: float = 0.3
    max_rounds: int = 30
    no_progress_rounds: int = 5

    def __call__(self, rounds: list[RoundStats], *, can_throttle: bool = False) -> Decision:
        """can_throttle: auto-converge may still slow the guest down, so a lack of
        progress is no reason to stop yet."""
        last = rounds[-1]
        expected = expected_downtime(rounds)
        if expected <= self.downtime_limit_s:
            return Decision(True, f"expected downtime {expected * 1e3:.1f} ms is within the "
                                  f"{self.downtime_limit_s * 1e3:.0f} ms limit", expected,
                            converged=True)
        if len(rounds) >= self.max_rounds:
            return Decision(True, f"not converging: reached the cap of {self.max_rounds} "
                                  f"rounds, {expected * 1e3:.0f} ms expected", expected)
        window = rounds[-self.no_progress_rounds - 1:]
        if (self.no_progress_rounds and not can_throttle and len(window) > self.no_progress_rounds
                and min(r.dirty_pages for r in window[1:]) >= window[0].dirty_pages):
            return Decision(True, f"not converging: no progress in {self.no_progress_rounds} "
                                  f"rounds ({last.dirty_pages} pages dirty each round)",
                            expected)
        return Decision(False, "iterate", expected)


@dataclass
class AutoConverge:
    """QEMU's auto-converge (cpu-throttle): when the guest dirties more than `trigger`
    of what a round managed to send, twice in a row, throttle its vCPU: `initial`%
    first, then `increment` more each time, up to `maximum`%."""
    initial: int = 20
    increment: int = 10
    maximum: int = 99
    trigger: float = 0.5
    percent: int = 0
    _strikes: int = 0

    @property
    def can_throttle(self) -> bool:
        return self.percent < self.maximum

    def next(self, rounds: list[RoundStats]) -> int | None:
        """The new throttle after the last round, or None to leave it as it is."""
        if len(rounds) < 2:
            return None
        last, prev = rounds[-1], rounds[-2]
        # pages dirtied while the previous round ran, against what that round sent
        sent = max(prev.sent_pages + prev.zero_pages, 1)
        self._strikes = self._strikes + 1 if last.dirty_pages > self.trigger * sent else 0
        if self._strikes < 2 or not self.can_throttle:
            return None
        self._strikes = 0
        self.percent = min(self.percent + self.increment, self.maximum) if self.percent \
            else self.initial
        return self.percent


RATE_WINDOW_S = 0.2


def dirty_rate(rounds: list[RoundStats], window_s: float = RATE_WINDOW_S) -> float:
    """Pages dirtied per second over the last rounds, back to at least window_s. A guest
    writes in bursts: a round shorter than the gap between bursts can find nothing
    dirty, and one round's rate alone would say the guest went idle."""
    dirty, interval = 0, 0.0
    for r in reversed(rounds):
        if r.round == 0:  # round 0 sends every frame: it says nothing about the rate
            break
        dirty += r.dirty_pages
        interval += r.interval_s
        if interval >= window_s:
            break
    return dirty / interval if interval > 0 else 0.0


def dirty_estimate(rounds: list[RoundStats]) -> float:
    """Pages the next round will find dirty: those written during the last round, at
    the rate of the last rounds; at least what a peek at the round's end saw."""
    last = rounds[-1]
    return max(float(last.remaining_pages), dirty_rate(rounds) * last.duration_s)


def expected_downtime(rounds: list[RoundStats]) -> float:
    """Seconds to send what is dirty now at the best bandwidth a round has shown."""
    bandwidth = max((r.bandwidth for r in rounds if r.bytes >= 1 << 20), default=0.0)
    if bandwidth == 0.0:
        bandwidth = max((r.bandwidth for r in rounds), default=0.0)
    if bandwidth == 0.0:
        return 0.0 if dirty_estimate(rounds) == 0 else float("inf")
    return dirty_estimate(rounds) * PAGE_SIZE / bandwidth

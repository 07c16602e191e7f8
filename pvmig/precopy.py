"""When to stop iterating: one pluggable function of the rounds so far.

Xen's default stops under 50 dirty pages or after 5 rounds; QEMU's stops when the
pages left would go in the downtime limit at the bandwidth measured. pvmig takes
QEMU's test as the goal, with a cap on rounds and a no-progress detector as guards.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import PAGE_SIZE


@dataclass(frozen=True)
class RoundStats:
    round: int
    dirty_pages: int      # frames the round had to send
    sent_pages: int
    zero_pages: int
    bytes: int
    duration_s: float
    dirty_rate: float     # pages dirtied per second during the previous round
    remaining_pages: int  # dirty again when the round ended

    @property
    def dirty_estimate(self) -> float:
        """Pages dirty for the next round. The peek at the round's end undercounts a
        guest that writes in bursts; the rate measured over the previous round does not
        (unknown in round 0, which has only the peek)."""
        return max(float(self.remaining_pages), self.dirty_rate * self.duration_s)

    @property
    def bandwidth(self) -> float:
        """Bytes per second this round achieved."""
        return self.bytes / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    expected_downtime_s: float


@dataclass(frozen=True)
class PrecopyPolicy:
    downtime_limit_s: float = 0.3
    max_rounds: int = 30
    no_progress_rounds: int = 5

    def __call__(self, rounds: list[RoundStats]) -> Decision:
        last = rounds[-1]
        expected = expected_downtime(rounds)
        if expected <= self.downtime_limit_s:
            return Decision(True, f"expected downtime {expected * 1e3:.1f} ms is within the "
                                  f"{self.downtime_limit_s * 1e3:.0f} ms limit", expected)
        if len(rounds) >= self.max_rounds:
            return Decision(True, f"reached the cap of {self.max_rounds} rounds", expected)
        window = rounds[-self.no_progress_rounds - 1:]
        if (len(window) > self.no_progress_rounds
                and min(r.dirty_pages for r in window[1:]) >= window[0].dirty_pages):
            return Decision(True, f"no progress in {self.no_progress_rounds} rounds "
                                  f"({last.dirty_pages} pages dirty each round)", expected)
        return Decision(False, "iterate", expected)


def expected_downtime(rounds: list[RoundStats]) -> float:
    """Seconds to send what is dirty now at the best bandwidth a round has shown."""
    bandwidth = max((r.bandwidth for r in rounds if r.bytes >= 1 << 20), default=0.0)
    if bandwidth == 0.0:
        bandwidth = max((r.bandwidth for r in rounds), default=0.0)
    if bandwidth == 0.0:
        return 0.0 if rounds[-1].dirty_estimate == 0 else float("inf")
    return rounds[-1].dirty_estimate * PAGE_SIZE / bandwidth

"""A migration's timeouts, judged at its round boundaries (pure, on a given clock).

Completion: the whole migration may take completion_timeout_per_gib_s for each GiB of
the guest's RAM (KubeVirt's completionTimeoutPerGiB, Nova's
live_migration_completion_timeout).

Progress: what is left to send is sampled only where a round ends. Inside a round it
falls as pages go and jumps when the next round's dirty set is read: a saw-tooth that
a sampler at arbitrary instants takes for a stall (why Nova deprecated its
live_migration_progress_timeout). At the boundaries it is the next round's size; the
migration stalls when no boundary has lowered the lowest of them for
progress_timeout_s.
"""

from __future__ import annotations

import time

from pvmig.fleet.config import GIB, Settings


class Watch:
    def __init__(self, settings: Settings, ram_bytes: int, clock=time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.started = clock()
        per_gib = settings.completion_timeout_per_gib_s
        self.limit_s = per_gib * ram_bytes / GIB if per_gib else None
        self.best: int | None = None
        self.best_at = self.started
        self.boundaries = 0

    @property
    def deadline(self) -> float | None:
        return None if self.limit_s is None else self.started + self.limit_s

    def __call__(self, report) -> tuple[str, str] | None:
        """At a round boundary (pvmig.coordinator.migrate's control): None to go on, or
        (the action, why)."""
        now = self.clock()
        self.boundaries += 1
        last = report.rounds[-1]
        left = last["remaining"] + last.get("disk", {}).get("remaining", 0)
        if self.best is None or left < self.best:
            self.best, self.best_at = left, now
        action = self.settings.timeout_action
        if self.limit_s is not None and now - self.started > self.limit_s:
            return (action, f"completion timeout: {now - self.started:.1f} s > "
                    f"{self.limit_s:.1f} s ({self.settings.completion_timeout_per_gib_s:g} "
                    "s per GiB)")
        progress = self.settings.progress_timeout_s
        if progress and now - self.best_at > progress:
            return (action, f"stalled: no round boundary in {now - self.best_at:.1f} s "
                    f"left fewer than {self.best} pages (progress timeout {progress:g} s)")
        return None

"""Runs a plan's moves, several at once, under the fleet's caps.

A move waits in the queue until both caps leave room (the fleet's parallel_migrations,
and parallel_outbound_per_host for its source), then runs as one coordinator's
migration with its policy's settings and a Watch on its timeouts. One whose guest is
still at its source when it fails is tried again, on another destination if the plan
can find one, up to the fleet's retries; one that failed after its commit belongs to its
destination and is reported, not retried. A cancel (Ctrl-C, SIGTERM) aborts every
migration under way before its commit and drops the queue: each guest runs where it
was, or where it went.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from pvmig.coordinator import migrate as coordinator
from pvmig.coordinator.progress import Reporter
from pvmig.coordinator.report import Report
from pvmig.fleet.config import Fleet, Settings
from pvmig.fleet.placement import DomainView, HostView, Move, best_host
from pvmig.fleet.watch import Watch
from pvmig.migration.policy import TimeoutAction
from pvmig.rpc.client import AgentClient

log = logging.getLogger(__name__)
QUEUED, MIGRATING, COMPLETED, FAILED, ABORTED, CANCELLED = (
    "queued", "migrating", "completed", "failed", "aborted", "cancelled")


@dataclass
class Row:
    """One domain's move: its attempts, and where it stands."""

    domain: str
    ram: int
    source: str
    dest: str
    settings: Settings
    allowed: dict  # host labels its policy asks of a destination
    view: DomainView | None = None  # as planned
    state: str = QUEUED
    phase: str = ""
    round: int = -1
    attempts: list[dict] = field(default_factory=list)
    queued_s: float = 0.0
    started_s: float | None = None
    ended_s: float | None = None
    error: str = ""
    tried: set = field(default_factory=set)
    origin: str = ""  # what asked for it (a scenario's step)
    task: asyncio.Task | None = field(default=None, repr=False, compare=False)

    @property
    def last(self) -> dict | None:
        return self.attempts[-1] if self.attempts else None

    def to_dict(self) -> dict:
        last = self.last or {}
        return {"domain": self.domain, "origin": self.origin or None,
                "ram-bytes": self.ram, "source": self.source,
                "dest": self.dest, "policy": self.settings.policy or None,
                "state": self.state, "error": self.error or None,
                "queued-ms": _ms(self.queued_s),
                "started-ms": _ms(self.started_s), "ended-ms": _ms(self.ended_s),
                "waited-ms": (_ms(self.started_s - self.queued_s)
                              if self.started_s is not None else None),
                "downtime-ms": last.get("downtime-ms"),
                "total-time-ms": last.get("total-time-ms"),
                "transferred-bytes": last.get("transferred-bytes"),
                "attempts": self.attempts}


class _RowReporter(Reporter):
    def __init__(self, row: Row, changed) -> None:
        self.row, self.changed = row, changed

    def phase(self, name: str, **fields) -> None:
        if name != "done":
            self.row.phase = name
            self.changed(self.row)

    def round_done(self, stats: dict) -> None:
        self.row.round = stats.get("round", self.row.round)
        self.changed(self.row)


class Runner:
    def __init__(self, fleet: Fleet, hosts: dict[str, HostView], display,
                 clock=time.monotonic) -> None:
        self.fleet, self.hosts, self.display, self.clock = fleet, hosts, display, clock
        self.t0 = clock()
        self.rows: list[Row] = []
        self.cancelled = ""
        self.timeline: list[tuple[float, int, int]] = []  # (s, queued, migrating)
        self._room = asyncio.Condition()
        self._running: dict[str, int] = {}  # by source host
        self._tasks: set[asyncio.Task] = set()

    # ---- the queue

    async def run(self, moves: list[Move]) -> list[Row]:
        rows = self.submit(moves)
        await self.drain()
        return rows

    def submit(self, moves: list[Move], origin: str = "") -> list[Row]:
        """Queue `moves` (planned: their RAM reserved in self.hosts) behind those
        already queued; each starts when the caps leave room, with its policy's
        settings."""
        rows = []
        for m in moves:
            settings, allowed = self.fleet.rules_for(m.domain.labels)
            rows.append(Row(m.domain.name, m.domain.ram, m.source, m.dest, settings,
                            allowed, view=m.domain, queued_s=self._now(),
                            tried={m.dest}, origin=origin))
        self.rows.extend(rows)
        self._note()
        for row in rows:
            self.display.update(row)
            row.task = asyncio.get_running_loop().create_task(self._move(row))
        return rows

    async def drain(self) -> None:
        """Until every row submitted has ended (those submitted meanwhile too). A
        waiter that gives up (cancelled) leaves the rows' tasks running: a cancel of the
        moves is Runner.cancel's, which lets each settle."""
        while pending := [r.task for r in self.rows if r.task and not r.task.done()]:
            done, _ = await asyncio.wait(pending)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("a move ended in a bug", exc_info=task.exception())

    def in_flight(self) -> set[str]:
        """Domains with a move queued or under way."""
        return {r.domain for r in self.rows if r.task and not r.task.done()}

    def cancel(self, why: str) -> None:
        """Abort what runs (before its commit), drop what waits."""
        if self.cancelled:
            return
        self.cancelled = why
        for task in list(self._tasks):
            task.cancel()
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _has_room(self, source: str) -> bool:
        total = sum(self._running.values())
        return (total < self.fleet.parallel_migrations and
                self._running.get(source, 0) < self.fleet.parallel_outbound_per_host)

    async def _move(self, row: Row) -> None:
        while True:
            async with self._room:
                await self._room.wait_for(lambda: self.cancelled or self._has_room(row.source))
                if self.cancelled:
                    row.state, row.error = CANCELLED, f"not started: {self.cancelled}"
                    self.display.update(row)
                    return
                self._running[row.source] = self._running.get(row.source, 0) + 1
            if row.started_s is None:
                row.started_s = self._now()
            row.state, row.phase, row.round = MIGRATING, "", -1
            self._note()
            self.display.update(row)
            try:
                report = await self._attempt(row)
            except Exception as e:  # a bug: this row ends, the others go on
                log.exception("migration of %s failed", row.domain)
                report = _broken(row, e)
            finally:
                async with self._room:
                    self._running[row.source] -= 1
                    self._room.notify_all()
            again = self._settle(row, report)
            self._note()
            self.display.update(row)
            if not again:
                return

    def _settle(self, row: Row, report) -> bool:
        """Where the row stands after an attempt; True to try again. The plan reserved
        the domain's RAM at its destination: given back where the guest stayed."""
        d = report.to_dict()
        row.attempts.append({k: d[k] for k in (
            "migration-id", "status", "committed", "error", "downtime-ms",
            "total-time-ms", "transferred-bytes", "stop-reason", "intervention")}
            | {"dest": row.dest, "verified": report.verified})
        row.ended_s = self._now()
        if report.status == "completed" or report.committed:
            # the guest is the destination's: nothing to try again
            ok = report.status == "completed" and report.verified
            row.state = COMPLETED if ok else FAILED
            row.error = "" if ok else (report.error or "completed, not verified: see its "
                                       "attempt's report")
            return False
        row.error = report.error or "failed"
        stays = True
        if self.cancelled:
            row.state = CANCELLED
        elif report.intervention is not None and report.intervention["action"] == "abort":
            row.state = ABORTED  # its policy's timeout: a second try would time out too
        elif len(row.attempts) > self.fleet.retries:
            row.state = FAILED
        else:
            stays = False
        self._unreserve(row)
        if stays:
            self._reserve(row, row.source)
            return False
        where = best_host(row.view, list(self.hosts.values()), row.allowed, exclude=row.tried)
        row.dest = row.dest if isinstance(where, str) else where.name  # (none: the same)
        row.tried.add(row.dest)
        self._reserve(row, row.dest)
        row.state = QUEUED
        return True

    def _unreserve(self, row: Row) -> None:
        self.hosts[row.dest].used_ram -= row.ram
        self.hosts[row.dest].domains.pop(row.domain, None)

    def _reserve(self, row: Row, host: str) -> None:
        self.hosts[host].used_ram += row.ram
        self.hosts[host].domains[row.domain] = replace(row.view, host=host)

    # ---- one migration

    async def _attempt(self, row: Row):
        s = row.settings
        options = coordinator.Options(
            downtime_limit_ms=s.downtime_limit_ms, max_bandwidth_mbps=s.bandwidth_mbps,
            copy_storage=s.copy_storage,
            allow_postcopy=s.timeout_action is TimeoutAction.POSTCOPY)
        watch = Watch(s, row.ram, self.clock)
        src = AgentClient(self.fleet.agents[row.source].address, "the source agent")
        dst = AgentClient(self.fleet.agents[row.dest].address, "the destination agent")
        try:
            migration = coordinator.Migration(src, dst, row.domain, options,
                                              _RowReporter(row, self.display.update),
                                              control=watch)
            task = asyncio.ensure_future(migration.run())
            self._tasks.add(task)
            timer = None
            if watch.deadline is not None and s.timeout_action is TimeoutAction.ABORT:
                # a round that never ends (a dead link) never reaches a boundary
                timer = asyncio.get_running_loop().call_at(
                    watch.deadline + 1.0, self._overdue, task, migration)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:  # (the fleet's cancel: the task aborts itself)
                return await task
            finally:
                self._tasks.discard(task)
                if timer is not None:
                    timer.cancel()
        finally:
            await src.close()
            await dst.close()

    @staticmethod
    def _overdue(task: asyncio.Task, migration) -> None:
        if "suspend" not in migration.report.phases and not task.done():
            migration.report.intervention = {"action": "abort", "round": None,
                                             "reason": "completion timeout inside a round"}
            task.cancel()

    # ---- bookkeeping

    def _now(self) -> float:
        return self.clock() - self.t0

    def _note(self) -> None:
        queued = sum(r.state == QUEUED for r in self.rows)
        running = sum(r.state == MIGRATING for r in self.rows)
        self.timeline.append((round(self._now(), 4), queued, running))


def _broken(row: Row, e: Exception):
    """A report for an attempt that ended in a bug: where the guest is, the census says."""
    report = Report(migration_id="", domain=row.domain, source=row.source, dest=row.dest)
    report.status, report.error = "failed", f"internal error: {type(e).__name__}: {e}"
    report.committed = True  # (unknown: not retried)
    return report


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1e3, 3)

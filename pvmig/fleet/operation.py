"""A fleet operation, top to bottom: survey the agents, plan, carry the plan out under
the caps, then account for it from the agents themselves.

    survey     every agent answers (its RAM, labels, domains), or nothing moves
    plan       evacuate: every domain off a host; rebalance: from full hosts to empty
    run        the moves under the caps (pvmig.fleet.runner)
    census     each domain runs on exactly one host, its guest's checks clean
    ledgers    the agents' records of their migrations: never more at once than allowed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from pathlib import Path

from pvmig import errors
from pvmig.fleet import inventory, placement
from pvmig.fleet.config import Fleet
from pvmig.fleet.runner import COMPLETED, Runner


class Operation:
    def __init__(self, fleet: Fleet, kind: str, display_of) -> None:
        self.fleet, self.kind, self.display_of = fleet, kind, display_of
        self.result: dict = {"operation": kind, "fleet-file": fleet.path,
                             "caps": caps_of(fleet)}
        self.runner: Runner | None = None

    async def evacuate(self, host: str) -> dict:
        name = self.fleet.agent(host).name
        self.result["host"] = name
        hosts = await inventory.survey(self.fleet)
        moves, unplaced = placement.evacuation(name, hosts, self.fleet.hosts_for)
        return await self._carry_out(hosts, moves, unplaced, f"evacuate {name}")

    async def rebalance(self) -> dict:
        hosts = await inventory.survey(self.fleet)
        self.result["spread-before"] = round(placement.spread(hosts), 4)
        moves = placement.rebalance(hosts, self.fleet.hosts_for)
        self.result["spread-planned"] = round(placement.spread(hosts), 4)
        return await self._carry_out(hosts, moves, [], "rebalance")

    async def _carry_out(self, hosts, moves, unplaced, title: str) -> dict:
        t0 = time.monotonic()
        self.result["unplaced"] = [{"domain": u.domain.name, "ram-bytes": u.domain.ram,
                                    "why": u.why} for u in unplaced]
        self.runner = runner = Runner(self.fleet, hosts, None)
        runner.display = display = self.display_of(lambda: runner.rows, title)
        try:
            with cancelled_by_signals(runner.cancel):
                await runner.run(moves)
        finally:
            display.close()
        self.result["total-time-ms"] = round((time.monotonic() - t0) * 1e3, 3)
        names = {m.domain.name for m in moves} | {u.domain.name for u in unplaced}
        self.result.update(await account(self.fleet, runner, dict.fromkeys(names, True),
                                         clean=not unplaced))
        return self.result


def caps_of(fleet: Fleet) -> dict:
    return {"parallel-migrations": fleet.parallel_migrations,
            "parallel-outbound-per-host": fleet.parallel_outbound_per_host,
            "retries": fleet.retries}


async def account(fleet: Fleet, runner: Runner, alive: dict[str, bool], clean: bool) -> dict:
    """What a fleet's work reports once its moves have ended, the agents asked again:
    each move, the queue over time, the downtimes' spread; the census of the domains
    named in `alive` (True: each runs on exactly one host, its checks clean; False: a
    domain destroyed, on none); the caps from the agents' ledgers; and the status,
    `completed` only if every move completed, all of that holds, and `clean` (nothing
    else went wrong: nothing left unplaced, no step failed)."""
    rows = runner.rows
    census = await inventory.census(fleet, set(alive))
    census_ok = all(
        (len(where) == 1 and where[0]["state"] == "running" and where[0]["failed"] == 0)
        if alive[name] else not where for name, where in census.items())
    observed = await observe(fleet, rows)
    done = sum(row.state == COMPLETED for row in rows)
    return {
        "migrations": [row.to_dict() for row in rows],
        "queue": [{"t-ms": round(t * 1e3, 3), "queued": q, "migrating": m}
                  for t, q, m in runner.timeline],
        "downtime-ms": spread_of([row.last["downtime-ms"] for row in rows
                                  if row.state == COMPLETED
                                  and row.last["downtime-ms"] is not None]),
        "census": census, "census-ok": census_ok, "observed": observed,
        "cancelled": runner.cancelled or None, "completed": done, "planned": len(rows),
        "status": ("cancelled" if runner.cancelled else
                   "completed" if done == len(rows) and clean and census_ok
                   and observed["within-caps"] else "partial")}


@contextlib.contextmanager
def cancelled_by_signals(cancel):
    """SIGINT and SIGTERM call cancel(why) while within: the work stops cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel, f"{signal.Signals(sig).name} received")
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def observe(fleet: Fleet, rows) -> dict:
    """The caps, as the agents' ledgers saw them: each source's entry of each
    migration of `rows`, from its Begin to its end."""
    ids = {a["migration-id"] for row in rows for a in row.attempts}
    now = time.time_ns()
    spans: dict[str, list] = {}
    for host, entries in (await inventory.ledgers(fleet)).items():
        spans[host] = [(e.began_unix_ns, e.ended_unix_ns or now) for e in entries
                       if e.role == "source" and e.migration_id in ids]
    at_once = inventory.most_at_once([s for v in spans.values() for s in v])
    outbound = {h: inventory.most_at_once(v) for h, v in spans.items() if v}
    return {"from": "the agents' ledgers (ListMigrations: each source's Begin to end)",
            "migrations-seen": sum(len(v) for v in spans.values()),
            "most-at-once": at_once, "most-outbound": outbound,
            "within-caps": at_once <= fleet.parallel_migrations and all(
                n <= fleet.parallel_outbound_per_host for n in outbound.values())}


def spread_of(values: list[float]) -> dict | None:
    if not values:
        return None
    v = sorted(values)
    p95 = v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    return {"n": len(v), "min": v[0], "median": round(statistics.median(v), 3),
            "p95": p95, "max": v[-1], "spread": round(v[-1] - v[0], 3)}


def write(result: dict, path: Path) -> None:
    text = json.dumps(result, indent=2) + "\n"
    try:
        path.write_text(text)
    except OSError as e:
        raise errors.InvalidArgument(f"cannot write the report {path}: {e.strerror}") from None

"""`pvmig matrix`: the policies of the experiment against each other, by measurement.

Each cell is one combination of policies (DESIGN.md, "Experiment matrix"). For each, a
fresh pair of agents on loopback, a guest whose disk is busy and slow enough that
requests are in flight at every suspend, and `runs` migrations back and forth left to
chance, then `runs` with the hazards forced. Forced runs alternate two sets of
injection points, each set's hazards being able to happen in one migration:

    A  response-before-final + xenstore-after-final
    B  write-after-final + torn-copy + xenstore-after-final

Per cell: the corruptions the guest observed (failed read checks), the frames that
differ between the two memories by class (undefined, observed, torn, lost) and by
cause, the downtime, the total time, the bytes moved and the guest's disk I/O rate.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.migrate import Options, migrate
from pvmig.coordinator.progress import Reporter
from pvmig.rpc.client import AgentClient
from pvmig.tools.cluster import LocalCluster

QUICK = {"grants": ["map", "persistent"], "recovery": ["replay", "naive"],
         "quiesce": ["none", "backend"]}
FULL = {"grants": ["map", "persistent", "copy"], "recovery": ["replay", "naive"],
        "quiesce": ["none", "backend"], "backend_log": [False, True],
        "xenstore_track": [False, True]}
FORCED = [("response-before-final", "xenstore-after-final"),
          ("write-after-final", "torn-copy", "xenstore-after-final")]


@dataclass
class Tally:
    """What a set of migrations (left to chance, or forced) showed."""
    migrations: int = 0
    failed: int = 0            # did not complete, or the verdict failed
    observed: int = 0          # failed read checks: the guest saw wrong data
    runs_with_corruption: int = 0
    classes: Counter = field(default_factory=Counter)  # differing frames by class
    causes: Counter = field(default_factory=Counter)   # ... by cause
    observed_causes: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)  # hazards each point made happen
    asked: Counter = field(default_factory=Counter)     # runs that asked for each point
    fired: Counter = field(default_factory=Counter)     # ... in which it made its hazard

    def to_dict(self) -> dict:
        return {"migrations": self.migrations, "failed": self.failed,
                "observed-corruptions": self.observed,
                "runs-with-corruption": self.runs_with_corruption,
                "frames-by-class": dict(self.classes), "frames-by-cause": dict(self.causes),
                "observed-by-cause": dict(self.observed_causes),
                "injected": dict(self.injected), "injection-asked": dict(self.asked),
                "injection-fired": dict(self.fired)}


@dataclass
class Cell:
    grants: str
    recovery: str
    quiesce: str
    backend_log: bool = False
    xenstore_track: bool = False
    chance: Tally = field(default_factory=Tally)
    forced: Tally = field(default_factory=Tally)
    inflight: int = 0
    replayed: int = 0
    trusted: int = 0
    downtimes: list = field(default_factory=list)
    totals: list = field(default_factory=list)
    transferred: list = field(default_factory=list)
    io_rates: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def name(self) -> str:
        extra = "".join([" +backend-log" if self.backend_log else "",
                         " +xenstore-track" if self.xenstore_track else ""])
        return f"{self.grants}/{self.recovery}/quiesce={self.quiesce}{extra}"

    @property
    def verdict(self) -> str:
        if self.errors and not self.chance.migrations:
            return "error"
        if any(t.observed or t.classes["observed"] or t.classes["lost"]
               for t in (self.chance, self.forced)):
            return "CORRUPTS"
        differ = self.chance.classes + self.forced.classes
        return "safe (undefined frames)" if differ else "safe"

    def to_dict(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
        return {"cell": self.name, "grants": self.grants, "recovery": self.recovery,
                "quiesce": self.quiesce, "backend-log": self.backend_log,
                "xenstore-track": self.xenstore_track,
                "chance": self.chance.to_dict(), "forced": self.forced.to_dict(),
                "in-flight": self.inflight, "replayed": self.replayed,
                "trusted-old-ring": self.trusted,
                "downtime-ms-median": med(self.downtimes),
                "total-ms-median": med(self.totals),
                "transferred-mib-median": med(self.transferred),
                "guest-io-per-s-median": med(self.io_rates),
                "verdict": self.verdict, "errors": self.errors}


def cells(full: bool) -> list[Cell]:
    space = FULL if full else QUICK
    keys = list(space)
    return [Cell(**dict(zip(keys, values)))
            for values in itertools.product(*(space[k] for k in keys))]


def run_cell(cell: Cell, runs: int, base: Path) -> Cell:
    with LocalCluster(base, ["a", "b"]) as cluster:
        hosts = [cluster["a"].address, cluster["b"].address]
        uvloop.run(_create(hosts[0], cell, base / "disk.img"))
        time.sleep(0.8)  # the disk gets busy
        for i in range(2 * runs):
            forced = i >= runs
            src, dst = hosts[i % 2], hosts[(i + 1) % 2]
            options = Options(quiesce=cell.quiesce, backend_log=cell.backend_log,
                              xenstore_track=cell.xenstore_track, recovery=cell.recovery,
                              verify_timeout_s=20.0,
                              inject=FORCED[(i - runs) % len(FORCED)] if forced else ())
            report = uvloop.run(migrate(src, dst, "vm", options, Reporter()))
            _record(cell, report.to_dict(), forced)
            if report.status != "completed":
                break
            time.sleep(0.3)
    return cell


async def _create(address: str, cell: Cell, disk: Path) -> None:
    async with AgentClient(address) as agent:
        await agent.call(agent.agent.CreateDomain, pb.CreateDomainRequest(
            name="vm", ram_bytes=16 << 20,
            workload=pb.WorkloadConfig(dirty_rate=500, hot_fraction=0.1, hot_share=0.9,
                                       fill=0.75, seed=1),
            devices=[pb.DeviceConfig(kind="vbd", devid=0, disk=str(disk), blocks=64,
                                     latency_ms=20.0, io_rate=400.0,
                                     persistent=cell.grants == "persistent",
                                     grant_mode="copy" if cell.grants == "copy" else "map")]),
            timeout=120.0)


def _record(cell: Cell, d: dict, forced: bool) -> None:
    tally = cell.forced if forced else cell.chance
    tally.migrations += 1
    tally.injected.update(d["injected"])
    tally.asked.update(d["policies"]["inject"])
    tally.fired.update(k for k, n in d["injected"].items() if n > 0)
    if d["status"] != "completed":
        tally.failed += 1
        cell.errors.append(d["error"])
        return
    v = d["verification"]
    (blk,) = [x for x in d["devices"] if x["kind"] == "vbd"]
    checks = blk["guest-checks"]
    observed = checks["read-failures"] + (v["guest-checks"] or {}).get("failed", 0)
    tally.failed += not v["passed"]
    tally.observed += observed
    tally.runs_with_corruption += observed > 0
    tally.classes.update(v["differing-by-class"])
    tally.causes.update(v["differing-by-cause"])
    tally.observed_causes.update(f["cause"] for f in v["differing-detail"]
                                 if f["class"] == "observed")
    if forced:
        return
    cell.inflight += blk["inflight-at-suspend"]
    cell.replayed += blk["replayed-on-dest"]
    cell.trusted += blk["trusted-old-ring"]
    cell.downtimes.append(d["downtime-ms"])
    cell.totals.append(d["total-time-ms"])
    cell.transferred.append(d["transferred-bytes"] / (1 << 20))
    seconds = d["total-time-ms"] / 1e3
    cell.io_rates.append((checks["reads-checked"] + checks["writes-acked"]) / seconds)


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def _fired(forced: dict) -> str:
    asked, fired = forced.get("injection-asked", {}), forced.get("injection-fired", {})
    return ", ".join(f"{p} {fired.get(p, 0)}/{n}" for p, n in sorted(asked.items())) or "-"


COLUMNS = ("cell", "chance: observed (runs)", "forced: observed (runs)",
           "differing frames by class", "observed by cause", "in flight / replayed / trusted",
           "injection points: fired in / asked for (runs)", "downtime ms", "total ms",
           "MiB sent", "disk I/O /s", "verdict")


def row(r: dict) -> list[str]:
    ch, fo = r["chance"], r["forced"]
    classes = Counter(ch["frames-by-class"]) + Counter(fo["frames-by-class"])
    causes = Counter(ch["observed-by-cause"]) + Counter(fo["observed-by-cause"])
    return [r["cell"],
            f"{ch['observed-corruptions']} ({ch['runs-with-corruption']} of {ch['migrations']})",
            f"{fo['observed-corruptions']} ({fo['runs-with-corruption']} of {fo['migrations']})",
            _counts(classes), _counts(causes),
            f"{r['in-flight']} / {r['replayed']} / {r['trusted-old-ring']}",
            _fired(fo), str(r["downtime-ms-median"]), str(r["total-ms-median"]),
            str(r["transferred-mib-median"]), str(r["guest-io-per-s-median"]), r["verdict"]]


def markdown(rows: list[dict], command: str, columns=COLUMNS, row=row) -> str:
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n"
    body = "".join("| " + " | ".join(row(r)) + " |\n" for r in rows)
    return f"`{command}`\n\n{head}{body}"


def run_cells(cells: list, run_cell, *, runs: int, title: str, columns, row, said,
              json_path: Path | None, md_path: Path | None, command: str) -> int:
    """Each cell on a fresh pair of agents, then the table (the terminal, JSON,
    markdown); 1 if a cell could not run at all. Shared by `pvmig matrix` and its
    --postcopy cells."""
    from rich.console import Console
    from rich.table import Table
    console = Console(stderr=True)
    rows = []
    started = time.monotonic()
    for cell in cells:
        with tempfile.TemporaryDirectory(prefix="pvmig-matrix-") as base:
            try:
                run_cell(cell, runs, Path(base))
            except Exception as e:  # a cell that cannot run is reported, the rest go on
                cell.errors.append(f"{type(e).__name__}: {e}")
        rows.append(cell.to_dict())
        console.print(said(cell))
    table = Table(title=f"{title}, {time.monotonic() - started:.0f} s")
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*row(r))
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps({"command": command, "runs": runs, "cells": rows},
                                        indent=1) + "\n")
    if md_path:
        md_path.write_text(markdown(rows, command, columns, row))
    return 0 if all(r["verdict"] != "error" for r in rows) else 1


def run_matrix(*, full: bool, runs: int, json_path: Path | None, md_path: Path | None,
               command: str) -> int:
    return run_cells(
        cells(full), run_cell, runs=runs, columns=COLUMNS, row=row,
        title=f"pvmig matrix: {runs} migrations left to chance and {runs} forced per cell",
        said=lambda c: (f"{c.name}: {c.verdict} ({c.chance.observed} + {c.forced.observed} "
                        f"observed in {c.chance.migrations} + {c.forced.migrations} "
                        "migrations)"),
        json_path=json_path, md_path=md_path, command=command)

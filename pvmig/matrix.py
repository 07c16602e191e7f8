"""`pvmig matrix`: the policies of the experiment against each other, by measurement.

Each cell is one combination of policies (DESIGN.md, "Experiment matrix"). For each, a
fresh pair of agents on loopback, a guest whose disk is busy and slow enough that
requests are in flight at every suspend, and `runs` migrations back and forth. Per
cell: the guest-observed corruptions (failed read checks), the frames that differ
between the two memories (undefined unless the guest used them), the responses trusted
from the old ring, and the downtime and total time.

Each cell runs twice over: `runs` migrations left to chance, then `runs` with the
hazard forced (injection point response-before-final: after suspend the backends
answer what they have in flight, the ring is logged, the data stays behind its grant).
Not yet: the other injection points (a torn copy, a xenstored write after the final
pass), and differing frames classified by cause rather than by area.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from ._proto import pvmig_pb2 as pb
from .client import AgentClient
from .cluster import LocalCluster
from .coordinator import Options, migrate
from .progress import Reporter

QUICK = {"grants": ["map", "persistent"], "recovery": ["replay", "naive"],
         "quiesce": ["none", "backend"]}
FULL = {"grants": ["map", "persistent", "copy"], "recovery": ["replay", "naive"],
        "quiesce": ["none", "backend"], "backend_log": [False, True],
        "xenstore_track": [False, True]}


@dataclass
class Cell:
    grants: str
    recovery: str
    quiesce: str
    backend_log: bool = False
    xenstore_track: bool = False
    migrations: int = 0
    failed: int = 0
    observed: int = 0          # failed read checks: the guest saw wrong data
    runs_with_corruption: int = 0
    undefined: int = 0         # frames that differ, all in backend- or xenstored-written areas
    guest_only: int = 0        # frames that differ that only the guest writes: lost writes
    inflight: int = 0
    replayed: int = 0
    trusted: int = 0
    forced_migrations: int = 0
    forced_observed: int = 0
    forced_runs_with_corruption: int = 0
    downtimes: list = field(default_factory=list)
    totals: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def name(self) -> str:
        extra = "".join([" +backend-log" if self.backend_log else "",
                         " +xenstore-track" if self.xenstore_track else ""])
        return f"{self.grants}/{self.recovery}/quiesce={self.quiesce}{extra}"

    @property
    def verdict(self) -> str:
        if self.errors and not self.migrations:
            return "error"
        if self.observed or self.guest_only or self.forced_observed:
            return "CORRUPTS"
        return "safe" if not self.undefined else "safe (undefined frames)"

    def to_dict(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
        return {"cell": self.name, "grants": self.grants, "recovery": self.recovery,
                "quiesce": self.quiesce, "backend-log": self.backend_log,
                "xenstore-track": self.xenstore_track, "migrations": self.migrations,
                "failed-migrations": self.failed, "observed-corruptions": self.observed,
                "runs-with-corruption": self.runs_with_corruption,
                "forced-migrations": self.forced_migrations,
                "forced-observed-corruptions": self.forced_observed,
                "forced-runs-with-corruption": self.forced_runs_with_corruption,
                "undefined-frames": self.undefined, "guest-only-frames": self.guest_only,
                "torn-frames": None, "in-flight": self.inflight, "replayed": self.replayed,
                "trusted-old-ring": self.trusted, "downtime-ms-median": med(self.downtimes),
                "total-ms-median": med(self.totals), "verdict": self.verdict,
                "errors": self.errors}


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
                              inject=("response-before-final",) if forced else ())
            report = uvloop.run(migrate(src, dst, "vm", options, Reporter()))
            _record(cell, report, forced)
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


def _record(cell: Cell, report, forced: bool) -> None:
    d = report.to_dict()
    if forced:
        cell.forced_migrations += 1
        if d["status"] == "completed":
            (blk,) = [x for x in d["devices"] if x["kind"] == "vbd"]
            seen = blk["guest-checks"]["read-failures"]
            cell.forced_observed += seen
            cell.forced_runs_with_corruption += seen > 0
        else:
            cell.errors.append(d["error"])
        return
    cell.migrations += 1
    if d["status"] != "completed":
        cell.failed += 1
        cell.errors.append(d["error"])
        return
    if not d["verification"]["passed"]:
        cell.failed += 1
    (blk,) = [x for x in d["devices"] if x["kind"] == "vbd"]
    observed = blk["guest-checks"]["read-failures"] + (d["verification"]["guest-checks"] or {}).get("failed", 0)
    cell.observed += observed
    cell.runs_with_corruption += observed > 0
    areas = d["verification"]["differing-by-area"]
    cell.guest_only += areas.get("guest-only", 0)
    cell.undefined += sum(v for k, v in areas.items() if k != "guest-only")
    cell.inflight += blk["inflight-at-suspend"]
    cell.replayed += blk["replayed-on-dest"]
    cell.trusted += blk["trusted-old-ring"]
    cell.downtimes.append(d["downtime-ms"])
    cell.totals.append(d["total-time-ms"])


def markdown(rows: list[dict], command: str) -> str:
    head = ("| cell | migrations | observed corruptions (runs) | forced: observed (runs) | "
            "undefined frames | guest-only frames | in flight / replayed / trusted | "
            "downtime ms (median) | total ms (median) | verdict |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['cell']} | {r['migrations']} | {r['observed-corruptions']} "
        f"({r['runs-with-corruption']}) | {r['forced-observed-corruptions']} "
        f"({r['forced-runs-with-corruption']} of {r['forced-migrations']}) | "
        f"{r['undefined-frames']} | {r['guest-only-frames']} | "
        f"{r['in-flight']} / {r['replayed']} / {r['trusted-old-ring']} | "
        f"{r['downtime-ms-median']} | {r['total-ms-median']} | {r['verdict']} |\n" for r in rows)
    return f"`{command}`\n\n{head}{body}"


def run_matrix(*, full: bool, runs: int, json_path: Path | None, md_path: Path | None,
               command: str) -> int:
    from rich.console import Console
    from rich.table import Table
    console = Console(stderr=True)
    rows = []
    started = time.monotonic()
    for cell in cells(full):
        with tempfile.TemporaryDirectory(prefix="pvmig-matrix-") as base:
            try:
                run_cell(cell, runs, Path(base))
            except Exception as e:  # a cell that cannot run is reported, the rest go on
                cell.errors.append(f"{type(e).__name__}: {e}")
        rows.append(cell.to_dict())
        console.print(f"{cell.name}: {cell.verdict} ({cell.observed} observed in "
                      f"{cell.migrations} migrations)")
    table = Table(title=f"pvmig matrix: {runs} migrations per cell, "
                        f"{time.monotonic() - started:.0f} s")
    for col in ("cell", "migr.", "observed", "forced", "undefined", "guest-only",
                "inflight/replayed/trusted", "downtime ms", "verdict"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["cell"], str(r["migrations"]), str(r["observed-corruptions"]),
                      str(r["forced-observed-corruptions"]),
                      str(r["undefined-frames"]), str(r["guest-only-frames"]),
                      f"{r['in-flight']}/{r['replayed']}/{r['trusted-old-ring']}",
                      str(r["downtime-ms-median"]), r["verdict"])
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps({"command": command, "runs": runs, "cells": rows},
                                        indent=1) + "\n")
    if md_path:
        md_path.write_text(markdown(rows, command))
    return 0 if all(r["verdict"] != "error" for r in rows) else 1

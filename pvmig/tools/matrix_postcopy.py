"""`pvmig matrix --postcopy`: dom0 and the frames that have not arrived, by measurement.

Cells: the backend (blk, net) against the policy postcopy-dom0 (demand, unsafe). For
each, a fresh pair of agents on loopback, a guest whose one device is busy (a disk at
400 requests/s; a NIC answering a `pvmig peer` at 200 requests/s), and `runs` post-copy
migrations back and forth with the push capped, so that the backends work at the
destination while most frames are still to come: left to chance. Then `runs` with the
hazard forced through the backends: the push sends the rings and I/O buffers last
(push-devices-last), so that the destination's backends reach them first unless the
guest faults on them. Then `runs` with it forced at one frame: the push waits for the
guest's first fault (push-after-fault) and dom0 reads a frame in the middle of the RAM
before the guest resumes (dom0-touch-missing).

Per cell: dom0's accesses to missing frames (demand: waited for; unsafe: went through
its own mapping), the guest frames such an access took (a zero page the guest keeps),
the corruptions the guest observed, the differing frames by cause, the downtime, the
post-copy time and its fault latency.
"""

from __future__ import annotations

import itertools
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.migrate import Options, migrate
from pvmig.coordinator.progress import Reporter
from pvmig.rpc.client import AgentClient
from pvmig.tools import matrix
from pvmig.tools.cluster import LocalCluster

DEVICES = ["vbd", "vif"]
POLICIES = ["demand", "unsafe"]
RAM_MB = 16
CAP_MBPS = 100.0  # 16 MiB in ~1.3 s: the backends work meanwhile
BACKENDS_FIRST = ("push-devices-last",)
FORCED = ("push-after-fault", "dom0-touch-missing")
PEER_RATE = 200


@dataclass
class Tally:
    migrations: int = 0
    failed: int = 0
    observed: int = 0          # failed checks (memory, disk reads): the guest saw it
    runs_with_corruption: int = 0
    dom0_waits: int = 0        # demand: dom0 accesses that waited for their frame
    dom0_touched: int = 0      # unsafe: dom0 accesses to a frame not here
    taken: int = 0             # frames such an access took (the guest keeps a zero page)
    causes: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"migrations": self.migrations, "failed": self.failed,
                "observed-corruptions": self.observed,
                "runs-with-corruption": self.runs_with_corruption,
                "dom0-waits": self.dom0_waits, "dom0-touched-missing": self.dom0_touched,
                "taken-pages": self.taken, "frames-by-cause": dict(self.causes)}


@dataclass
class Cell:
    device: str
    dom0: str
    chance: Tally = field(default_factory=Tally)
    backends: Tally = field(default_factory=Tally)  # push-devices-last
    forced: Tally = field(default_factory=Tally)
    downtimes: list = field(default_factory=list)
    postcopy_ms: list = field(default_factory=list)
    latency_p50: list = field(default_factory=list)
    faults: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{'blk' if self.device == 'vbd' else 'net'}/postcopy-dom0={self.dom0}"

    @property
    def verdict(self) -> str:
        if self.errors and not self.chance.migrations:
            return "error"
        if any(t.observed or t.taken for t in (self.chance, self.backends, self.forced)):
            return "CORRUPTS"
        return "safe"

    def to_dict(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
        return {"cell": self.name, "device": self.device, "postcopy-dom0": self.dom0,
                "chance": self.chance.to_dict(), "backends-first": self.backends.to_dict(),
                "forced": self.forced.to_dict(),
                "downtime-ms-median": med(self.downtimes),
                "postcopy-ms-median": med(self.postcopy_ms),
                "fault-latency-ms-p50-median": med(self.latency_p50),
                "faults-median": med(self.faults),
                "verdict": self.verdict, "errors": self.errors}


def cells() -> list[Cell]:
    return [Cell(d, p) for d, p in itertools.product(DEVICES, POLICIES)]


def run_cell(cell: Cell, runs: int, base: Path) -> Cell:
    with LocalCluster(base, ["a", "b"]) as cluster:
        hosts = [cluster["a"].address, cluster["b"].address]
        address = uvloop.run(_create(hosts[0], cell, base / "disk.img"))
        peer = _start_peer(address, base / "peer.json") if cell.device == "vif" else None
        try:
            time.sleep(0.8)  # the device gets busy
            for i in range(3 * runs):
                kind = ("chance", "backends", "forced")[i // runs]
                src, dst = hosts[i % 2], hosts[(i + 1) % 2]
                inject = {"chance": (), "backends": BACKENDS_FIRST, "forced": FORCED}[kind]
                options = Options(postcopy=True, postcopy_dom0=cell.dom0,
                                  max_bandwidth_mbps=CAP_MBPS, verify_timeout_s=20.0,
                                  inject=inject)
                report = uvloop.run(migrate(src, dst, "vm", options, Reporter()))
                _record(cell, report.to_dict(), kind)
                if not report.committed:  # the guest stayed where it was: no next move
                    break
                time.sleep(0.3)
        finally:
            if peer is not None:
                peer.send_signal(signal.SIGTERM)
                peer.communicate(timeout=60)
    return cell


async def _create(address: str, cell: Cell, disk: Path) -> str:
    device = (pb.DeviceConfig(kind="vbd", devid=0, disk=str(disk), blocks=64,
                              latency_ms=20.0, io_rate=400.0) if cell.device == "vbd"
              else pb.DeviceConfig(kind="vif", devid=0))
    async with AgentClient(address) as agent:
        await agent.call(agent.agent.CreateDomain, pb.CreateDomainRequest(
            name="vm", ram_bytes=RAM_MB << 20,
            workload=pb.WorkloadConfig(dirty_rate=500, hot_fraction=0.1, hot_share=0.9,
                                       fill=0.75, seed=1),
            devices=[device]), timeout=120.0)
        info = await agent.call(agent.agent.QueryDomain, pb.DomainRef(name="vm"))
    return next((s.address for s in info.device_stats if s.kind == "vif"), "")


def _start_peer(address: str, stats: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pvmig", "peer", "--guest", address, "--rate", str(PEER_RATE),
         "--duration", "0", "--give-up", "30", "--stats", str(stats)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _record(cell: Cell, d: dict, kind: str) -> None:
    tally = getattr(cell, kind)
    tally.migrations += 1
    pc = d.get("postcopy") or {}
    dom0 = pc.get("dom0", {})
    tally.dom0_waits += dom0.get("waits", 0)
    tally.dom0_touched += dom0.get("touched-missing", 0)
    tally.taken += dom0.get("taken-pages", 0)
    v = d.get("verification") or {}
    if d["status"] != "completed" and not v:
        tally.failed += 1
        cell.errors.append(d["error"])
        return
    checks = [x["guest-checks"] for x in d.get("devices", [])]
    observed = ((v.get("guest-checks") or {}).get("failed", 0)
                + sum(c.get("read-failures", 0) + c.get("errors", 0) for c in checks))
    tally.failed += not v.get("passed", False)
    tally.observed += observed
    tally.runs_with_corruption += observed > 0
    tally.causes.update(v.get("differing-by-cause", {}))
    if kind != "chance":
        return
    cell.downtimes.append(d["downtime-ms"])
    cell.postcopy_ms.append(pc.get("time-ms", 0))
    cell.latency_p50.append(pc.get("latency-ms", {}).get("p50", 0))
    cell.faults.append(pc.get("faults", 0))


COLUMNS = ("cell", "chance: dom0 waited / touched / pages taken", "chance: observed (runs)",
           "backends first: dom0 waited / touched / pages taken",
           "backends first: observed (runs)",
           "one frame forced: dom0 waited / touched / pages taken",
           "one frame forced: observed (runs)", "differing frames by cause",
           "downtime ms", "post-copy ms", "faults", "fault latency p50 ms", "verdict")


def _dom0(t: dict) -> str:
    return f"{t['dom0-waits']} / {t['dom0-touched-missing']} / {t['taken-pages']}"


def _observed(t: dict) -> str:
    return f"{t['observed-corruptions']} ({t['runs-with-corruption']} of {t['migrations']})"


def row(r: dict) -> list[str]:
    tallies = (r["chance"], r["backends-first"], r["forced"])
    causes = sum((Counter(t["frames-by-cause"]) for t in tallies), Counter())
    return [r["cell"], *(f(t) for t in tallies for f in (_dom0, _observed)),
            ", ".join(f"{k} {v}" for k, v in sorted(causes.items())) or "-",
            str(r["downtime-ms-median"]), str(r["postcopy-ms-median"]),
            str(r["faults-median"]), str(r["fault-latency-ms-p50-median"]), r["verdict"]]


def run(*, runs: int, json_path: Path | None, md_path: Path | None, command: str) -> int:
    return matrix.run_cells(
        cells(), run_cell, runs=runs, columns=COLUMNS, row=row,
        title=f"pvmig matrix --postcopy: {runs} migrations left to chance, {runs} with the "
              f"backends first and {runs} with one frame forced per cell",
        said=lambda c: f"{c.name}: {c.verdict}",
        json_path=json_path, md_path=md_path, command=command)

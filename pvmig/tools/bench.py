"""`pvmig bench`: migrations over a grid, measured against the transport's ceiling and,
where it is installed, QEMU's own migration of a guest of the same size, in one run.

Per RAM size: three ceilings between two processes moving the same bytes on as many
streams as pvmig has (pvmig.tools.ceiling): raw TCP, what the machine can move; a bare
Python TLS stream, what encrypted data channels can move; and a bare gRPC stream, what
the grpc transport can move with nothing of pvmig on it. QEMU (`--peer qemu`) migrating a
paused guest whose RAM holds the same bytes as pvmig's idle all-written guest, single
stream and 2 multifd channels. Then, on a fresh pair of agents (and a pair under mutual
TLS for the TLS cells), each cell of the grid: a guest of that size, all of its RAM
written or a quarter of it zero pages, its dirty rate, its devices idle or busy, a
bandwidth cap or none, the transport, `runs` migrations back and forth. Ratios are the
headline: these machines are shared.

Dirty rates: idle (0), moderate (MODERATE pages/s), heavy (above the link: 1.5 times
what the cap carries, or HEAVY pages/s uncapped; with auto-converge, and without it
once to show that it does not converge).

Storage cells (issue 17): a guest with a 256 MiB disk, provisioned full, written 300
times a second (STORAGE_DISK), migrated with the disk on shared storage and copied
beside memory in both modes (--copy-storage): what the copy costs in downtime and disk
bytes, and what write-blocking costs the guest's writes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.migrate import Options, migrate
from pvmig.coordinator.progress import Reporter
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration import policy
from pvmig.migration.policy import STREAMS
from pvmig.rpc import security
from pvmig.rpc.client import AgentClient
from pvmig.rpc.security import Security, init_ca, issue
from pvmig.tools import ceiling, qemu_peer
from pvmig.tools.cluster import LocalCluster
from pvmig.tools.peer import answered
from pvmig.tools.plot import bench_figures

MODERATE = 2000      # pages/s: 8 MB/s of writes
HEAVY = 60000        # pages/s, uncapped
BUSY_DISK = {"latency_ms": 2.0, "io_rate": 300.0}
PEER_RATE = 200.0    # the net peer's requests per second to a busy guest
PEER_READY_S = 60.0  # for its first answer, before a busy cell's migrations begin
# the storage cells' disk: 256 MiB, full, 300 writes a second (half the requests are
# writes: 600 a second)
STORAGE_DISK = {"blocks": 65536, "fill": 1.0, "latency_ms": 2.0, "io_rate": 600.0}


@dataclass(frozen=True)
class Cell:
    ram_mb: int
    dirty: str = "idle"          # idle, moderate, heavy
    devices: str = "idle"        # idle: none; busy: a disk and a NIC at work, a net peer
    cap_mbps: float = 0.0        # 0: no bandwidth cap
    auto_converge: bool = False
    runs: int = 3
    downtime_limit_ms: float = policy.DOWNTIME_LIMIT_MS
    fill: float = 0.75  # 1.0: every page written (no zero page flatters anyone)
    transport: str = policy.TRANSPORT.value
    tls: bool = False  # the agents under mutual TLS
    mode: str = "precopy"  # precopy, postcopy (--postcopy), hybrid (--postcopy-after-precopy)
    # devices "disk": its storage: shared (both agents reach the image), or copied with
    # --copy-storage in that --storage-mode (background, write-blocking; "with-memory":
    # background, --storage-with-memory)
    storage: str = ""

    @property
    def name(self) -> str:
        cap = f", {self.cap_mbps:g} Mbit/s cap" if self.cap_mbps else ""
        ac = ", auto-converge" if self.auto_converge else ""
        default = self.downtime_limit_ms == policy.DOWNTIME_LIMIT_MS
        limit = (f", limit {self.downtime_limit_ms:g} ms" if not default
                 else "")
        written = ", all written" if self.fill >= 1.0 else ""
        how = self.transport + (" + mutual TLS" if self.tls else "")
        mode = f", {self.mode}" if self.mode != "precopy" else ""
        disk = (f", {STORAGE_DISK['blocks'] >> 8} MiB disk "
                + ("on shared storage" if self.storage == "shared"
                   else f"copied ({self.storage})")) if self.storage else ""
        return (f"{self.ram_mb} MiB{written}, dirty {self.dirty}, devices {self.devices}"
                f"{disk}{cap}{ac}{limit}, {how}{mode}")

    def dirty_rate(self) -> float:
        if self.dirty == "idle":
            return 0.0
        if self.dirty == "moderate":
            return float(MODERATE)
        if self.cap_mbps:
            return 1.5 * self.cap_mbps * 1e6 / 8 / PAGE_SIZE
        return float(HEAVY)


def grid(quick: bool, runs: int) -> list[Cell]:
    if quick:
        return [Cell(256, "idle", runs=runs, fill=1.0),
                Cell(256, "idle", runs=runs, fill=1.0, transport="grpc"),
                Cell(256, "moderate", "busy", runs=runs),
                Cell(256, "idle", runs=runs, fill=1.0, tls=True),
                Cell(256, "heavy", runs=runs, fill=1.0, mode="postcopy")]
    cells = []
    for ram in (256, 1024):
        cells += [Cell(ram, "idle", runs=runs, fill=1.0),
                  Cell(ram, "idle", runs=runs, fill=1.0, transport="grpc"),
                  Cell(ram, "idle", runs=runs, fill=1.0, tls=True),
                  Cell(ram, "idle", runs=runs), Cell(ram, "moderate", runs=runs),
                  Cell(ram, "moderate", "busy", runs=runs),
                  Cell(ram, "moderate", "busy", cap_mbps=1000, runs=runs),
                  Cell(ram, "heavy", cap_mbps=1000, runs=1),
                  Cell(ram, "heavy", cap_mbps=1000, auto_converge=True, runs=runs),
                  # issue 16's: post-copy and hybrid beside auto-converge, same guest
                  Cell(ram, "heavy", cap_mbps=1000, runs=runs, fill=1.0, mode="postcopy"),
                  Cell(ram, "heavy", cap_mbps=1000, runs=runs, fill=1.0, mode="hybrid"),
                  Cell(ram, "heavy", runs=runs, fill=1.0, mode="postcopy")]
    cells += storage_cells(runs)
    # the downtime target's cells: 10 runs, QEMU's default limit and a tight one
    cells[cells.index(Cell(1024, "moderate", "busy", runs=runs))] = \
        Cell(1024, "moderate", "busy", runs=max(runs, 10))
    cells.insert(cells.index(Cell(1024, "moderate", "busy", runs=max(runs, 10))) + 1,
                 Cell(1024, "moderate", "busy", runs=max(runs, 10), downtime_limit_ms=5.0))
    cells.append(Cell(4096, "idle", runs=1, fill=1.0))
    return cells


def storage_cells(runs: int) -> list[Cell]:
    """Issue 17's: the same guest and disk, the disk shared, then copied in each mode."""
    return [Cell(256, "moderate", "disk", runs=runs, storage=s)
            for s in ("shared", "background", "write-blocking", "with-memory")]


class MemorySampler:
    """The agents' own memory (anonymous pages: heap, buffers, numpy arrays), beyond the
    guest RAM and bitmaps they map from shared files, sampled while a cell runs."""

    def __init__(self, pids: list[int], every_s: float = 0.05) -> None:
        self.pids, self.every_s = pids, every_s
        self.peak_kib = {pid: 0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for pid in self.pids:
                self.peak_kib[pid] = max(self.peak_kib[pid], anonymous_kib(pid))

    @property
    def peak_mib(self) -> float:
        return round(max(self.peak_kib.values(), default=0) / 1024, 1)


def anonymous_kib(pid: int) -> int:
    """RssAnon: a counter the kernel keeps. (smaps_rollup's Anonymous walks the page
    tables of every mapping, guest RAM included, under the process's mmap lock: sampled
    20 times a second it cost a 1 GiB round 0 a quarter of its speed.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Result:
    cell: Cell
    reports: list = field(default_factory=list)
    peer: dict | None = None
    errors: list = field(default_factory=list)
    content: Path | None = None  # a copy of the idle guest's RAM, for QEMU's guest
    agent_mib: float | None = None  # the larger agent's peak anonymous memory

    def to_dict(self, ceiling_gib_s: float | None, grpc_gib_s: float | None = None,
                tls_gib_s: float | None = None) -> dict:
        done = [r for r in self.reports if r["status"] == "completed"]
        down = sorted(r["downtime-ms"] for r in done)
        tput = [_round0_gib_s(r) for r in done]
        out = {"cell": self.cell.name, "ram-mb": self.cell.ram_mb, "dirty": self.cell.dirty,
               "fill": self.cell.fill, "transport": self.cell.transport, "tls": self.cell.tls,
               "mode": self.cell.mode,
               "dirty-rate": self.cell.dirty_rate(), "devices": self.cell.devices,
               "cap-mbps": self.cell.cap_mbps or None,
               "auto-converge": self.cell.auto_converge,
               "downtime-limit-ms": self.cell.downtime_limit_ms,
               "migrations": len(self.reports), "completed": len(done),
               "verified": sum(r["verification"]["passed"] for r in done),
               "converged": sum(bool(r["converged"]) for r in done),
               "downtime-ms-median": _med(down), "downtime-ms-p95": _pct(down, 95),
               "total-ms-median": _med([r["total-time-ms"] for r in done]),
               "round0-gib-s-median": _med(tput),
               "vs-ceiling": _ratio(_med(tput), ceiling_gib_s),
               "vs-grpc": _ratio(_med(tput), grpc_gib_s),
               "vs-tls": _ratio(_med(tput), tls_gib_s) if self.cell.tls else None,
               "bytes-per-ram-median": _med([r["transferred-ratio"] for r in done]),
               "rounds-median": _med([len(r["rounds"]) for r in done]),
               "max-throttle-percent": max((r["auto-converge"]["max-throttle-percent"]
                                            for r in done), default=0),
               "agent-anon-mib-peak": self.agent_mib,
               "net-peer": self.peer, "errors": self.errors}
        pcs = [r["postcopy"] for r in done if r.get("postcopy")]
        if pcs:
            link_s = (self.cell.ram_mb << 20) * 8 / (self.cell.cap_mbps * 1e6) \
                if self.cell.cap_mbps else None
            out["postcopy"] = {
                "total-vs-link": _ratio(_med([r["total-time-ms"] for r in done]) / 1e3,
                                        link_s),
                "requested-pages-median": _med([p["requested-pages"] for p in pcs]),
                "pushed-pages-median": _med([p["pushed-pages"] for p in pcs]),
                "resent-pages-median": _med([p["resent-pages"] for p in pcs]),
                "fault-latency-ms-p50-median": _med([p["latency-ms"]["p50"] for p in pcs]),
                "fault-latency-ms-p99-median": _med([p["latency-ms"]["p99"] for p in pcs]),
                "blocktime-ms-median": _med([p["blocktime-ms"] for p in pcs]),
                "guest-checks-failed": sum(r["verification"]["guest-checks"]["failed"]
                                           for r in done)}
        if self.cell.storage:
            out["storage"] = _storage_summary(self.cell, done)
        return out


def _storage_summary(cell: Cell, done: list[dict]) -> dict:
    """What the disk's copy cost (copied cells), and what the guest's writes saw."""
    st = [r["storage"] for r in done if r.get("storage")]
    disk = [d for r in done for d in r["devices"] if d["kind"] == "vbd"]
    lat = [s["write-latency-ms"] for s in st if s["write-latency-ms"]]
    return {
        "mode": cell.storage, "disk-mb": STORAGE_DISK["blocks"] >> 8,
        "disk-bytes-per-size-median": _med([s["bytes-ratio"] for s in st]),
        "disk-bytes-per-size-max": max((s["bytes-ratio"] for s in st), default=None),
        "storage-rounds-median": _med([len(s["storage-rounds"]) for s in st]),
        "ready-ms-median": _med([s["ready-ms"] for s in st if s["ready-ms"] is not None]),
        "final-blocks-median": _med([s["final-blocks"] for s in st
                                     if s["final-blocks"] is not None]),
        "dirty-blocks-s-median": _med([s["dirty-rate"] for s in st if s.get("dirty-rate")]),
        "writes-s-median": _med([s["writes-s"] for s in st if s.get("writes-s")]),
        "write-latency-ms-p50-median": _med([x["p50"] for x in lat]),
        "write-latency-ms-p99-median": _med([x["p99"] for x in lat]),
        "mirrored-writes-median": _med([s["mirrored-writes"] for s in st]),
        "unexplained-blocks": sum(s["verdict"]["unexplained"] or 0 for s in st),
        "writes-acked": sum(d["guest-checks"]["writes-acked"] for d in disk),
        "read-failures": sum(d["guest-checks"]["read-failures"] for d in disk),
        "disk-errors": sum(d["guest-checks"]["errors"] for d in disk)}


def _round0_gib_s(report: dict) -> float:
    if report.get("postcopy") and len(report["rounds"]) == 1:
        # every page after the switch (but the info page, sent with it): the transfer
        # is "round 0"
        return report["ram-bytes"] / (report["postcopy"]["time-ms"] / 1e3) / (1 << 30)
    r0 = report["rounds"][0]
    return report["ram-bytes"] / (r0["duration-ms"] / 1e3) / (1 << 30)


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _med(xs):
    return round(statistics.median(xs), 3) if xs else None


def _pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 3)


# ---- running

def run_bench(*, quick: bool, runs: int, peer_qemu: bool, json_path: Path | None,
              md_path: Path | None, plots: Path | None, command: str,
              ram_sizes: list[int] | None = None, only: list[str] | None = None) -> dict:
    from rich.console import Console
    console = Console(stderr=True)
    cells = grid(quick, runs)
    if ram_sizes:
        cells = [c for c in cells if c.ram_mb in ram_sizes]
    if only:
        cells = [c for c in cells if any(text in c.name for text in only)]
    started = time.monotonic()
    out = {"command": command, "sizes": []}
    for ram in sorted({c.ram_mb for c in cells}):
        with tempfile.TemporaryDirectory(prefix="pvmig-bench-", dir="/dev/shm") as tmp:
            size = _bench_size(ram, [c for c in cells if c.ram_mb == ram], peer_qemu,
                               Path(tmp), console)
        out["sizes"].append(size)
        _write(out, json_path, md_path)
    out["seconds"] = round(time.monotonic() - started, 1)
    _write(out, json_path, md_path)
    if plots:
        out["plots"] = [str(p) for p in bench_figures(out, plots)]
        _write(out, json_path, md_path)
    console.print(markdown(out))
    return out


def _bench_size(ram: int, cells: list[Cell], peer_qemu: bool, tmp: Path, console) -> dict:
    nbytes = ram << 20
    size = {"ram-mb": ram, "qemu": [], "cells": []}
    for transport, key in (("tcp", "ceiling"), ("tls", "tls-ceiling"),
                           ("grpc", "grpc-ceiling")):
        console.print(f"[bold]{ram} MiB[/]: the {transport} ceiling ...")
        best = max((ceiling.measure(nbytes, STREAMS, tmp / "ceiling", transport=transport)
                    for _ in range(2)), key=lambda m: m["gib_per_s"])
        size[key] = {"gib-s": round(best["gib_per_s"], 3), "streams": best["streams"]}
    for tls in (False, True):
        mine = [c for c in cells if c.tls == tls]
        if not mine:
            continue
        with _cluster(tmp, tls) as cluster:
            hosts = [cluster["a"].address, cluster["b"].address]
            for cell in mine:
                console.print(f"  {cell.name} ...")
                keep = (peer_qemu and cell.dirty == "idle" and cell.fill >= 1.0
                        and not size["qemu"] and ram <= 1024)
                with MemorySampler([cluster[n].proc.pid for n in ("a", "b")]) as memory:
                    result = _run_cell(cell, hosts, cluster["a"].mem_dir, tmp,
                                       keep_content=keep)
                result.agent_mib = memory.peak_mib
                size["cells"].append(result.to_dict(size["ceiling"]["gib-s"],
                                                    size["grpc-ceiling"]["gib-s"],
                                                    size["tls-ceiling"]["gib-s"]))
                if keep:
                    size["qemu"] = _qemu(nbytes, result.content, tmp, console)
                    if result.content is not None:
                        result.content.unlink(missing_ok=True)
    return size


class _cluster:
    """A pair of agents; with tls, under mutual TLS from a throwaway CA, this process's
    calls presenting a certificate of its own for as long as it runs."""

    def __init__(self, tmp: Path, tls: bool) -> None:
        self.tls, self.certs = tls, tmp / "certs"
        if tls:
            init_ca(self.certs)
            for name in ("a", "b", "bench"):
                issue(self.certs, name, ["127.0.0.1"])
        self._before = security.default()
        self._sec = self._load("bench") if tls else None
        self.store = tmp / "store"  # each agent's own storage dir: nothing shared
        self.cluster = LocalCluster(tmp / ("cluster-tls" if tls else "cluster"), ["a", "b"],
                                    extra_args=self._flags, security=self._sec)

    def _flags(self, name: str) -> list[str]:
        (self.store / name).mkdir(parents=True, exist_ok=True)
        store = ["--storage-dir", str(self.store / name)]
        if not self.tls:
            return store
        return [*store, "--tls-ca", str(self.certs / "ca.pem"),
                "--tls-cert", str(self.certs / f"{name}.pem"),
                "--tls-key", str(self.certs / f"{name}-key.pem")]

    def _load(self, name: str) -> Security:
        return Security.load(ca=self.certs / "ca.pem", cert=self.certs / f"{name}.pem",
                             key=self.certs / f"{name}-key.pem")

    def __enter__(self) -> LocalCluster:
        if self._sec is not None:
            security.set_default(self._sec)
        return self.cluster.__enter__()

    def __exit__(self, *exc) -> None:
        try:
            self.cluster.__exit__(*exc)
        finally:
            security.set_default(self._before)


def _run_cell(cell: Cell, hosts: list[str], mem_dir: Path, tmp: Path, *,
              keep_content: bool = False) -> Result:
    result = Result(cell)
    name = f"b{abs(hash(cell)) % 10**6}"
    copied = cell.storage in ("background", "write-blocking", "with-memory")
    mode = "background" if cell.storage == "with-memory" else cell.storage
    # a copied disk is named relative to each agent's storage dir (it moves with the
    # guest); any other, by a path both agents reach
    disk = Path(f"{name}.img") if copied else tmp / f"{name}.img"
    try:
        domid, vif = uvloop.run(_create(hosts[0], name, cell, disk))
    except Exception as e:  # a cell that cannot start is reported; the others go on
        result.errors.append(f"create: {e}")
        return result
    peer, stats = None, tmp / f"{name}.peer.json"
    if vif:
        peer = subprocess.Popen([sys.executable, "-m", "pvmig", "peer", "--guest", vif,
                                 "--rate", str(PEER_RATE), "--duration", "3600",
                                 "--stats", str(stats)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # the workload and the devices get going
    if peer is not None and not answered(peer, stats, PEER_READY_S):
        result.errors.append(f"the net peer had no answer from the guest at {vif} within "
                             f"{PEER_READY_S:.0f} s")
        peer.terminate()
        peer.wait(timeout=30)
        uvloop.run(_destroy(hosts[0], name))
        return result
    if keep_content:  # the idle guest's bytes, before they move: QEMU's guest gets them
        result.content = tmp / "qemu-content.ram"
        shutil.copyfile(mem_dir / f"{name}.{domid}.ram", result.content)
    where = 0
    try:
        for _ in range(cell.runs):
            options = Options(max_bandwidth_mbps=cell.cap_mbps, transport=cell.transport,
                              downtime_limit_ms=cell.downtime_limit_ms,
                              auto_converge=cell.auto_converge, verify_timeout_s=60.0,
                              max_rounds=(2 if cell.auto_converge else 1) * policy.MAX_ROUNDS,
                              postcopy=cell.mode == "postcopy",
                              postcopy_after_precopy=cell.mode == "hybrid",
                              copy_storage=copied, storage_mode=mode if copied else None,
                              remove_source_storage=copied,
                              storage_with_memory=cell.storage == "with-memory")
            report = uvloop.run(migrate(hosts[where], hosts[1 - where], name, options,
                                        Reporter())).to_dict()
            result.reports.append(report)
            if report["committed"]:
                where = 1 - where
            if report["status"] != "completed":
                result.errors.append(report["error"])
                break
            time.sleep(0.5)
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=30)
            result.peer = _read_json(stats)
        uvloop.run(_destroy(hosts[where], name))
        for path in ([tmp / "store" / n / disk for n in ("a", "b")] if copied else [disk]):
            path.unlink(missing_ok=True)
    return result


async def _create(address: str, name: str, cell: Cell, disk: Path) -> tuple[int, str]:
    devices = []
    if cell.devices == "disk":
        devices = [pb.DeviceConfig(kind="vbd", devid=0, disk=str(disk), **STORAGE_DISK)]
    if cell.devices == "busy":
        devices = [pb.DeviceConfig(kind="vbd", devid=0, disk=str(disk), blocks=1024,
                                   latency_ms=BUSY_DISK["latency_ms"],
                                   io_rate=BUSY_DISK["io_rate"]),
                   pb.DeviceConfig(kind="vif", devid=0)]
    async with AgentClient(address) as agent:
        info = await agent.call(agent.agent.CreateDomain, pb.CreateDomainRequest(
            name=name, ram_bytes=cell.ram_mb << 20,
            workload=pb.WorkloadConfig(dirty_rate=cell.dirty_rate(), fill=cell.fill,
                                       hot_fraction=1.0 if cell.dirty == "heavy" else 0.1,
                                       hot_share=0.9, seed=1),
            devices=devices), timeout=600.0)
    return info.domid, next((s.address for s in info.device_stats if s.kind == "vif"), "")


async def _destroy(address: str, name: str) -> None:
    async with AgentClient(address) as agent:
        try:
            await agent.call(agent.agent.DestroyDomain, pb.DomainRef(name=name), timeout=60)
        except Exception:  # already gone with a failed migration: nothing to free
            pass


def _qemu(nbytes: int, content: Path | None, tmp: Path, console) -> list[dict]:
    """QEMU both ways: RAM allocated before the migration on both sides (as pvmig's
    agents do: the fair comparison) and QEMU's default (the destination faults its RAM
    in while receiving: how QEMU is usually run and measured)."""
    if qemu_peer.available() is None:
        return [{"error": "qemu-system-x86_64 is not installed"}]
    out = []
    for prealloc in (True, False):
        for channels in (0, 2):
            console.print(f"  QEMU, {'single stream' if not channels else f'{channels} multifd'}"
                          f", prealloc {'on' if prealloc else 'off'}")
            try:
                out.append(qemu_peer.run(nbytes, content, tmp / "qemu",
                                         multifd_channels=channels, prealloc=prealloc))
            except Exception as e:
                out.append({"multifd-channels": channels, "prealloc": prealloc,
                            "error": str(e)})
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- output

def markdown(out: dict) -> str:
    lines = [f"`{out['command']}`", ""]
    for size in out["sizes"]:
        c, g, t = size["ceiling"], size.get("grpc-ceiling"), size.get("tls-ceiling")
        lines += [f"### {size['ram-mb']} MiB guest", "",
                  f"Raw-TCP ceiling, {c['streams']} connections, shared memory to shared "
                  f"memory: **{c['gib-s']} GiB/s**."]
        if t:
            lines.append(f"Bare Python TLS ceiling, {t['streams']} connections, 1 MiB sends: "
                         f"**{t['gib-s']} GiB/s**.")
        if g:
            lines.append(f"Bare gRPC ceiling, {g['streams']} streams on one channel, 1 MiB "
                         f"messages of raw bytes: **{g['gib-s']} GiB/s**.")
        lines.append("")
        for q in size["qemu"]:
            if "error" in q:
                lines.append(f"- QEMU: {q['error']}")
                continue
            streams = ("single stream" if not q["multifd-channels"]
                       else f"{q['multifd-channels']} multifd channels")
            lines.append(
                f"- QEMU {q.get('qemu-version', '')}, {streams}, RAM "
                f"{'preallocated' if q['prealloc'] else 'faulted in while receiving'}: "
                f"{q['throughput-gib-s']:.3f} GiB/s, total {q['total-time-ms']} ms, downtime "
                f"{q['downtime-ms']} ms")
        lines += ["", "| cell | migrations (verified) | round 0 GiB/s | vs TCP | vs TLS | "
                      "vs gRPC | downtime ms median / p95 | total ms | bytes / RAM | rounds | "
                      "converged | throttle % | peer outage ms | agent MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in size["cells"]:
            peer = (r["net-peer"] or {}).get("longest-outage-ms", "-") if r["net-peer"] else "-"
            lines.append(
                f"| {r['cell']} | {r['completed']} ({r['verified']}) | "
                f"{r['round0-gib-s-median']} | {r['vs-ceiling']} | {r.get('vs-tls') or '-'} | "
                f"{r.get('vs-grpc')} | "
                f"{r['downtime-ms-median']} / {r['downtime-ms-p95']} | {r['total-ms-median']} | "
                f"{r['bytes-per-ram-median']} | {r['rounds-median']} | "
                f"{r['converged']} of {r['completed']} | {r['max-throttle-percent']} | {peer} | "
                f"{r['agent-anon-mib-peak']} |")
        sts = [r for r in size["cells"] if r.get("storage")]
        if sts:
            lines += ["", "| storage cell | downtime ms median / p95 | disk bytes / size "
                          "median (max) | storage rounds | final blocks | writes /s | "
                          "blocks dirtied /s | write latency ms p50 / p99 | writes acked | "
                          "read failures | unexplained blocks |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in sts:
                s = r["storage"]
                lines.append(
                    f"| {r['cell']} | {r['downtime-ms-median']} / {r['downtime-ms-p95']} | "
                    f"{_dash(s['disk-bytes-per-size-median'])} "
                    f"({_dash(s['disk-bytes-per-size-max'])}) | "
                    f"{_dash(s['storage-rounds-median'])} | {_dash(s['final-blocks-median'])} | "
                    f"{_dash(s['writes-s-median'])} | {_dash(s['dirty-blocks-s-median'])} | "
                    f"{_dash(s['write-latency-ms-p50-median'])} / "
                    f"{_dash(s['write-latency-ms-p99-median'])} | "
                    f"{s['writes-acked']} | {s['read-failures']} | "
                    f"{s['unexplained-blocks']} |")
        pcs = [r for r in size["cells"] if r.get("postcopy")]
        if pcs:
            lines += ["", "| post-copy cell | total / (RAM / link) | pages pushed / asked | "
                          "fault latency ms p50 / p99 | blocktime ms | guest checks failed |",
                      "|---|---|---|---|---|---|"]
            for r in pcs:
                p = r["postcopy"]
                lines.append(
                    f"| {r['cell']} | {p['total-vs-link'] or '-'} | "
                    f"{p['pushed-pages-median']} / {p['requested-pages-median']} | "
                    f"{p['fault-latency-ms-p50-median']} / {p['fault-latency-ms-p99-median']} | "
                    f"{p['blocktime-ms-median']} | {p['guest-checks-failed']} |")
        lines.append("")
    return "\n".join(lines)


def _dash(x) -> str:
    return "-" if x is None else str(x)


def _write(out: dict, json_path: Path | None, md_path: Path | None) -> None:
    if json_path:
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    if md_path:
        md_path.write_text(markdown(out) + "\n")

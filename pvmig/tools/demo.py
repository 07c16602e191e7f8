"""`pvmig demo`: two agents on loopback, a busy guest with a PV disk and a PV NIC, a net
peer talking to it, one live migration, a summary."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from rich.console import Console

from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.migrate import Options, migrate
from pvmig.coordinator.progress import for_stream
from pvmig.coordinator.summary import print_summary
from pvmig.rpc.client import AgentClient
from pvmig.tools.cluster import LocalCluster
from pvmig.tools.peer import answered

DISK_BLOCKS = 1024


def run_demo(*, ram_mb: int, dirty_rate: float, report_path: Path | None) -> int:
    console = Console(stderr=True)
    console.print("[bold yellow]pvmig demo: plain-text gRPC on 127.0.0.1 — no TLS, no "
                  "authentication. Loopback only; never expose these agents.[/]")
    with tempfile.TemporaryDirectory(prefix="pvmig-demo-") as base, \
            LocalCluster(Path(base), ["host-a", "host-b"]) as cluster:
        a, b = cluster["host-a"].address, cluster["host-b"].address
        disk = Path(base) / "shared" / "demo.img"  # shared storage: both agents reach it
        disk.parent.mkdir()
        console.print(f"agents: host-a at {a}, host-b at {b}")
        console.print(f"booting a {ram_mb} MiB guest on host-a: dirtying {dirty_rate:.0f} "
                      f"pages/s, a 4 MiB PV disk (10 ms a request), a PV NIC")
        vif = uvloop.run(_create(a, ram_mb, dirty_rate, disk))
        stats = Path(base) / "peer.json"
        peer = subprocess.Popen([sys.executable, "-m", "pvmig", "peer", "--guest", vif,
                                 "--rate", "200", "--duration", "4", "--stats", str(stats)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        console.print(f"net peer talking to the guest at {vif}")
        if not answered(peer, stats, 60.0):
            console.print("[yellow]the net peer had no answer from the guest yet; "
                          "migrating anyway[/]")
        reporter = for_stream(sys.stdout)
        try:
            report = uvloop.run(migrate(a, b, "demo", Options(), reporter))
        finally:
            reporter.close()
        peer.wait(timeout=60)
        report.net_peer = _read(stats)
        if report_path:
            report.write(str(report_path))
        print_summary(report, sys.stdout.isatty())
        _devices(console, report)
        return 0 if report.verified else 1


async def _create(address: str, ram_mb: int, dirty_rate: float, disk: Path) -> str:
    async with AgentClient(address) as agent:
        await agent.hello()
        info = await agent.call(agent.agent.CreateDomain, pb.CreateDomainRequest(
            name="demo", ram_bytes=ram_mb << 20,
            workload=pb.WorkloadConfig(dirty_rate=dirty_rate, hot_fraction=0.1, hot_share=0.9,
                                       fill=0.75, seed=7),
            devices=[pb.DeviceConfig(kind="vbd", devid=0, disk=str(disk), blocks=DISK_BLOCKS,
                                     latency_ms=10.0, io_rate=300.0),
                     pb.DeviceConfig(kind="vif", devid=0)]), timeout=600.0)
        time.sleep(0.5)
        info = await agent.call(agent.agent.QueryDomain, pb.DomainRef(name="demo"))
        return next(s.address for s in info.device_stats if s.kind == "vif")


def _read(path: Path) -> dict | None:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _devices(console: Console, report) -> None:
    for d in report.devices:
        g = d["guest-checks"]
        if d["kind"] == "vbd":
            console.print(f"disk: {d['inflight-at-suspend']} requests in flight at suspend, "
                          f"{d['replayed-on-dest']} replayed on host-b; "
                          f"{g['reads-checked']} reads checked, {g['read-failures']} failed")
        else:
            console.print(f"nic: guest answered {g['requests']} requests since the start of "
                          f"the migration, {g['duplicates']} duplicates")
    p = report.net_peer
    if p:
        console.print(f"net peer: {p['sent']} sent, {p['lost']} lost, {p['duplicates']} "
                      f"duplicates, {p['retransmits']} retransmitted, longest outage "
                      f"{p['longest-outage-ms']:.1f} ms, followed the guest to {p['target']}")
    diff = report.differing_by_area
    if diff:
        console.print(f"frames that differ after the move, by who wrote them: {diff} "
                      "(backends and xenstored go on writing after the final pass)")

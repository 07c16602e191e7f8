"""`pvmig demo`: two agents on loopback, a busy guest, one live migration, a summary."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import uvloop
from rich.console import Console

from ._proto import pvmig_pb2 as pb
from .client import AgentClient
from .cluster import LocalCluster
from .coordinator import Options, migrate
from .progress import for_stream
from .summary import print_summary


def run_demo(*, ram_mb: int, dirty_rate: float, report_path: Path | None) -> int:
    console = Console(stderr=True)
    console.print("[bold yellow]pvmig demo: plain-text gRPC on 127.0.0.1 — no TLS, no "
                  "authentication. Loopback only; never expose these agents.[/]")
    with tempfile.TemporaryDirectory(prefix="pvmig-demo-") as base, \
            LocalCluster(Path(base), ["host-a", "host-b"]) as cluster:
        a, b = cluster["host-a"].address, cluster["host-b"].address
        console.print(f"agents: host-a at {a}, host-b at {b}")
        console.print(f"booting a {ram_mb} MiB guest on host-a, dirtying {dirty_rate:.0f} pages/s")
        uvloop.run(_create(a, ram_mb, dirty_rate))
        reporter = for_stream(sys.stdout)
        try:
            report = uvloop.run(migrate(a, b, "demo", Options(), reporter))
        finally:
            reporter.close()
        if report_path:
            report.write(str(report_path))
        print_summary(report, sys.stdout.isatty())
        return 0 if report.verified else 1


async def _create(address: str, ram_mb: int, dirty_rate: float) -> None:
    async with AgentClient(address) as agent:
        await agent.hello()
        await agent.call(agent.agent.CreateDomain, pb.CreateDomainRequest(
            name="demo", ram_bytes=ram_mb << 20,
            workload=pb.WorkloadConfig(dirty_rate=dirty_rate, hot_fraction=0.1, hot_share=0.9,
                                       fill=0.75, seed=7)), timeout=600.0)

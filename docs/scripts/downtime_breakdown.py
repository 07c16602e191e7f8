"""Where the downtime of the bench's 1 GiB busy guest goes (docs/PERFORMANCE.md): N
migrations back and forth at a 5 ms limit, each phase's start from the report.

    python docs/scripts/downtime_breakdown.py [N]
"""
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from pvmig.coordinator.migrate import Options, migrate
from pvmig.coordinator.progress import Reporter
from pvmig.tools import bench
from pvmig.tools.cluster import LocalCluster

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
with tempfile.TemporaryDirectory(prefix="pvmig-down-", dir="/dev/shm") as tmp:
    tmp = Path(tmp)
    with LocalCluster(tmp / "cluster", ["a", "b"]) as cluster:
        hosts = [cluster["a"].address, cluster["b"].address]
        cell = bench.Cell(1024, "moderate", "busy", runs=1, downtime_limit_ms=5.0)
        uvloop.run(bench._create(hosts[0], "vm", cell, tmp / "vm.img"))
        time.sleep(1.0)
        where = 0
        for _ in range(runs):
            report = uvloop.run(migrate(hosts[where], hosts[1 - where], "vm",
                                        Options(downtime_limit_ms=5.0), Reporter())).to_dict()
            where = 1 - where
            ph = report["phases-ms"]
            steps = {"suspend": ph["final"] - ph["suspend"],
                     "final pass": ph["commit"] - ph["final"],
                     "commit": ph["committed"] - ph["commit"],
                     "commit+resume": ph["resumed"] - ph["committed"]}
            print(f"downtime {report['downtime-ms']:.1f} ms; coordinator's view: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                  + f"; final pass {report['rounds'][-1]['pages']} pages")

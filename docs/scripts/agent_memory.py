"""Round 0 throughput and each agent's peak anonymous memory over N migrations of one
bench cell (docs/PERFORMANCE.md): python docs/scripts/agent_memory.py RAM_MIB RUNS [DIRTY]
"""
import sys
import tempfile
from pathlib import Path

from pvmig.tools import bench
from pvmig.tools.cluster import LocalCluster

ram, runs = int(sys.argv[1]), int(sys.argv[2])
dirty = sys.argv[3] if len(sys.argv) > 3 else "idle"
with tempfile.TemporaryDirectory(prefix="pvmig-mem-", dir="/dev/shm") as tmp:
    tmp = Path(tmp)
    with LocalCluster(tmp / "cluster", ["a", "b"]) as cluster:
        hosts = [cluster["a"].address, cluster["b"].address]
        a = bench.MemorySampler([cluster["a"].proc.pid])
        b = bench.MemorySampler([cluster["b"].proc.pid])
        with a, b:
            result = bench._run_cell(bench.Cell(ram, dirty, runs=runs), hosts,
                                     cluster["a"].mem_dir, tmp)
        print("errors", result.errors)
        print("round 0 GiB/s", [round(bench._round0_gib_s(r), 3) for r in result.reports])
        print("peak anonymous MiB: a", a.peak_mib, "b", b.peak_mib)

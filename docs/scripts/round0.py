"""Round 0 of an all-written guest, migrated back and forth N times, with whatever
`pvmig migrate` flags follow (docs/PERFORMANCE.md):

    python docs/scripts/round0.py RAM_MIB RUNS [--streams N --batch-pages P ...]

Prints per migration: round 0's time and GiB/s, the destination's hash catch-up after
it (hash-ms), begin to stop-and-copy, the downtime.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pvmig.tools.cluster import LocalCluster

ram, runs, extra = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
PVMIG = [sys.executable, "-m", "pvmig"]
with tempfile.TemporaryDirectory(prefix="pvmig-r0-") as tmp, \
        LocalCluster(Path(tmp), ["a", "b"]) as cluster:
    hosts = [cluster["a"].address, cluster["b"].address]
    subprocess.run(PVMIG + ["domain", "create", "vm", "--agent", hosts[0], "--ram-mb", str(ram),
                            "--dirty-rate", "0", "--fill", "1.0"], check=True)
    time.sleep(1)
    for i in range(runs):
        report = Path(tmp) / f"r{i}.json"
        subprocess.run(PVMIG + ["migrate", "--source", hosts[i % 2], "--dest", hosts[1 - i % 2],
                                "--domain", "vm", "--report", str(report), *extra],
                       capture_output=True)
        r = json.loads(report.read_text())
        r0, phases = r["rounds"][0], r["phases-ms"]
        print(f"{r['status']}, {r['transport']}: round 0 {r0['duration-ms']:.0f} ms "
              f"({ram / 1024 / (r0['duration-ms'] / 1e3):.2f} GiB/s), hash-ms "
              f"{r0.get('hash-ms')}, begin to stop {phases['stop-and-copy'] - phases['begin']:.0f}"
              f" ms, downtime {r['downtime-ms']:.1f} ms")

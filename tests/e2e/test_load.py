"""End to end, under load: several migrations at once between the same two agents,
while other domains on both hosts keep busy. Every migration completes verified, every
guest checks itself, and the bystanders never notice."""

from __future__ import annotations

import json
import subprocess
import sys

from support import create, domains, wait_running_and_checking

MOVERS = ["m1", "m2", "m3"]


def _migrate_all(source: str, dest: str, tmp_path, tag: str) -> list[dict]:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", source, "--dest", dest,
         "--domain", name, "--report", str(tmp_path / f"{tag}-{name}.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in MOVERS]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), errs
    return [json.loads((tmp_path / f"{tag}-{name}.json").read_text()) for name in MOVERS]


def test_three_at_once_there_and_back_beside_busy_bystanders(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    for name in MOVERS:
        create(a, name, ram_mb=32, dirty_rate=3000)
    # bystanders: a busy disk on each host, never migrated
    for host, addr in (("a", a), ("b", b)):
        create(addr, f"busy-{host}", ram_mb=16, dirty_rate=5000,
               disk=str(tmp_path / f"busy-{host}.img"), disk_blocks=256, disk_io_rate=200)
    before = {h: wait_running_and_checking(addr, f"busy-{h}") for h, addr in
              (("a", a), ("b", b))}

    there = _migrate_all(a, b, tmp_path, "there")
    back = _migrate_all(b, a, tmp_path, "back")
    for report in there + back:
        assert report["status"] == "completed" and report["verification"]["passed"], report
    assert sorted(domains(a)) == sorted(MOVERS + ["busy-a"])
    assert sorted(domains(b)) == ["busy-b"]
    for name in MOVERS:
        info = wait_running_and_checking(a, name)
        assert info.guest.checks_failed == 0
    for h, addr in (("a", a), ("b", b)):
        info = wait_running_and_checking(addr, f"busy-{h}")
        assert info.guest.checks_failed == 0 and info.migration_id == ""
        assert info.guest.steps > before[h].guest.steps
        (vbd,) = [d for d in info.device_stats if d.kind == "vbd"]
        assert vbd.guest.get("read-failures", 0) == 0 and vbd.guest.get("errors", 0) == 0
        assert vbd.served > 0
    print("downtime ms there:", [r["downtime-ms"] for r in there],
          "back:", [r["downtime-ms"] for r in back])

"""End to end: post-copy. The guest resumes at the destination first and its memory
follows; faults go on the urgent lane ahead of the push. Real agents, a real guest
process blocked on userfaultfd, real sockets."""

from __future__ import annotations

import os

import pytest
from support import create, domains, migrate, query, wait_running_and_checking

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="userfaultfd on shared memory needs root here")


@pytest.mark.quick
def test_postcopy_moves_a_busy_guest_whole(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=64, dirty_rate=20000)
    before = wait_running_and_checking(a, "vm")
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--postcopy",
                      "--inject", "push-after-fault")
    assert r.returncode == 0, r.stderr + str(data.get("error"))
    assert "neither host holds the whole guest" in r.stderr  # said before it starts
    assert data["status"] == "completed" and data["verification"]["passed"], data
    assert data["verification"]["memory"] == "identical"
    pc = data["postcopy"]
    frames = 64 << 20 >> 12
    assert pc["total-pages"] == frames  # no pre-copy: every frame after resume
    assert pc["pushed-pages"] + pc["requested-pages"] == frames
    # The resumed guest's first read faults (the push waits for it): asked for, and
    # served on the urgent lane.
    assert pc["requested-pages"] >= 1 and pc["faults"] >= 1
    assert data["injected"] == {"push-after-fault": 1}
    assert data["postcopy-requests"] == pc["requests"] >= pc["requested-pages"]
    assert pc["latency-ms"]["p50"] > 0 and data["postcopy-blocktime"] > 0
    assert pc["dom0-taken-pages"] == 0
    # Each page crossed once: only the headers on top.
    assert data["transferred-bytes"] < 1.02 * (64 << 20)
    assert data["rounds"] and data["rounds"][-1]["final"]
    assert "vm" in domains(b) and "vm" not in domains(a)
    after = wait_running_and_checking(b, "vm")
    assert after.guest.checks_failed == 0
    assert after.guest.pages_written > before.guest.pages_written
    assert query(b, "vm").state == "running"

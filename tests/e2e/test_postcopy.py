"""End to end: post-copy. The guest resumes at the destination first and its memory
follows; faults go on the urgent lane ahead of the push. Real agents, a real guest
process blocked on userfaultfd, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from support import (
    create,
    domains,
    eventually,
    migrate,
    pvmig,
    query,
    wait_running_and_checking,
)

from pvmig.faults import COORDINATOR_DIES_AT, COORDINATOR_STALLS_AT

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
    assert pc["total-pages"] == frames - 1  # no pre-copy: all but the info page after resume
    # each frame once, by the push or on request; a request for a frame a push batch
    # still carried sends it again (counted)
    assert pc["pushed-pages"] + pc["requested-pages"] - pc["resent-pages"] == frames - 1
    # The resumed guest's first read faults (the push waits for it): asked for, and
    # served on the urgent lane.
    assert pc["requested-pages"] >= 1 and pc["faults"] >= 1
    assert data["injected"] == {"push-after-fault": 1}
    assert data["postcopy-requests"] == pc["requests"] >= pc["requested-pages"]
    assert pc["latency-ms"]["p50"] > 0 and data["postcopy-blocktime"] > 0
    assert pc["dom0"] == {"policy": "demand", "waits": 0, "touched-missing": 0, "taken-pages": 0}
    # Each page crossed once: only the headers on top.
    assert data["transferred-bytes"] < 1.02 * (64 << 20)
    assert data["rounds"] and data["rounds"][-1]["final"]
    pace = pc["guest-progress"]  # the guest's steps per second, before and after the move
    assert pace["before-steps-s"] > 0 and pace["after-steps-s"] > 0, pace
    r = pvmig("plot", str(tmp_path / "r.json"), "--output", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "vm" in domains(b) and "vm" not in domains(a)
    after = wait_running_and_checking(b, "vm")
    assert after.guest.checks_failed == 0
    assert after.guest.pages_written > before.guest.pages_written
    assert query(b, "vm").state == "running"


def _check_moved(data: dict, a: str, b: str) -> dict:
    assert data["status"] == "completed" and data["verification"]["passed"], data
    assert data["verification"]["memory"] == "identical"
    pc = data["postcopy"]
    # each frame once, but for those sent twice (asked for while a push batch carried
    # them) and those a broken connection lost (sent again after a recovery)
    assert (pc["pushed-pages"] + pc["requested-pages"] - pc["resent-pages"] - pc["lost-pages"]
            == pc["total-pages"])
    assert "vm" in domains(b) and "vm" not in domains(a)
    assert wait_running_and_checking(b, "vm").guest.checks_failed == 0
    return data["postcopy"]


def test_hybrid_sends_only_what_the_guest_dirtied_after_round_0(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=64, dirty_rate=20000)
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--postcopy-after-precopy",
                      "--inject", "push-after-fault")
    assert r.returncode == 0, r.stderr
    pc = _check_moved(data, a, b)
    assert data["stop-reason"] == "postcopy-after-precopy"
    rounds = data["rounds"]
    assert len(rounds) == 2 and rounds[0]["pages"] == 64 << 20 >> 12 and rounds[1]["final"]
    # Only what round 0's copies missed comes after the switch: the guest's writes.
    assert 0 < pc["total-pages"] < 64 << 20 >> 12
    assert pc["requested-pages"] >= 1


def test_postcopy_on_stall_switches_where_precopy_gives_up(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--postcopy-on-stall",
                      "--downtime-limit", "0.001", "--max-rounds", "3")
    assert r.returncode == 0, r.stderr
    _check_moved(data, a, b)
    assert data["stop-reason"].startswith("postcopy-on-stall")
    assert len(data["rounds"]) == 4  # three rounds, then the switch


STALL = f"{COORDINATOR_STALLS_AT.env}=precopy:8"  # room for the command, every time


def _iterating(a: str, b: str, report, *extra: str) -> subprocess.Popen:
    """A pre-copy that would iterate for ever (a limit no round meets) and whose
    coordinator stalls 8 s as pre-copy begins: the source's session is active, no round
    has run, and none can converge before the test has acted."""
    name, _, value = STALL.partition("=")
    return subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain",
         "vm", "--downtime-limit", "0.001", "--max-rounds", "100000",
         "--no-progress-rounds", "0", "--report", str(report), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, name: value})


def _until_phase(proc: subprocess.Popen, phase: str) -> dict:
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "phase" and event["phase"] == phase:
            return event
    raise AssertionError(f"no {phase} phase: {proc.stderr.read()}")


def test_migrate_postcopy_switches_a_running_precopy(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    proc = _iterating(a, b, tmp_path / "r.json", "--allow-postcopy")
    try:
        _until_phase(proc, "precopy")
        r = pvmig("migrate-postcopy", "--migration", query(a, "vm").migration_id,
                  "--source", a)
        assert r.returncode == 0, r.stderr
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    data = json.loads((tmp_path / "r.json").read_text())
    _check_moved(data, a, b)
    assert data["stop-reason"] == "postcopy-asked"
    assert len(data["rounds"]) == 2  # round 0 said it; then the switch


def test_migrate_postcopy_needs_the_capability(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16, dirty_rate=20000)
    proc = _iterating(a, b, tmp_path / "r.json")
    try:
        _until_phase(proc, "precopy")
        mid = query(a, "vm").migration_id
        r = pvmig("migrate-postcopy", "--migration", mid, "--source", a)
        assert r.returncode != 0 and "--allow-postcopy" in r.stderr, r.stderr
        assert pvmig("cancel", "--migration", mid, "--agent", b, "--agent", a).returncode == 0
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()
    assert "vm" in domains(a) and "vm" not in domains(b)


@pytest.mark.parametrize("dom0", ["demand", "unsafe"])
def test_dom0_reaching_a_frame_before_it_arrives(cluster, tmp_path, dom0):
    """The new hazard: dom0 at the destination reads a guest frame that has not
    arrived. demand waits for it; unsafe reads dom0's own mapping of the hole, which
    gives the guest a zero page: its check of the frame fails, and the verifier names
    the frame and the cause."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=2000, fill=1.0)
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--postcopy", "--postcopy-dom0", dom0,
                      "--inject", "push-after-fault", "--inject", "dom0-touch-missing")
    assert data["injected"]["dom0-touch-missing"] == 1, data  # it was missing when read
    frame = (32 << 20 >> 12) // 2
    pc = data["postcopy"]
    assert pc["dom0"]["policy"] == dom0
    if dom0 == "demand":
        assert r.returncode == 0, r.stderr
        assert data["verification"]["memory"] == "identical"
        assert data["verification"]["passed"]
        assert pc["dom0"]["waits"] == 1 and pc["dom0"]["taken-pages"] == 0
        assert pc["requested-pages"] >= 1
    else:
        assert r.returncode == 1
        assert pc["dom0"]["touched-missing"] == 1 and pc["dom0"]["taken-pages"] == 1
        v = data["verification"]
        assert v["differing-frames"] == [frame]
        assert v["differing-by-cause"] == {"dom0-before-arrival": 1}, v
        assert v["guest-checks"]["failed"] >= 1  # the guest saw it
        assert frame in v["observed-frames"]


def test_postcopy_of_a_guest_with_a_busy_disk(cluster, tmp_path):
    """The source's blkback goes on after the suspend (requests in flight complete into
    the guest's buffers while post-copy sends them): batches go from a snapshot, the
    frontend replays at the destination, and no acknowledged write is lost."""
    from test_devices import _blk, _no_acknowledged_write_lost, _wait_io, create_busy_disk
    a, b = cluster["a"].address, cluster["b"].address
    disk = tmp_path / "shared" / "vm.img"
    create_busy_disk(a, disk)
    _wait_io(a, "vm", 50)
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--postcopy",
                      "--inject", "push-after-fault")
    assert r.returncode == 0, r.stderr
    _check_moved(data, a, b)
    blk = next(d for d in data["devices"] if d["kind"] == "vbd")
    assert blk["replayed-on-dest"] == blk["inflight-at-suspend"], blk
    _wait_io(b, "vm", _blk(query(b, "vm"))["writes_acked"] + 50)  # I/O goes on at b
    g = _blk(query(b, "vm"))
    assert g["read_failures"] == 0 and g["errors"] == 0
    _no_acknowledged_write_lost(cluster["b"], "vm", disk)


def test_the_transfer_outlives_its_coordinator(make_cluster, tmp_path):
    """The coordinator is SIGKILLed as post-copy begins (the guest runs at the
    destination, most of its memory at the source): the source's transfer is the
    session's, not the call's; it goes on to the last page, and when the leases run out
    the agents settle the rest: the guest whole at the destination (its sweep of all
    its memory finds nothing wrong), the source copy gone."""
    cluster = make_cluster(session_timeout_s=3)
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=64, dirty_rate=20000)
    proc = subprocess.run(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain",
         "vm", "--postcopy", "--inject", "push-after-fault", "--report",
         str(tmp_path / "r.json")], capture_output=True, text=True, timeout=240,
        env={**os.environ, COORDINATOR_DIES_AT.env: "postcopy-active"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    eventually(lambda: "vm" not in domains(a), timeout=60, what="the source copy goes")
    moved = wait_running_and_checking(b, "vm", timeout=60)
    assert moved.guest.checks_failed == 0


def test_a_broken_postcopy_pauses_both_sides_until_recover(cluster, tmp_path):
    """Halfway through post-copy its data connections fail (postcopy-breaks-halfway,
    as a network drop does): both sides pause, nothing lost: the source holds the
    frames not placed, the destination keeps its guest's faults (its vCPU blocks on
    the first missing frame), its agent answers. pvmig recover reconnects: the
    destination names what it lacks, what the broken connections lost goes again, and
    the guest is whole, verified."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=64, dirty_rate=20000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain",
         "vm", "--postcopy", "--inject", "postcopy-breaks-halfway", "--report",
         str(tmp_path / "r.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mid = _until_phase(proc, "connect")["migration"]
        paused = _until_phase(proc, "postcopy-paused")
        assert "injected" in paused["reason"] and f"--migration {mid}" in paused["recover"]
        eventually(lambda: query(b, "vm").postcopy == "postcopy-paused", timeout=30,
                   what="the destination pauses")
        held = query(b, "vm")
        assert held.state == "running" and 0 < held.missing_frames < 64 << 20 >> 12
        assert query(a, "vm").migration_id == mid  # the source copy waits, whole
        r = pvmig("recover", "--migration", mid, "--source", a, "--dest", b)
        assert r.returncode == 0, r.stderr
        assert "post-copy was paused and goes on" in r.stdout, r.stdout
        _until_phase(proc, "postcopy-recovered")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    data = json.loads((tmp_path / "r.json").read_text())
    pc = _check_moved(data, a, b)
    assert pc["recoveries"] == 1 and len(pc["pauses"]) == 1, pc
    assert pc["pauses"][0]["for-ms"] > 0 and pc["paused-ms"] > 0
    assert query(b, "vm").postcopy == ""  # whole again
    print(f"paused {pc['paused-ms']:.0f} ms; {pc['lost-pages']} page(s) lost and sent again; "
          f"{pc['pushed-pages']} pushed, {pc['requested-pages']} asked for")

"""The fault table: for each phase of a migration, kill the coordinator, the source
agent or the destination agent (SIGKILL, as a crash), let recovery run (the agents'
leases for a dead coordinator; for a dead agent, its restart and `pvmig recover`), and
check what is left: the guest running on exactly one host, checking itself, its disk's
acknowledged writes intact.

An agent is its host's dom0 and hypervisor shim, and its crash is not the host's: its
guests outlive it and the restarted agent revives them (pvmig.host.parking). A source agent
that crashes before it records the commit finds its guest again and aborts the
migration; one that crashes after finds the migration committed and leaves the guest to
the destination; a destination agent that crashes once it resumed the guest revives it.

`pytest --faults` runs the whole table; the quick subset runs by default. With
PVMIG_FAULT_TABLE=FILE each cell appends its row (JSON) to FILE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from support import create, domains, pvmig, query

from pvmig import faults

PHASES = ["prepare", "begin", "stop-and-copy", "suspend", "final", "commit", "committed",
          "resumed", "verify"]
WHO = ["coordinator", "source-agent", "dest-agent"]
SESSION_TIMEOUT_S = 3


def expected(who: str, phase: str) -> str:
    """Where the guest should run once recovery is done: source or destination."""
    at = PHASES.index(phase)
    if who == "coordinator":
        return "destination" if at >= PHASES.index("committed") else "source"
    if who == "source-agent":
        # The "commit" event comes before the source records its commit: the crash
        # falls on either side of that record.
        if phase == "commit":
            return "source-or-destination"
        return "destination" if at > PHASES.index("commit") else "source"
    # dest-agent: before commit the source aborts; committed there but never resumed,
    # the source rolls back; resumed there, the revived guest goes on there
    return "source" if at < PHASES.index("resumed") else "destination"


QUICK = {("coordinator", "final"), ("coordinator", "committed"),
         ("source-agent", "commit"), ("dest-agent", "committed")}
CELLS = [pytest.param(who, phase, id=f"{who}@{phase}",
                      marks=() if (who, phase) in QUICK else pytest.mark.full_faults)
         for who in WHO for phase in PHASES]


@pytest.fixture
def cluster(make_cluster):
    return make_cluster(session_timeout_s=SESSION_TIMEOUT_S)


@pytest.mark.parametrize("who,phase", CELLS)
def test_fault(cluster, tmp_path, who, phase):
    a, b = cluster["a"], cluster["b"]
    create(a.address, "vm", ram_mb=32, dirty_rate=3000, disk=str(tmp_path / "vm.img"),
           disk_blocks=256, disk_io_rate=100)
    env = dict(os.environ)
    if who == "coordinator":
        env[faults.COORDINATOR_DIES_AT.env] = phase
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a.address, "--dest", b.address,
         "--domain", "vm", "--report", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mid = _until(proc, phase)
    struck = time.monotonic()
    if who != "coordinator":
        (a if who == "source-agent" else b).kill()
    proc.wait(timeout=120)
    proc.stderr.read()

    if who != "coordinator":  # the host comes back; an operator runs recover
        agent = a if who == "source-agent" else b
        agent.start()
        _recover(a.address, b.address, mid)
    where = _settled(a.address, b.address)
    took = time.monotonic() - struck
    _row(who, phase, where, took)

    assert where in expected(who, phase).split("-or-"), (who, phase, where)
    # a source copy held after a crash (for a rollback) goes once the migration settles
    assert not list((a.dir / "data" / "parked").glob("*.held"))
    _healthy(a.address if where == "source" else b.address)


def _until(proc: subprocess.Popen, phase: str) -> str:
    """Read the migration's events up to `phase`; its id."""
    mid = ""
    for line in proc.stdout:
        event = json.loads(line)
        mid = event.get("migration", mid) if event.get("phase") == "connect" else mid
        if event.get("phase") == phase:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return mid
    raise AssertionError(f"the migration ended before {phase}: {proc.stderr.read()}")


def _recover(a: str, b: str, mid: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        r = pvmig("recover", "--migration", mid, "--source", a, "--dest", b)
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, r.stderr
        time.sleep(1.0)  # an agent still busy settling it by itself


def _settled(a: str, b: str, timeout: float = 60.0) -> str:
    """Wait until no migration is left in flight; where the guest runs: "source",
    "destination" or "lost". Two running copies fail at once."""
    deadline = time.monotonic() + timeout
    while True:
        on = {h: domains(addr).get("vm") for h, addr in (("source", a), ("destination", b))}
        running = [h for h, d in on.items() if d is not None and d.state == "running"]
        assert len(running) < 2, f"the guest runs on both hosts: {on}"
        if all(d is None or (d.state == "running" and not d.migration_id)
               for d in on.values()):
            return running[0] if running else "lost"
        assert time.monotonic() < deadline, f"not settled in {timeout:.0f} s: {on}"
        time.sleep(0.25)


def _healthy(address: str) -> None:
    """Its self-checks pass and its disk gave back every acknowledged write it read."""
    first = query(address, "vm")
    deadline = time.monotonic() + 30
    while True:
        info = query(address, "vm")
        if info.guest.checks_run > first.guest.checks_run and info.guest.steps > first.guest.steps:
            break
        assert time.monotonic() < deadline, "the guest does not make progress"
        time.sleep(0.2)
    assert info.guest.checks_failed == 0, list(info.guest.failures)
    (vbd,) = [s for s in info.device_stats if s.kind == "vbd"]
    assert vbd.guest.get("read-failures", 0) == 0 and vbd.guest.get("errors", 0) == 0, vbd


def _row(who: str, phase: str, where: str, took: float, want: str | None = None,
         fault: str = "") -> None:
    path = os.environ.get("PVMIG_FAULT_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault or f"kill {who}", "phase": phase,
                                "outcome": where, "expected": want or expected(who, phase),
                                "recovery-s": round(took, 2)}) + "\n")


# ---- the storage phase (migrate --copy-storage): each agent's own storage dir

STORAGE_PHASES = ["storage", "storage-ready", "final", "committed"]
STORAGE_QUICK = {("coordinator", "storage"), ("dest-agent", "storage")}
STORAGE_CELLS = [pytest.param(who, phase, id=f"storage:{who}@{phase}",
                              marks=() if (who, phase) in STORAGE_QUICK
                              else pytest.mark.full_faults)
                 for who in WHO for phase in STORAGE_PHASES]


@pytest.fixture
def own_storage(make_cluster, tmp_path):
    return make_cluster(session_timeout_s=SESSION_TIMEOUT_S,
                        extra_args=lambda name: ["--storage-dir", str(tmp_path / f"store-{name}")])


@pytest.mark.parametrize("who,phase", STORAGE_CELLS)
def test_storage_fault(own_storage, tmp_path, who, phase):
    """As the table above, the disk copied beside memory: "storage" strikes while the
    first round is held at half the disk (storage-holds-halfway), so there is always a
    partial image at the destination. Where the guest ends up, its image is there; a
    destination that does not keep the guest keeps no image, even when its own agent
    crashed (its next start deletes what it had made)."""
    a, b = own_storage["a"], own_storage["b"]
    create(a.address, "vm", ram_mb=32, dirty_rate=3000, disk="vm.img", disk_blocks=1024,
           disk_fill=0.5, disk_io_rate=100)
    env = dict(os.environ)
    if who == "coordinator":
        env[faults.COORDINATOR_DIES_AT.env] = phase
    inject = ["--inject", "storage-holds-halfway"] if phase == "storage" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a.address, "--dest", b.address,
         "--domain", "vm", "--report", str(tmp_path / "r.json"), "--copy-storage", *inject],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mid = _until(proc, phase)
    struck = time.monotonic()
    if who != "coordinator":
        if phase == "storage":  # the first half at the destination: the round is held
            _until_half(tmp_path / "store-b" / "vm.img", 1024)
        (a if who == "source-agent" else b).kill()
    proc.wait(timeout=120)
    proc.stderr.read()
    if who != "coordinator":
        agent = a if who == "source-agent" else b
        agent.start()
        _recover(a.address, b.address, mid)
    where = _settled(a.address, b.address)
    want = expected(who, "begin" if phase.startswith("storage") else phase)
    _row(who, phase, where, time.monotonic() - struck, want,
         fault=f"kill {who} (--copy-storage)")

    assert where in want.split("-or-"), (who, phase, where)
    images = {h: (tmp_path / f"store-{h}" / "vm.img").exists() for h in ("a", "b")}
    assert images["a"], "the source's image is kept (no --remove-source-storage)"
    assert images["b"] == (where == "destination"), (where, images)
    _healthy(a.address if where == "source" else b.address)


def _until_half(path, blocks: int, timeout: float = 30.0) -> None:
    """Until the last block of the image's first half holds data (the disk is half full:
    blocks 0..blocks/2-1 are written at creation)."""
    deadline = time.monotonic() + timeout
    last = (blocks // 2 - 1) * 4096
    while not (path.exists() and np.fromfile(path, np.uint8, 4096, offset=last).any()):
        assert time.monotonic() < deadline, f"the first half of {path} never arrived"
        time.sleep(0.05)

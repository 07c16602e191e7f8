"""End to end: a guest with a busy PV disk migrates A to B and back. The disk is slow
enough that requests are in flight at every suspend; blkfront replays them on the new
host, every read checks against the last acknowledged write, and at the end no write
the guest saw acknowledged is missing from the disk."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from support import domains, migrate, pvmig, query, wait_running_and_checking

from guest.blkfront import block_pattern
from pvmig.dom0.disk import DiskImage
from pvmig.hv.memory import GuestMemory
from pvmig.pv import guestinfo
from pvmig.pv.devlayout import INFLIGHT, BlkArea
from pvmig.pv.ring import BLKIF_OP_WRITE

BLOCKS = 128


def _blk(info) -> dict:
    (stats,) = [s for s in info.device_stats if s.kind == "vbd"]
    return dict(stats.guest)


def create_busy_disk(address: str, disk) -> None:
    """vm: 32 MiB, a disk at work on shared storage (30 ms a request, 300 a second)."""
    disk.parent.mkdir(exist_ok=True)
    r = pvmig("domain", "create", "vm", "--agent", address, "--ram-mb", "32", "--dirty-rate",
              "2000", "--disk", str(disk), "--disk-blocks", str(BLOCKS), "--disk-latency-ms",
              "30", "--disk-io-rate", "300")
    assert r.returncode == 0, r.stderr


def _wait_io(address: str, name: str, more_than: int) -> None:
    deadline = time.monotonic() + 30
    while _blk(query(address, name)).get("writes_acked", 0) <= more_than:
        assert time.monotonic() < deadline, "the disk workload made no progress"
        time.sleep(0.1)


def _assert_device_report(data: dict) -> dict:
    (dev,) = data["devices"]
    assert dev["kind"] == "vbd" and dev["served-on-source"] > 0
    # The slow disk (30 ms a request at 300 requests/s) guarantees requests in flight.
    assert dev["inflight-at-suspend"] > 0
    assert dev["replayed-on-dest"] == dev["inflight-at-suspend"]
    assert dev["guest-checks"]["read-failures"] == 0 and dev["guest-checks"]["errors"] == 0
    return dev


def _no_acknowledged_write_lost(agent, name: str, disk: Path) -> None:
    """Stop the guest, then compare the disk with the guest's table of acknowledged
    versions (in its RAM): every block must hold its last acknowledged write, except
    a block with a write still in flight (it may hold either version)."""
    info = query(agent.address, name)
    os.kill(info.guest_pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)  # what blkback has in flight lands on the disk
        (ram,) = Path(agent.mem_dir).glob(f"{name}.*.ram")
        mem = GuestMemory.open(ram)
        lay = guestinfo.view(mem)[0]
        area = BlkArea.at(int(lay["dev_first"]), BLOCKS)
        versions = area.version_table(mem).copy()
        shadow = area.shadow_table(mem)
        pending = set(shadow["block"][(shadow["state"] == INFLIGHT)
                                      & (shadow["op"] == BLKIF_OP_WRITE)].tolist())
        image = DiskImage(disk, BLOCKS)
        checked = 0
        for block in range(BLOCKS):
            if block in pending:
                continue
            data = np.frombuffer(image.read(block), dtype=np.uint64)
            want = block_pattern(np.array([block]), versions[block:block + 1])[0]
            assert np.array_equal(data, want), f"block {block} lost acknowledged version " \
                                               f"{versions[block]}"
            checked += 1
        assert checked > BLOCKS // 2 and versions.max() > 1
        mem.close()
        image.close()
    finally:
        os.kill(info.guest_pid, signal.SIGCONT)


def test_busy_disk_migrates_there_and_back(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    disk = tmp_path / "shared" / "vm.img"  # shared storage: both agents reach it
    create_busy_disk(a, disk)
    _wait_io(a, "vm", 50)

    r, there = migrate(a, b, "vm", tmp_path / "there.json")
    assert r.returncode == 0, r.stderr
    assert there["verification"]["passed"] is True
    first = _assert_device_report(there)
    assert "vm" not in domains(a)
    _wait_io(b, "vm", _blk(query(b, "vm"))["writes_acked"] + 50)  # I/O goes on at b

    r, back = migrate(b, a, "vm", tmp_path / "back.json")
    assert r.returncode == 0, r.stderr
    assert back["verification"]["passed"] is True
    second = _assert_device_report(back)
    home = wait_running_and_checking(a, "vm")
    g = _blk(home)
    assert g["resumes"] == 2
    assert g["replayed"] == first["replayed-on-dest"] + second["replayed-on-dest"]
    assert g["read_failures"] == 0 and g["errors"] == 0 and g["reads_checked"] > 100
    assert home.guest.checks_failed == 0
    _no_acknowledged_write_lost(cluster["a"], "vm", disk)


@pytest.mark.parametrize("flags", [["--persistent-grants"], ["--grant-mode", "copy"]])
def test_disk_modes_migrate(cluster, tmp_path, flags):
    a, b = cluster["a"].address, cluster["b"].address
    disk = tmp_path / "vm.img"
    r = pvmig("domain", "create", "vm", "--agent", a, "--ram-mb", "16", "--disk", str(disk),
              "--disk-blocks", str(BLOCKS), "--disk-latency-ms", "20", "--disk-io-rate", "300",
              *flags)
    assert r.returncode == 0, r.stderr
    _wait_io(a, "vm", 30)
    r, data = migrate(a, b, "vm", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert data["verification"]["passed"] is True
    _assert_device_report(data)
    _wait_io(b, "vm", _blk(query(b, "vm"))["writes_acked"] + 30)
    assert _blk(query(b, "vm"))["read_failures"] == 0


def test_bad_disk_settings(cluster, tmp_path):
    a = cluster["a"].address
    for args, expected in [
            (("--disk", str(tmp_path / "d.img"), "--disk-blocks", "0"), "a vbd has 1.."),
            (("--disk", "/nonexistent/dir/d.img"), "cannot open disk image /nonexistent/dir/d.img"),
            (("--disk", str(tmp_path / "d.img"), "--disk-latency-ms", "-1"), "must be >= 0"),
            (("--disk", str(tmp_path / "d.img"), "--disk-fill", "1.5"),
             "--disk-fill is a fraction, 0..1, not 1.5"),
    ]:
        r = pvmig("domain", "create", "x", "--agent", a, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert expected in r.stderr
    assert domains(a) == {}

"""End to end: storage migration (migrate --copy-storage). Each agent has its own
storage dir, no shared storage: a guest with a busy PV disk moves with its disk, there
and back, in both modes; the images agree block by block at resume (a difference only
where blkback wrote after the final pass: the frontend replays that request), and no
write the guest saw acknowledged is missing from the disk it ends on. An abort at any
point leaves the source's image and the guest as they were and deletes the partial
copy; a destination that cannot hold the disk is refused before the copy."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from support import domains, migrate, pvmig, query, tmpfs, wait_running_and_checking

from guest.blkfront import block_pattern
from pvmig.dom0.disk import DiskImage
from pvmig.hv.memory import GuestMemory
from pvmig.pv import guestinfo
from pvmig.pv.devlayout import INFLIGHT, BlkArea
from pvmig.pv.ring import BLKIF_OP_WRITE

BLOCKS = 1024  # 4 MiB
DISK = "vm.img"  # relative: under each agent's own --storage-dir


@pytest.fixture
def hosts(make_cluster, tmp_path):
    """Agents a and b, each with a storage dir of its own (nothing shared)."""
    c = make_cluster(extra_args=lambda name: ["--storage-dir", str(tmp_path / f"store-{name}")])
    for name in ("a", "b"):
        (tmp_path / f"store-{name}").mkdir(exist_ok=True)
    return c


def store(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"store-{name}"


def _blk(info) -> dict:
    (stats,) = [s for s in info.device_stats if s.kind == "vbd"]
    return dict(stats.guest)


def create_busy(address: str, blocks: int = BLOCKS) -> None:
    """vm: 32 MiB, a disk at work (5 ms a request, 300 requests a second)."""
    r = pvmig("domain", "create", "vm", "--agent", address, "--ram-mb", "32", "--dirty-rate",
              "2000", "--disk", DISK, "--disk-blocks", str(blocks), "--disk-fill", "0.5",
              "--disk-latency-ms", "5",
              "--disk-io-rate", "300")
    assert r.returncode == 0, r.stderr


def wait_io(address: str, more_than: int) -> int:
    deadline = time.monotonic() + 30
    while (n := _blk(query(address, "vm")).get("writes_acked", 0)) <= more_than:
        assert time.monotonic() < deadline, "the disk workload made no progress"
        time.sleep(0.1)
    return n


def assert_storage(data: dict, mode: str) -> dict:
    s = data["storage"]
    assert s["mode"] == mode and s["size-bytes"] == BLOCKS * 4096
    assert s["verdict"]["unexplained"] == 0, s["verdict"]
    assert s["storage-rounds"][0]["blocks"] == BLOCKS  # the first round: every block
    assert s["bytes"] > 0 and s["rounds"] >= 1 and s["final-blocks"] is not None
    assert s["write-latency-ms"]["writes"] > 0
    (dev,) = data["devices"]
    assert dev["guest-checks"]["read-failures"] == 0 and dev["guest-checks"]["errors"] == 0
    assert data["verification"]["passed"] is True
    # memory and disk bytes apart: the rounds' bytes are memory's
    assert sum(r["bytes"] for r in data["rounds"]) == data["transferred-bytes"]
    return s


def no_acknowledged_write_lost(agent, disk: Path, blocks: int = BLOCKS) -> None:
    """Stop the guest, then compare its disk with its table of acknowledged versions (in
    its RAM): every block holds its last acknowledged write, but a block with a write
    still in flight (either version)."""
    info = query(agent.address, "vm")
    os.kill(info.guest_pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)  # what blkback has in flight lands on the disk
        (ram,) = Path(agent.mem_dir).glob("vm.*.ram")
        mem = GuestMemory.open(ram)
        lay = guestinfo.view(mem)[0]
        area = BlkArea.at(int(lay["dev_first"]), blocks)
        versions = area.version_table(mem).copy()
        shadow = area.shadow_table(mem)
        pending = np.unique(shadow["block"][(shadow["state"] == INFLIGHT)
                                            & (shadow["op"] == BLKIF_OP_WRITE)])
        image = DiskImage(disk, blocks)
        data = image.view().view(np.uint64).copy()
        want = block_pattern(np.arange(blocks), versions)
        bad = np.flatnonzero((data != want).any(axis=1))
        lost = np.setdiff1d(bad, pending)
        assert not len(lost), f"blocks {lost[:10].tolist()} lost acknowledged writes"
        assert versions.max() > 1
        mem.close()
        image.close()
    finally:
        os.kill(info.guest_pid, signal.SIGCONT)


def test_disk_moves_there_and_back_background(hosts, tmp_path):
    a, b = hosts["a"].address, hosts["b"].address
    create_busy(a)
    wait_io(a, 50)

    r, there = migrate(a, b, "vm", tmp_path / "there.json", "--copy-storage",
                       "--remove-source-storage")
    assert r.returncode == 0, r.stderr + r.stdout
    s = assert_storage(there, "background")
    assert s["source-image"] == "removed" and not (store(tmp_path, "a") / DISK).exists()
    assert (store(tmp_path, "b") / DISK).exists()
    assert "vm" not in domains(a)
    wait_io(b, _blk(query(b, "vm"))["writes_acked"] + 50)  # I/O goes on at b, on b's image

    r, back = migrate(b, a, "vm", tmp_path / "back.json", "--copy-storage")
    assert r.returncode == 0, r.stderr + r.stdout
    s = assert_storage(back, "background")
    assert s["source-image"] == "kept" and (store(tmp_path, "b") / DISK).exists()
    home = wait_running_and_checking(a, "vm")
    g = _blk(home)
    assert g["resumes"] == 2 and g["read_failures"] == 0 and g["errors"] == 0
    assert home.guest.checks_failed == 0
    no_acknowledged_write_lost(hosts["a"], store(tmp_path, "a") / DISK)

    # b kept its image (the default): a third move there is refused, by name, and
    # nothing changes at a
    r, again = migrate(a, b, "vm", tmp_path / "again.json", "--copy-storage")
    assert r.returncode != 0
    assert "already exists" in again["error"] and str(store(tmp_path, "b") / DISK) in again["error"]
    assert domains(a)["vm"].state == "running" and "vm" not in domains(b)
    wait_io(a, _blk(query(a, "vm"))["writes_acked"] + 20)


def test_write_blocking_mirrors_each_write(hosts, tmp_path):
    a, b = hosts["a"].address, hosts["b"].address
    create_busy(a)
    wait_io(a, 50)
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--copy-storage",
                      "--storage-mode", "write-blocking")
    assert r.returncode == 0, r.stderr + r.stdout
    s = assert_storage(data, "write-blocking")
    assert s["mirrored-writes"] > 0 and not s["mirror-broken"]
    assert s["ready"] is True and len(s["storage-rounds"]) == 2
    wait_io(b, _blk(query(b, "vm"))["writes_acked"] + 50)
    no_acknowledged_write_lost(hosts["b"], store(tmp_path, "b") / DISK)

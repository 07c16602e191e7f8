"""blkfront against blkback over the real shim (grant table, event channels, ring), in
one process: I/O checked end to end, a move with requests in flight replayed from the
shadow, and garbage refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guest.blkfront import BlkFront, BlockWorkload
from guest.memapi import VcpuMemory
from pvmig.dom0.blkback import BlkBack
from pvmig.dom0.disk import DiskImage
from pvmig.hv.evtchn import BackendEvents, EventChannels, GuestEvents
from pvmig.hv.grant_table import GrantTable, GuestGrants
from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory
from pvmig.pv.devlayout import INFLIGHT, BlkArea, read_blk_counters

pytestmark = pytest.mark.timeout(60)
DOMID = 7
BLOCKS = 64
N = 256


class Host:
    """One host's view of the domain: its hypervisor files and the backend."""

    def __init__(self, d, mem, log, disk, **blk):
        self.table = GrantTable.create(d / "gnttab", domid=DOMID, memory=mem, dirty=log)
        self.chans = EventChannels.create(d / "evtchn", domid=DOMID)
        self.events = BackendEvents(self.chans)
        self.back = BlkBack(domid=DOMID, devid=0, grants=self.table, events=self.events,
                            disk=disk, **blk)
        self.guest_events = GuestEvents(EventChannels.open(d / "evtchn"),
                                        self.chans.guest_sock)
        self.guest_grants = GuestGrants.open(d / "gnttab", domid=DOMID)


def _front(mem, log, host, area) -> BlkFront:
    return BlkFront(VcpuMemory(mem, log), area, host.guest_grants, host.guest_events, devid=0)


async def _run(front, work, host, seconds, rate=400):
    """The guest's loop, cut down: issue, then poll on events."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        work.issue(max(1, int(rate * 0.01)))
        await asyncio.sleep(0.01)
        host.guest_events.drain()
        front.poll(work.complete)


def _connect(front, host, persistent):
    ring_ref, port = front.setup()
    host.events.start()
    host.back.persistent = persistent
    host.back.connect(ring_ref=ring_ref, port=port)
    front.connected(persistent=persistent)


@pytest.mark.parametrize("grant_mode,persistent", [("map", False), ("copy", False),
                                                   ("map", True)])
def test_io_is_checked_end_to_end(tmp_path, grant_mode, persistent):
    mem = GuestMemory.create(tmp_path / "ram", N)
    log = DirtyLog.create(tmp_path / "dirty", N)
    disk = DiskImage(tmp_path / "disk.img", BLOCKS)
    area = BlkArea.at(8, BLOCKS)

    async def main():
        host = Host(tmp_path, mem, log, disk, grant_mode=grant_mode)
        front = _front(mem, log, host, area)
        front.format()
        _connect(front, host, persistent)
        work = BlockWorkload(front, np.random.default_rng(1), rate=400)
        await _run(front, work, host, 1.0)
        host.back.latency_s = 0
        for _ in range(50):  # let what is in flight finish
            await asyncio.sleep(0.01)
            host.guest_events.drain()
            front.poll(work.complete)
        return host
    host = asyncio.run(main())
    c = read_blk_counters(mem, area)
    assert c["writes_acked"] > 20 and c["reads_checked"] > 20
    assert c["read_failures"] == 0 and c["errors"] == 0
    assert host.back.stats.served == c["writes_acked"] + c["reads_checked"]
    # What the guest acknowledged is on the disk.
    versions = area.version_table(mem)
    from guest.blkfront import block_pattern
    for block in np.flatnonzero(versions):
        data = np.frombuffer(disk.read(int(block)), dtype=np.uint64)
        assert np.array_equal(data, block_pattern(np.array([block]),
                                                  np.array([versions[block]], np.uint32))[0])


def test_requests_in_flight_are_replayed_after_a_move(tmp_path):
    """Suspend with requests in flight on a slow disk, copy the memory to a new host (as
    the final pass does), connect a new backend: the shadow's requests are re-queued
    and every check still passes; the old ring's late responses are never consumed."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    mem = GuestMemory.create(a / "ram", N)
    log = DirtyLog.create(a / "dirty", N)
    disk = DiskImage(tmp_path / "disk.img", BLOCKS)  # shared storage
    area = BlkArea.at(8, BLOCKS)

    async def main():
        src = Host(a, mem, log, disk, latency_s=0.05)
        front = _front(mem, log, src, area)
        front.format()
        _connect(front, src, persistent=False)
        work = BlockWorkload(front, np.random.default_rng(2), rate=800)
        await _run(front, work, src, 0.5, rate=800)
        in_flight = front.suspend()
        assert in_flight > 0
        # The final pass: the destination gets the memory as it is now. The source's
        # backend goes on (nothing quiesces it) and writes into the source's memory.
        mem2 = GuestMemory.create(b / "ram", N)
        mem2.pages[:] = mem.pages
        log2 = DirtyLog.create(b / "dirty", N)
        dst = Host(b, mem2, log2, disk)
        front2 = _front(mem2, log2, dst, area)
        front2.forget_connection()
        _connect(front2, dst, persistent=False)
        work2 = BlockWorkload(front2, np.random.default_rng(3), rate=400)
        await asyncio.sleep(0.2)  # the old backend finishes into the old memory
        await _run(front2, work2, dst, 0.5)
        for _ in range(50):
            await asyncio.sleep(0.01)
            dst.guest_events.drain()
            front2.poll(work2.complete)
        return in_flight, mem2
    in_flight, mem2 = asyncio.run(main())
    c = read_blk_counters(mem2, area)
    assert c["replayed"] == in_flight and c["inflight_at_suspend"] == in_flight
    assert c["read_failures"] == 0 and c["errors"] == 0
    assert not (area.shadow_table(mem2)["state"] == INFLIGHT).all()


def test_garbage_requests_get_error_responses(tmp_path):
    mem = GuestMemory.create(tmp_path / "ram", N)
    log = DirtyLog.create(tmp_path / "dirty", N)
    disk = DiskImage(tmp_path / "disk.img", BLOCKS)
    area = BlkArea.at(8, BLOCKS)
    statuses = []

    async def main():
        host = Host(tmp_path, mem, log, disk)
        front = _front(mem, log, host, area)
        front.format()
        _connect(front, host, persistent=False)
        ring = front.ring
        seg = [{"gref": 1000, "first_sect": 0, "last_sect": 7}]  # a ref never granted
        ring.put_request({"operation": 0, "nr_segments": 1, "handle": 0, "id": 1,
                          "sector_number": 0, "seg": seg})
        seg = [{"gref": 5, "first_sect": 0, "last_sect": 7}]
        ring.put_request({"operation": 0, "nr_segments": 1, "handle": 0, "id": 2,
                          "sector_number": BLOCKS * 8, "seg": seg})  # past the disk's end
        ring.put_request({"operation": 99, "nr_segments": 1, "handle": 0, "id": 3,
                          "sector_number": 0, "seg": seg})  # no such operation
        ring.push_requests()
        host.guest_events.notify(front.port)
        for _ in range(100):
            await asyncio.sleep(0.01)
            while ring.unconsumed_responses():
                statuses.append(ring.get_response())
            if len(statuses) == 3:
                break
        return host
    host = asyncio.run(main())
    assert sorted(int(r["id"]) for r in statuses) == [1, 2, 3]
    assert all(int(r["status"]) < 0 for r in statuses)
    assert host.back.stats.refused == 3 and not host.back.closed

"""blkfront and the block workload: the guest's disk, Linux's xen-blkfront reduced.

One ring page, one segment per request: a whole 4 KiB block read or written through a
buffer page of its own (buffer i for ring slot i). The shadow of every request in
flight lives in guest RAM (pvmig/pv/devlayout.py), so that a fresh guest process on the
destination finds it there and, as blkif_recover does, re-queues each one on a fresh
ring with fresh grants. Responses left in the old ring are never consumed: the ring
page is initialised anew.

The workload: writes carry a pattern of (block, version); a write's version becomes the
block's acknowledged version when the backend says OKAY; a read is checked against the
block's last acknowledged version. One request per block at a time, so the expected
content of a read is never in doubt. A failed check is a guest-observed corruption.
"""

from __future__ import annotations

import numpy as np

from pvmig.hv.evtchn import GuestEvents
from pvmig.hv.grant_table import GuestGrants
from pvmig.pv.content import block_pattern  # noqa: F401 (the guest's name)
from pvmig.pv.devlayout import BLK_MAGIC, BLK_SLOTS, FREE, INFLIGHT, MAX_FAILED, BlkArea
from pvmig.pv.ring import (
    BLKIF,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_OKAY,
    SECTORS_PER_FRAME,
    FrontRing,
    SharedRing,
)

from .memapi import VcpuMemory

DOM0 = 0


class BlkFront:
    def __init__(self, vm: VcpuMemory, area: BlkArea, grants: GuestGrants,
                 events: GuestEvents, *, devid: int) -> None:
        self.vm = vm
        self.area = area
        self.grants = grants
        self.events = events
        self.devid = devid
        mem = vm.mem
        self.counters = area.counters(mem)
        self.shadow = area.shadow_table(mem)
        self.versions = area.version_table(mem)
        self.ring: FrontRing | None = None
        self.port = 0
        self.ring_ref = 0
        self.persistent = False
        self._pool: dict[int, int] = {}  # slot -> persistent gref
        self.frozen = True  # until connected

    def format(self) -> None:
        format_area(self.vm, self.area)

    # ---- xenbus: the handshake's callbacks

    def setup(self) -> tuple[int, int]:
        """A fresh ring, its grant and an event channel: what the frontend publishes."""
        page = self.vm.mem.pages[self.area.ring]
        mark = lambda *_: self.vm.log.mark(self.area.ring)  # noqa: E731
        SharedRing.init(page, on_write=mark)
        self.ring = FrontRing(page, BLKIF, on_write=mark)
        self.ring_ref = self.grants.grant(self.area.ring, domid=DOM0, readonly=False)
        self.port = self.events.alloc_unbound(DOM0)
        return self.ring_ref, self.port

    def connected(self, *, persistent: bool) -> None:
        """The backend is Connected: re-queue what the shadow holds, then go on."""
        self.persistent = persistent
        self._pool = {}
        if persistent:  # one writable grant per buffer, kept for the connection's life
            for slot in range(BLK_SLOTS):
                self._pool[slot] = self.grants.grant(self.area.buffers + slot, domid=DOM0,
                                                     readonly=False)
        replay = np.flatnonzero(self.shadow["state"] == INFLIGHT)
        for slot in replay:
            self._queue(int(slot))
        if len(replay):
            self._count("replayed", len(replay))
        self.frozen = False
        self._push()

    def suspend(self) -> int:
        """Stop issuing; what is in flight stays in the shadow. Returns how much."""
        self.frozen = True
        inflight = int(np.count_nonzero(self.shadow["state"] == INFLIGHT))
        self._count("inflight_at_suspend", inflight)
        return inflight

    def trust_old_ring(self, complete) -> int:
        """Policy recovery=naive: before reconnecting, consume the responses the old
        ring page holds (as it came over with the memory) as if they were good, instead
        of re-queuing those requests from the shadow. What the page says was answered
        may not have reached this copy of memory: that is the hazard. Returns how many."""
        ring = FrontRing(self.vm.mem.pages[self.area.ring], BLKIF,
                         on_write=lambda *_: self.vm.log.mark(self.area.ring))
        try:
            ring.attach()
        except Exception:  # a ring page that holds no frontend state: nothing to trust
            return 0
        self.ring, persistent = ring, self.persistent
        self.persistent = True  # the old grants belong to the old host: revoke nothing
        try:
            trusted = self.poll(complete)
        finally:
            self.persistent = persistent
        self._count("trusted_old_ring", trusted)
        return trusted

    def forget_connection(self) -> None:
        """After a move: the old ring, grants and channel belong to the old host."""
        self.ring = None
        self._pool = {}
        self.frozen = True
        self._count("resumes", 1)

    # ---- I/O

    def free_slot(self) -> int | None:
        if self.frozen or self.ring is None or self.ring.full():
            return None
        free = np.flatnonzero(self.shadow["state"] == FREE)
        return int(free[0]) if len(free) else None

    def busy_blocks(self) -> np.ndarray:
        return self.shadow["block"][self.shadow["state"] == INFLIGHT]

    def submit(self, slot: int, op: int, block: int, version: int) -> None:
        """Record the request in the shadow, then put it on the ring (not yet pushed)."""
        with self.vm.writing(self.area.shadow):
            entry = self.shadow[slot]
            entry["op"], entry["block"], entry["version"] = op, block, version
            entry["issued"] += 1
            entry["state"] = INFLIGHT
            self.counters["writes_issued" if op == BLKIF_OP_WRITE else "reads_issued"] += 1
        self._queue(slot)

    def _queue(self, slot: int) -> None:
        entry = self.shadow[slot]
        op = int(entry["op"])
        buffer = self.area.buffers + slot
        if self.persistent:
            gref = self._pool[slot]
        else:
            gref = self.grants.grant(buffer, domid=DOM0, readonly=(op == BLKIF_OP_WRITE))
        with self.vm.writing(self.area.shadow):
            entry["pad2"] = gref  # the grant this request uses, revoked at completion
            entry["id"] = slot
        seg = [{"gref": gref, "first_sect": 0, "last_sect": SECTORS_PER_FRAME - 1}]
        self.ring.put_request({"operation": op, "nr_segments": 1, "handle": self.devid,
                               "id": slot, "sector_number": int(entry["block"]) * SECTORS_PER_FRAME,
                               "seg": seg})

    def push(self) -> None:
        self._push()

    def _push(self) -> None:
        if self.ring is not None and self.ring.push_requests():
            self.events.notify(self.port)

    def poll(self, complete) -> int:
        """Consume responses: `complete(slot, op, block, version, status)` for each."""
        if self.ring is None:
            return 0
        done = 0
        while True:
            while self.ring.unconsumed_responses():
                rsp = self.ring.get_response()
                slot = int(rsp["id"])
                if not 0 <= slot < BLK_SLOTS or self.shadow[slot]["state"] != INFLIGHT:
                    continue  # a response to nothing we asked: ignore it, as Linux warns
                entry = self.shadow[slot].copy()
                if not self.persistent:
                    self.grants.revoke(int(entry["pad2"]))
                complete(slot, int(entry["op"]), int(entry["block"]), int(entry["version"]),
                         int(rsp["status"]))
                with self.vm.writing(self.area.shadow):
                    self.shadow[slot]["state"] = FREE
                done += 1
            if not self.ring.final_check_for_responses():
                return done

    def _count(self, name: str, n: int) -> None:
        with self.vm.writing(self.area.shadow):
            self.counters[name] += n


def format_area(vm: VcpuMemory, area: BlkArea, filled: int = 0) -> None:
    """First boot: empty shadow, every block at version 0 (zeroed), but the first
    `filled`, at version 1 (the disk was provisioned with content)."""
    mem = vm.mem
    with vm.writing(np.arange(area.shadow, area.buffers)):
        counters = area.counters(mem)
        counters[0] = np.zeros((), counters.dtype)
        counters["first_failure_block"] = -1
        area.shadow_table(mem)[:] = np.zeros((), area.shadow_table(mem).dtype)
        area.version_table(mem)[:] = 0
        area.version_table(mem)[:filled] = 1
        counters["magic"] = BLK_MAGIC


class BlockWorkload:
    """Writes and reads at `rate` requests per second, each checked as described above."""

    def __init__(self, front: BlkFront, rng: np.random.Generator, rate: float) -> None:
        self.front = front
        self.vm = front.vm
        self.rng = rng
        self.rate = rate

    def issue(self, n: int) -> None:
        f = self.front
        for _ in range(n):
            slot = f.free_slot()
            if slot is None:
                break
            busy = f.busy_blocks()
            block = int(self.rng.integers(0, f.area.blocks))
            if block in busy:
                continue
            if self.rng.random() < 0.5:
                version = int(f.versions[block]) + 1
                buffer = f.area.buffers + slot
                self.vm.write_pages(np.array([buffer]),
                                    block_pattern(np.array([block]), np.array([version], np.uint32)))
                f.submit(slot, BLKIF_OP_WRITE, block, version)
            else:
                f.submit(slot, BLKIF_OP_READ, block, int(f.versions[block]))
        f.push()

    def complete(self, slot: int, op: int, block: int, version: int, status: int) -> None:
        f = self.front
        if status != BLKIF_RSP_OKAY:
            f._count("errors", 1)
            return
        if op == BLKIF_OP_WRITE:
            with self.vm.writing(f.area.versions + block * 4 // 4096):
                f.versions[block] = version
            f._count("writes_acked", 1)
            return
        expected = int(f.versions[block])
        found = self.vm.mem.words[f.area.buffers + slot]
        want = block_pattern(np.array([block]), np.array([expected], np.uint32))[0]
        f._count("reads_checked", 1)
        if not np.array_equal(found, want):
            with self.vm.writing(f.area.shadow):
                f.counters["read_failures"] += 1
                if int(f.counters[0]["first_failure_block"]) < 0:
                    f.counters["first_failure_block"] = block
                n = int(f.counters[0]["nr_failed_frames"])
                if n < MAX_FAILED:
                    f.area.failed_frames(self.vm.mem)[n] = f.area.buffers + slot
                f.counters["nr_failed_frames"] = n + 1

"""blkback: the block backend in dom0 (the host agent), Linux's xen-blkback reduced.

One ring page, requests of one segment covering a whole 4 KiB block, served from a
disk image on this host. The guest's data reaches the disk and comes back by grant map
(the default) or by grant copy, with persistent grants when both ends offer them.

What it writes into guest memory, and what log-dirty sees of it (DESIGN.md):
- responses, through its writable mapping of the ring page: untracked until unmap;
- read data, by grant copy (marked at the copy), or through a writable mapping
  (marked at unmap; with persistent grants the mapping stays and nothing is ever
  marked).
It goes on serving after the guest suspends: nothing quiesces it (today's Xen), so its
late writes are the hazard the experiment measures.

A request it cannot serve (garbage in the slot, a sector outside the disk, a grant the
guest never gave) gets an error response and one log line; a ring the frontend has
broken (a producer index too far ahead) closes the device. The agent goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from pvmig import errors
from pvmig.dom0.disk import BLOCK_SIZE, DiskImage
from pvmig.hv.evtchn import BackendEvents, BackendPort
from pvmig.hv.grant_table import GrantMode, GrantTable, Mapping
from pvmig.pv.ring import (
    BLKIF,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTORS_PER_FRAME,
    BackRing,
    RingError,
    validate_blkif_request,
)

log = logging.getLogger(__name__)
DOM0 = 0


@dataclass
class BlkStats:
    served: int = 0
    refused: int = 0
    in_flight: int = 0
    # the latest writes' latency, from taking the request to its response (ns): what a
    # write-blocking storage copy costs the guest
    write_ns: deque = field(default_factory=lambda: deque(maxlen=8192))


@dataclass
class BlkBack:
    domid: int
    devid: int
    grants: GrantTable
    events: BackendEvents
    disk: DiskImage
    grant_mode: GrantMode = GrantMode.MAP
    persistent: bool = False         # keeps its mappings (feature-persistent, unless purged)
    negotiated: bool = False         # feature-persistent, as the frontend connected
    latency_s: float = 0.0
    stats: BlkStats = field(default_factory=BlkStats)
    _ring: BackRing | None = None
    _ring_map: Mapping | None = None
    _port: BackendPort | None = None
    _persistent: dict[int, Mapping] = field(default_factory=dict)
    _kick: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set = field(default_factory=set)
    _server: asyncio.Task | None = None
    closed: str = ""
    connection: tuple[int, int] | None = None  # (ring ref, port): to reconnect after a quiesce
    on_broken: object = None  # called with the reason when the frontend broke the ring
    _inflight: dict = field(default_factory=dict)  # task -> (request, its hurry event)
    holding: bool = False  # injection points: reads stay in flight until answered
    holding_writes: bool = False  # ... and writes too (their data not yet on the disk)
    _held: set = field(default_factory=set)  # the hurry events of the requests held back
    _held_read: asyncio.Event = field(default_factory=asyncio.Event)
    _held_write: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"vbd {self.domid}/{self.devid}"

    # ---- xenbus: connect and disconnect

    def connect(self, *, ring_ref: int, port: int) -> None:
        """Map the frontend's ring and bind its event channel (backend -> Connected)."""
        self.connection = (ring_ref, port)
        self._ring_map = self.grants.map(ring_ref, mapper=DOM0, writable=True)
        self._ring = BackRing(self._ring_map.page, BLKIF, on_write=self._ring_map.written)
        self._port = self.events.bind_interdomain(port)
        self.events.on_event(self._port, lambda _port: self._kick.set())
        self.closed = ""
        self._server = asyncio.create_task(self._serve())

    async def quiesce(self, timeout_s: float = 5.0) -> tuple[int, int, int]:
        """Stop taking requests, let what is in flight finish (or abandon it after
        timeout_s), then drop every mapping so that each writable one marks its frame
        before the final pass. (finished, abandoned, unmapped)."""
        if self._server is not None:
            self._server.cancel()
            await asyncio.gather(self._server, return_exceptions=True)
            self._server = None
        self.release()  # a quiesced backend finishes what it holds: nothing is left to force
        pending = list(self._tasks)
        done, not_done = await asyncio.wait(pending, timeout=timeout_s) if pending else ((), ())
        self.disk.flush()  # what it wrote is on the shared storage before the handover
        unmapped = len(self._persistent) + (1 if self._ring_map else 0)
        await self.disconnect("quiesced")
        return len(done), len(not_done), unmapped

    def hold(self, writes: bool = False) -> None:
        """Injection points: from now on, a read stays in flight (its data unwritten, its
        response unpublished) until an injection point answers it or release() lets it
        go. Reads only, unless `writes`: a read's data is what lands in guest memory
        behind the final pass, and writes going on keep ring slots free for the guest's
        next reads; a held write's data reaches the disk only when it is answered (a
        storage migration's final pass)."""
        self.holding = True
        self.holding_writes = self.holding_writes or writes

    @property
    def held(self) -> int:
        return len(self._held)

    async def wait_held(self, write: bool = False) -> None:
        """Until a read (a write) is held back (one issued before hold() once its
        latency is over)."""
        await (self._held_write if write else self._held_read).wait()

    def release(self) -> None:
        """The held reads finish, as a backend nobody hurries would."""
        self.holding = self.holding_writes = False
        self._held_read.clear()
        self._held_write.clear()
        for hurry in self._held:
            hurry.set()

    async def answer_now(self, keep: frozenset = frozenset()) -> int:
        """Injection point: finish every request in flight at once and publish the
        responses (what a backend does after the guest suspended, by chance), but for
        those whose buffer frame is in `keep`. How many."""
        chosen = [(task, hurry) for task, (req, hurry) in self._inflight.items()
                  if self._frame_of(req) not in keep]
        return await self._answer(chosen)

    def answer_read_into(self) -> tuple[int, Callable[[], Awaitable[int]]] | None:
        """Injection point torn-copy: pick a read in flight; return its buffer frame
        and a callable that finishes it at once (the data written, the response
        published). None when no read is in flight."""
        for task, (req, hurry) in self._inflight.items():
            if int(req["operation"]) == BLKIF_OP_READ and self._frame_of(req) is not None:
                return self._frame_of(req), lambda: self._answer([(task, hurry)])
        return None

    async def _answer(self, chosen) -> int:
        for _task, hurry in chosen:
            hurry.set()
        if chosen:
            await asyncio.wait([t for t, _h in chosen], timeout=5.0)
        return len(chosen)

    def _frame_of(self, req: np.void) -> int | None:
        """The guest frame a request's one segment grants, if the grant is sound."""
        if int(req["nr_segments"]) < 1:
            return None
        ref = int(req["seg"][0]["gref"])
        entries = self.grants.entries
        return int(entries[ref]["frame"]) if 0 <= ref < len(entries) else None

    def check_grant_policy(self, persistent: str) -> None:
        if persistent == "on" and not self.negotiated:
            raise errors.FailedPrecondition(
                f"{self.name}: the frontend did not negotiate persistent grants when it "
                "connected, and cannot be made to now")

    def set_grant_policy(self, *, grant_mode: str = "", persistent: str = "") -> None:
        """A migration's grant policies. grant_mode: how the data is reached from now
        on (map or copy: the backend's own choice). persistent "off": drop the
        persistent mappings (as xen-blkback purges them) and map per request; "on"
        needs the feature negotiated when the frontend connected."""
        self.check_grant_policy(persistent)
        if grant_mode:
            self.grant_mode = GrantMode(grant_mode)
        if persistent == "off" and self.persistent:
            self.persistent = False
            for m in self._persistent.values():
                self.grants.unmap(m.handle)  # each writable unmap marks its frame
            self._persistent.clear()
        elif persistent == "" and self.negotiated:
            self.persistent = True

    @property
    def ring_frame(self) -> int | None:
        return self._ring_map.frame if self._ring_map is not None else None

    def detach(self, reason: str = "disconnected") -> list:
        """Stop serving and drop every mapping (each writable one marks its frame),
        synchronously: a connect that follows finds nothing of this connection left.
        Returns the cancelled tasks, for whoever wants to wait for them."""
        self.closed = reason
        tasks = [t for t in [self._server, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        self._server = None
        self._tasks = set()
        self._inflight.clear()
        self.holding = self.holding_writes = False
        self._held.clear()
        self._held_read.clear()
        self._held_write.clear()
        for m in [*self._persistent.values(), *([self._ring_map] if self._ring_map else [])]:
            self.grants.unmap(m.handle)
        self._persistent.clear()
        self._ring_map = self._ring = None
        self.events.release(self._port)
        self._port = None
        return tasks

    async def disconnect(self, reason: str = "disconnected") -> None:
        await asyncio.gather(*self.detach(reason), return_exceptions=True)

    # ---- serving

    async def _serve(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                while self._take_requests():
                    pass
            except RingError as e:
                log.error("%s: closing the device: %s", self.name, e)
                self.detach(f"broken ring: {e}")
                if self.on_broken is not None:
                    self.on_broken(f"broken ring: {e}")
                return

    def _take_requests(self) -> bool:
        ring = self._ring
        while ring.unconsumed_requests():
            req = ring.get_request()
            hurry = asyncio.Event()
            task = asyncio.create_task(self._handle(req, hurry))
            self._tasks.add(task)
            self._inflight[task] = (req, hurry)
            task.add_done_callback(self._done)
        return ring.final_check_for_requests()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._inflight.pop(task, None)

    async def _handle(self, req: np.void, hurry: asyncio.Event) -> None:
        self.stats.in_flight += 1
        taken = time.monotonic_ns()
        try:
            status = await self._do(req, hurry)
        finally:
            self.stats.in_flight -= 1
        if self.closed or self._ring is None:
            return  # a disconnected backend answers nothing more
        if int(req["operation"]) == BLKIF_OP_WRITE:
            self.stats.write_ns.append(time.monotonic_ns() - taken)
        self._ring.put_response({"id": int(req["id"]), "operation": int(req["operation"]),
                                 "status": status})
        if status == BLKIF_RSP_OKAY:
            self.stats.served += 1
        else:
            self.stats.refused += 1
        if self._ring.push_responses():
            self.events.notify(self._port)

    async def _do(self, req: np.void, hurry: asyncio.Event) -> int:
        problem = validate_blkif_request(req, nr_sectors=self.disk.blocks * SECTORS_PER_FRAME)
        op = int(req["operation"])
        if problem is None and op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            return BLKIF_RSP_EOPNOTSUPP
        seg = req["seg"][0] if problem is None else None
        if problem is None and (int(req["nr_segments"]) != 1 or int(seg["first_sect"]) != 0
                                or int(seg["last_sect"]) != SECTORS_PER_FRAME - 1
                                or int(req["sector_number"]) % SECTORS_PER_FRAME):
            problem = "only whole 4 KiB blocks in one segment are supported"
        if problem is not None:
            log.warning("%s: request %d refused: %s", self.name, int(req["id"]), problem)
            return BLKIF_RSP_ERROR
        if self.latency_s:  # a slow disk, unless told to hurry (an injection point)
            try:
                await asyncio.wait_for(hurry.wait(), self.latency_s)
            except asyncio.TimeoutError:
                pass
        if (self.holding and (op == BLKIF_OP_READ or self.holding_writes)
                and not hurry.is_set()):
            self._held.add(hurry)
            (self._held_read if op == BLKIF_OP_READ else self._held_write).set()
            try:
                await hurry.wait()
            finally:
                self._held.discard(hurry)
        block = int(req["sector_number"]) // SECTORS_PER_FRAME
        try:
            if op == BLKIF_OP_WRITE:
                data = self._read_guest(int(seg["gref"]))
                gen = self.disk.write(block, data)
                if self.disk.mirror is not None:  # write-blocking: both copies first
                    await self.disk.mirror(block, gen, data)
            else:
                self._write_guest(int(seg["gref"]), self.disk.read(block))
        except errors.PvmigError as e:
            log.warning("%s: request %d refused: %s", self.name, int(req["id"]), e)
            return BLKIF_RSP_ERROR
        except OSError as e:  # the disk itself failed: the guest hears an I/O error
            log.error("%s: request %d failed on %s: %s", self.name, int(req["id"]),
                      self.disk.path, e)
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    def _read_guest(self, gref: int) -> bytes:
        if self.grant_mode == GrantMode.COPY:
            return self.grants.copy_from_guest(gref, 0, BLOCK_SIZE, copier=DOM0)
        m = self._mapping(gref, writable=False)
        data = m.page.tobytes()
        self._release(m)
        return data

    def _write_guest(self, gref: int, data: bytes) -> None:
        if self.grant_mode == GrantMode.COPY:
            self.grants.copy_to_guest(gref, 0, data, copier=DOM0)  # marked at the copy
            return
        m = self._mapping(gref, writable=True)
        m.page[:] = np.frombuffer(data, dtype=np.uint8)
        m.written()  # marks only under the backend-log policy
        self._release(m)  # a writable unmap marks the frame; a persistent one never comes

    def _mapping(self, gref: int, *, writable: bool) -> Mapping:
        if self.persistent:
            m = self._persistent.get(gref)
            if m is None:
                # The frontend grants its persistent pool writable, for reads and writes.
                m = self._persistent[gref] = self.grants.map(gref, mapper=DOM0, writable=True)
            return m
        return self.grants.map(gref, mapper=DOM0, writable=writable)

    def _release(self, m: Mapping) -> None:
        if not self.persistent:
            self.grants.unmap(m.handle)

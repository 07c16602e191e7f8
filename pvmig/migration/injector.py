"""Injection points: the races of the final pass, made to happen on demand.

Each point forces one hazard of docs/DESIGN.md every time it is asked for, so that a
test or a cell of `pvmig matrix` sees it, not a lucky run:

    response-before-final  between suspend and the final read of the dirty bitmap, every
                           backend answers what it has in flight and its ring page is
                           logged, while the data stays behind its grant (a persistent
                           grant logs nothing: the destination gets the response, not
                           the data)
    write-after-final      the final pass copies the I/O buffers, then the backends answer
                           what is in flight, then the rings go last: data and responses
                           no read of the bitmap sees (the worst order, as where a guest's
                           ring lies above its buffers in its pseudo-physical map)
    torn-copy              the copy of a read's buffer frame has read its first half when
                           the backend finishes the read into it
    xenstore-after-final   once the final pass has copied its frames, the toolstack
                           touches a node the guest watches: xenstored writes the event
                           into the guest's ring page, a write no pass sends
    corrupt-batch          round 0's second batch leaves with its checksum one off, as a
                           batch damaged on the way: nothing wrote its frames, so the
                           migration aborts before the destination's copy runs (with
                           --copy-storage, the session's second batch, which may be a
                           disk batch: refused at once, the source sends a copy)
    push-after-fault       post-copy's push waits for the destination's first request:
                           the resumed guest's first read of its memory faults, and the
                           urgent lane serves it (left to chance, the push may have
                           brought every page a small guest reads before it resumes)
    push-stops-halfway     post-copy's push stops once half its frames have gone, until
                           its connections break (the urgent lane still serves faults):
                           a network drop always finds post-copy under way, whatever the
                           speed of the link
    postcopy-breaks-halfway  post-copy's first epoch fails there instead, as a broken
                           data connection would: both sides pause until pvmig recover
    push-devices-last      post-copy's push sends the rings and I/O buffers (the frames
                           backends reach) after every other frame: the destination's
                           backends reach them before they arrive, unless the guest
                           faults on them first
    dom0-touch-missing     post-copy, at the destination: just before the guest resumes
                           (no page has arrived yet, with push-after-fault), dom0 reads the
                           frame in the middle of its RAM as a backend's grant map would;
                           policy postcopy-dom0 says what that does
    storage-holds-halfway  (migrate --copy-storage) the first storage round stops once
                           half the disk has gone, until the migration is aborted: an
                           abort, a cancel or a crash always finds the copy under way
    storage-fills-up       (migrate --copy-storage) at the destination, the first disk
                           batch past half the disk fails as a full disk's write would
                           (ENOSPC)
    storage-write-between  (migrate --copy-storage) a write held in flight across the
                           suspend is answered between the final pass's two reads, of
                           memory's log and of the disk's: its response into the ring
                           (logged), its data onto the source's image
    storage-final-first    (migrate --copy-storage) the final pass reads the disk's log
                           first, memory's after it (the order reversed): with
                           storage-write-between, the response goes with memory and the
                           data stays behind

The first three need a block request in flight at the final pass. Left to chance, the
backends have usually answered everything by then (the disk is faster than the time
from suspend to the final read): so, before the suspend, the backends hold reads back
and the injector waits, on an event, until one is held while the guest still issues.

`Injector()` with no points is the default and does nothing at any hook. The save side
(source_host/save.py) calls every hook in its place; `fired` counts, per point asked
for, how many times it made its hazard happen (the report's `injected`).
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from typing import Awaitable, Callable, Iterable

import numpy as np

from pvmig import errors
from pvmig.dom0.domain import Domain
from pvmig.hv.memory import PAGE_SIZE
from pvmig.pv.devlayout import shared_areas

log = logging.getLogger(__name__)
HOLD_WAIT_S = 10.0  # for the guest's first held read; a guest without disk I/O has none


class InjectionPoint(StrEnum):
    RESPONSE_BEFORE_FINAL = "response-before-final"
    WRITE_AFTER_FINAL = "write-after-final"
    TORN_COPY = "torn-copy"
    XENSTORE_AFTER_FINAL = "xenstore-after-final"
    CORRUPT_BATCH = "corrupt-batch"
    PUSH_AFTER_FAULT = "push-after-fault"
    DOM0_TOUCH_MISSING = "dom0-touch-missing"
    PUSH_STOPS_HALFWAY = "push-stops-halfway"
    POSTCOPY_BREAKS_HALFWAY = "postcopy-breaks-halfway"
    PUSH_DEVICES_LAST = "push-devices-last"
    STORAGE_HOLDS_HALFWAY = "storage-holds-halfway"
    STORAGE_FILLS_UP = "storage-fills-up"
    STORAGE_WRITE_BETWEEN = "storage-write-between"
    STORAGE_FINAL_FIRST = "storage-final-first"


P = InjectionPoint
NEEDS_A_READ_IN_FLIGHT = frozenset({P.RESPONSE_BEFORE_FINAL, P.WRITE_AFTER_FINAL, P.TORN_COPY})
NEEDS_A_WRITE_IN_FLIGHT = frozenset({P.STORAGE_WRITE_BETWEEN})
NAMES = [p.value for p in InjectionPoint]


def parse(names: Iterable[str]) -> frozenset[InjectionPoint]:
    """The points named, or InvalidArgument naming the unknown ones."""
    names = list(names)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise errors.InvalidArgument(f"unknown injection point(s) {unknown}: known are "
                                     f"{sorted(NAMES)}")
    return frozenset(InjectionPoint(n) for n in names)


class Injector:
    def __init__(self, points: Iterable[str] = ()) -> None:
        self.points = parse(points)
        self.fired: dict[str, int] = {}
        self._torn: tuple[int, Callable[[], Awaitable[int]]] | None = None
        self._rings: np.ndarray | None = None  # write-after-final: sent after the rest
        self._keep: frozenset = frozenset()  # the torn frame: write-after-final spares it

    def __bool__(self) -> bool:
        return bool(self.points)

    @property
    def corrupt_seq(self) -> int | None:
        """corrupt-batch: the sequence number of the batch to damage (round 0's second)."""
        if P.CORRUPT_BATCH not in self.points:
            return None
        self.fired[P.CORRUPT_BATCH] = 1
        return 1

    @property
    def push_after_fault(self) -> bool:
        """push-after-fault: asked at the switch to post-copy."""
        if P.PUSH_AFTER_FAULT not in self.points:
            return False
        self.fired[P.PUSH_AFTER_FAULT] = 1
        return True

    @property
    def postcopy_halfway(self) -> str:
        """push-stops-halfway ("stop") or postcopy-breaks-halfway ("break"), asked as
        post-copy starts; "" for neither."""
        for point, mode in ((P.POSTCOPY_BREAKS_HALFWAY, "break"),
                            (P.PUSH_STOPS_HALFWAY, "stop")):
            if point in self.points:
                self.fired[point] = 1
                return mode
        return ""

    def devices_last(self, dom: Domain) -> np.ndarray | None:
        """push-devices-last: the frames of the domain's rings and I/O buffers."""
        if P.PUSH_DEVICES_LAST not in self.points:
            return None
        self.fired[P.PUSH_DEVICES_LAST] = 1
        areas = shared_areas(dom.mem)
        return np.concatenate([np.arange(first, first + n, dtype=np.uint32)
                               for _, first, n in areas])

    # ---- the hooks, in the order the save side reaches them

    async def before_suspend(self, dom: Domain) -> None:
        """While the guest still issues: a read held in flight across the suspend, for
        the points that need one at the final pass."""
        needs = self.points & (NEEDS_A_READ_IN_FLIGHT | NEEDS_A_WRITE_IN_FLIGHT)
        if not needs or dom.pv is None or not dom.pv.backends:
            return
        write = bool(self.points & NEEDS_A_WRITE_IN_FLIGHT)
        blks = dom.pv.hold_reads(writes=write)
        waits = [asyncio.ensure_future(blk.wait_held(write)) for blk in blks]
        try:
            await asyncio.wait(waits, timeout=HOLD_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not any(blk.held for blk in blks):
            log.warning("domain %s: no request in flight after %.0f s: injection points %s "
                        "have nothing to force", dom.name, HOLD_WAIT_S, sorted(needs))

    async def before_final_read(self, dom: Domain) -> None:
        if P.RESPONSE_BEFORE_FINAL in self.points and dom.pv is not None:
            self.fired[P.RESPONSE_BEFORE_FINAL] = await dom.pv.answer_in_flight(log_rings=True)

    def shape_final(self, dom: Domain, frames: np.ndarray) -> np.ndarray:
        """The final pass's frames, given what was read of the bitmap: the torn target
        added (as though the guest had touched it last), the rings held back for
        write-after-final (`rings_last`)."""
        if dom.pv is None or not self.points:
            return frames
        if P.TORN_COPY in self.points:
            self.fired[P.TORN_COPY] = 0  # until the copy reaches the frame
            self._torn = dom.pv.read_in_flight()
            if self._torn is not None:
                self._keep = frozenset([self._torn[0]])
                frames = np.union1d(frames, np.array([self._torn[0]], dtype=frames.dtype))
        if P.WRITE_AFTER_FINAL in self.points:
            self._rings = np.array(dom.pv.ring_frames(), dtype=frames.dtype)
            frames = np.setdiff1d(frames, self._rings)
        return frames

    @property
    def storage_final_first(self) -> bool:
        if P.STORAGE_FINAL_FIRST not in self.points:
            return False
        self.fired[P.STORAGE_FINAL_FIRST] = 1
        return True

    async def between_final_reads(self, dom: Domain) -> None:
        """storage-write-between: what the backends hold is answered now, the ring pages
        logged (a read of memory's log after this sends them)."""
        if P.STORAGE_WRITE_BETWEEN in self.points and dom.pv is not None:
            self.fired[P.STORAGE_WRITE_BETWEEN] = await dom.pv.answer_in_flight(log_rings=True)

    def rings_last(self) -> np.ndarray | None:
        """The frames write-after-final sends after the backends answered (once)."""
        rings, self._rings = self._rings, None
        return rings

    @property
    def tearing(self) -> bool:
        return self._torn is not None

    async def tear(self, dom: Domain, frames: np.ndarray) -> tuple[int, np.ndarray] | None:
        """torn-copy, as a batch is packed: if it holds the target, its first half is
        read, then the backend finishes the read into it. (frame, first half) or None."""
        if self._torn is None:
            return None
        frame, finish = self._torn
        if not (frames == frame).any():
            return None
        self._torn = None
        head = dom.mem.pages[frame, :PAGE_SIZE // 2].copy()
        self.fired[P.TORN_COPY] += await finish()
        return frame, head

    async def before_rings(self, dom: Domain) -> None:
        """write-after-final: the buffers are copied; the backends answer now."""
        if P.WRITE_AFTER_FINAL in self.points and dom.pv is not None:
            self.fired[P.WRITE_AFTER_FINAL] = await dom.pv.answer_in_flight(keep=self._keep)

    def after_final_pass(self, dom: Domain) -> None:
        """The final pass's frames are on their way: the reads held back finish, as in
        backends nobody held back; xenstore-after-final writes into the ring page."""
        if dom.pv is None or not self.points:
            return
        dom.pv.release_reads()
        if P.XENSTORE_AFTER_FINAL in self.points:
            self.fired[P.XENSTORE_AFTER_FINAL] = int(dom.pv.touch_watched_node())

    def end_pass(self) -> None:
        """A final pass that failed leaves nothing armed behind."""
        self._torn = None

    def disarm(self, dom: Domain) -> None:
        """The migration ends here (an abort): held reads go on."""
        if dom.pv is not None and self.points & (NEEDS_A_READ_IN_FLIGHT
                                                 | NEEDS_A_WRITE_IN_FLIGHT):
            dom.pv.release_reads()

"""The destination's side of post-copy: which frames have not arrived, the guest's
faults on them, and each page's placement.

At the switch the source names the frames still to come (DISCARD): any copy of them
here is stale and goes (its pages removed from the RAM file, so the guest faults on
them). From resume on, a thread reads the guest's faults and asks the source for each
frame on the urgent lane (a data connection of its own: QEMU's preempt channel), while
the push connections bring the rest. Every page goes in with UFFDIO_COPY, atomically,
from the connection's buffer; never through this agent's mapping, which would give the
guest a zero page (pvmig.hv.userfault).

Latency is measured per faulted frame, from the fault read to the page placed; the
blocktime (QEMU's postcopy-blocktime) is their sum.

A broken data connection pauses the paging (postcopy-paused): faults are still read and
kept, the guest's vCPU stays blocked on the frame it faulted on, dom0 and the agent go
on. A recovery's new urgent lane begins with every frame still missing (MISSING), then
the requests kept, asked again (the lost connection may have carried their answers).
"""

from __future__ import annotations

import logging
import mmap
import threading
import time

import numpy as np

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.memory import PAGE_SIZE, hash_words, mask_runs, runs
from pvmig.hv.userfault import UserFault
from pvmig.migration import wire
from pvmig.migration.policy import PostcopyDom0
from pvmig.migration.state import PAGING_TRANSITIONS, PagingState, advance

log = logging.getLogger(__name__)
FAULT_POLL_S = 0.1  # the fault thread looks for its stop this often
DOM0_WAIT_S = 30.0  # demand: a dom0 access waits this long for its frame


class Paging:
    def __init__(self, session, userfault: UserFault,
                 dom0: PostcopyDom0 = PostcopyDom0.DEMAND) -> None:
        self.session = session
        self.uf = userfault
        self.dom0 = dom0
        self.state = PagingState.ACTIVE
        self.paused_reason = ""
        self.pauses = 0
        self.dom0_waits = 0    # demand: dom0 accesses that waited for their frame
        self.dom0_touched = 0  # unsafe: dom0 accesses to a frame not here
        n = userfault.nr_frames
        self.missing = np.zeros(n, bool)
        self.requested = np.zeros(n, bool)
        self.fault_at = np.zeros(n, np.float64)  # monotonic time of the first fault read
        self.touched = np.zeros(n, bool)  # unsafe: dom0 reached them while they were holes
        self.total = 0
        self.faults = 0
        self.requests = 0
        self.latencies: list[float] = []
        self.taken: list[int] = []  # frames something else put in before they arrived
        self._lock = threading.Lock()  # missing/requested/fault_at, and the lane's sends
        self._arrived = threading.Condition(self._lock)
        self.lane = None  # the urgent lane's connection, once the source opened it
        self._pending: list[np.ndarray] = []  # asked for before the lane was up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _set_state(self, new: PagingState) -> None:
        """The only place the state changes (under the lock)."""
        self.state = advance(self.state, new, PAGING_TRANSITIONS,
                             f"post-copy of migration {self.session.migration_id}")
        self.session.domain.postcopy = new.value if new is not PagingState.COMPLETE else ""

    # ---- the switch

    def discard(self, mem, to_come: np.ndarray) -> None:
        """These frames (a mask) come later: what is here of them is stale. Their pages
        leave the RAM file (the guest has not run here yet), so that the guest faults
        on them."""
        for first, end in zip(*(e.tolist() for e in mask_runs(to_come))):
            mem.mapping.madvise(mmap.MADV_REMOVE, first * PAGE_SIZE, (end - first) * PAGE_SIZE)
        with self._lock:
            self.missing |= to_come
            self.total = int(self.missing.sum())
            self.session.domain.postcopy = self.state.value

    # ---- faults

    def start(self) -> None:
        self._thread = threading.Thread(target=self._fault_loop, daemon=True,
                                        name=f"faults-{self.session.migration_id}")
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _fault_loop(self) -> None:
        while not self._stop.is_set():
            frames = self.uf.faults(FAULT_POLL_S)
            if frames is None:  # the guest is gone
                return
            if len(frames):
                self.request(np.unique(frames), fault=True)

    def request(self, frames: np.ndarray, fault: bool = False) -> None:
        """Ask the source for these frames first (those not here and not asked for)."""
        now = time.monotonic()
        with self._lock:
            if fault:
                new_faults = frames[self.fault_at[frames] == 0]
                self.fault_at[new_faults] = now
                self.faults += len(new_faults)
            ask = frames[self.missing[frames] & ~self.requested[frames]]
            if not len(ask):
                return
            self.requested[ask] = True
            self.requests += len(ask)
            if self.lane is None:
                self._pending.append(ask)
                return
            try:
                wire.send_frames(self.lane, wire.REQUEST, ask)
            except OSError as e:
                self._pause(f"the urgent lane broke ({e})")

    def set_lane(self, conn, recovered: bool = False) -> None:
        """The urgent lane is up. recovered: after a pause, every frame still missing
        first, then the requests kept meanwhile and those whose answers were lost."""
        with self._arrived:
            if recovered:
                wire.send_frames(conn, wire.MISSING, np.flatnonzero(self.missing))
            self.lane = conn
            pending, self._pending = self._pending, []
            for ask in pending:
                ask = ask[self.missing[ask]]
                if len(ask):
                    wire.send_frames(conn, wire.REQUEST, ask)
            if self.state is PagingState.PAUSED:
                self._set_state(PagingState.ACTIVE if self.missing.any()
                                else PagingState.COMPLETE)
                self.paused_reason = ""
                log.warning("migration %s: post-copy recovered: %d frame(s) to come",
                            self.session.migration_id, int(self.missing.sum()))
            self._arrived.notify_all()

    def pause(self, reason: str) -> None:
        """A data connection broke: nothing goes to the source until a recovery."""
        with self._arrived:
            self._pause(reason)

    def _pause(self, reason: str) -> None:
        if self.state is not PagingState.ACTIVE:
            return
        if not self.missing.any():  # nothing more to come: nothing to pause
            self._set_state(PagingState.COMPLETE)
            return
        self._set_state(PagingState.PAUSED)
        self.paused_reason = reason
        self.pauses += 1
        self.lane = None
        # asked for, not here: the lost connection may have carried the answers
        self._pending = [np.flatnonzero(self.requested & self.missing).astype(np.uint32)]
        log.warning("migration %s: post-copy paused (%s): %d frame(s) missing, the guest "
                    "blocks on the first it touches until pvmig recover",
                    self.session.migration_id, reason, int(self.missing.sum()))
        self._arrived.notify_all()

    # ---- dom0 (the grant table's hook: blkback, netback)

    def dom0_access(self, frame: int) -> None:
        """Before dom0 maps or copies a guest frame. demand: a frame not here is asked
        for and waited for (in the calling thread; Xen's backends retry a paged-out
        frame's map). unsafe: counted, and let through to dom0's own mapping."""
        if not self.missing[frame]:
            return
        if self.dom0 is PostcopyDom0.UNSAFE:
            with self._lock:
                self.dom0_touched += 1
                self.touched[frame] = True
            return
        with self._lock:
            self.dom0_waits += 1
        self.wait_for(np.array([frame], np.uint32), DOM0_WAIT_S)

    # ---- arrival (in the connections' threads)

    def place(self, frames: np.ndarray, rows: np.ndarray, zero: np.ndarray) -> None:
        """A batch from the source: each page in atomically, and the hash of each page
        placed (the frame as the source held it) for the verifier. A page already there
        keeps the hash of what placed it."""
        hashes = self.session.hashes
        if len(frames):
            sums = hash_words(rows.view(np.uint64))
            taken: list[int] = []
            starts, lengths = runs(frames)
            i = 0
            for f, n in zip(starts.tolist(), lengths.tolist()):
                taken.extend(self.uf.place(f, np.ascontiguousarray(rows[i:i + n])).tolist())
                i += n
            placed = ~np.isin(frames, taken) if taken else slice(None)
            hashes[frames[placed]] = sums[placed]
            self._arrive(frames, taken)
        if len(zero):
            zero = np.sort(zero)
            taken = self.uf.place_zero(zero).tolist()
            hashes[zero[~np.isin(zero, taken)] if taken else zero] = 0
            self._arrive(zero, taken)

    def _arrive(self, frames: np.ndarray, taken: list[int]) -> None:
        now = time.monotonic()
        with self._arrived:
            was = frames[self.missing[frames]]
            self.missing[frames] = False
            faulted = was[self.fault_at[was] > 0]
            self.latencies.extend((now - self.fault_at[faulted]).tolist())
            if taken:
                # A frame already there: placed by another connection's copy (a page
                # asked for while a push batch carried it comes twice), or made by dom0
                # reaching the hole through its own mapping (policy postcopy-dom0
                # unsafe): then the guest holds that page, not the one that came, and
                # the verifier compares what the guest holds.
                taken_ = np.asarray(taken, np.uint32)
                stray = taken_[self.touched[taken_]]
                self.touched[stray] = False
                self.taken.extend(stray.tolist())
                mem = self.session.domain.mem
                self.session.hashes[stray] = mem.frame_hashes(stray)
            self._arrived.notify_all()

    def wait_for(self, frames: np.ndarray, timeout_s: float) -> None:
        """Block (a thread) until frames are here, asked for first."""
        self.request(frames)
        if not self._until(lambda: not self.missing[frames].any(), timeout_s):
            raise errors.Unavailable(f"frames {frames[self.missing[frames]][:8].tolist()} "
                                     f"did not arrive within {timeout_s:.0f} s")

    def wait_all(self, timeout_s: float) -> None:
        """Block until every frame is here (the source's push has ended), or the
        paging pauses (Unavailable: a recovery sends the rest)."""
        done = self._until(lambda: not self.missing.any()
                           or self.state is PagingState.PAUSED, timeout_s)
        if done and self.state is PagingState.PAUSED:
            raise errors.Unavailable(f"post-copy paused: {self.paused_reason}")
        if not done:
            raise errors.DataLoss(
                f"post-copy: {int(self.missing.sum())} frame(s) did not arrive within "
                f"{timeout_s:.0f} s of the end of the source's push")

    def _until(self, done, timeout_s: float) -> bool:
        # (under the lock: the threads placing change the arrays as they are read)
        with self._arrived:
            return self._arrived.wait_for(done, timeout_s)

    @property
    def complete(self) -> bool:
        return not self.missing.any()

    def finish(self) -> None:
        """Every frame is here: the paging is done with."""
        with self._lock:
            if self.state is not PagingState.COMPLETE and not self.missing.any():
                self._set_state(PagingState.COMPLETE)

    def status(self) -> pb.PostcopyStatus:
        with self._lock:
            lat = np.asarray(self.latencies) * 1e9
            return pb.PostcopyStatus(
                total_pages=self.total, missing_pages=int(self.missing.sum()),
                faults=self.faults, requests=self.requests,
                blocktime_ns=int(lat.sum()) if len(lat) else 0,
                latency_p50_ns=int(np.percentile(lat, 50)) if len(lat) else 0,
                latency_p99_ns=int(np.percentile(lat, 99)) if len(lat) else 0,
                latency_max_ns=int(lat.max()) if len(lat) else 0,
                taken_pages=len(self.taken), dom0_waits=self.dom0_waits,
                dom0_touched=self.dom0_touched, paused=self.state is PagingState.PAUSED)

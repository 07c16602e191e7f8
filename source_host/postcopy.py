"""The source's side of post-copy: every frame still to come, once, by the quickest way.

After the switch the guest runs at the destination and the frames it lacks are only
here. A push sends them in order on the data streams; the destination's requests (the
frames its guest blocked on) come on the urgent lane, connection 0, and go back on it
at once; the push then goes on from near the last request, where the guest is working
(QEMU's postcopy does the same). A frame goes once, whichever way takes it first: both
take it from here under one lock.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb

WINDOW = 8  # batches the push looks ahead for frames not yet sent
HOLD_WAIT_S = 30.0


class Transfer:
    def __init__(self, mem, frames: np.ndarray, batch_pages: int,
                 push_after_fault: bool = False, limit=None) -> None:
        self.mem = mem
        self.todo = np.zeros(mem.nr_frames, bool)
        self.todo[frames] = True
        # ascending and once each, from the mask (in the downtime: a sort of a 1 GiB
        # guest's frames took 8 ms)
        self.frames = np.flatnonzero(self.todo).astype(np.uint32)
        self.batch_pages = batch_pages
        self.sent = np.zeros(mem.nr_frames, bool)
        self.lane_sent = np.zeros(mem.nr_frames, bool)  # sent on the urgent lane
        self.left = len(self.frames)
        self.pushed = self.requested = self.resent = self.bytes = 0
        self.finished = False  # the destination said it has every frame
        self.limit = limit  # the migration's bandwidth cap (RateLimit), if any
        self.started = time.monotonic()
        self.lanes_up = asyncio.Event()  # the data channels are open: the guest may resume
        self._cursor = 0
        self._seq = 0
        self._lock = threading.Lock()
        # (injection point push-after-fault: the push starts with the first request)
        self.push_may_start = threading.Event()
        if not push_after_fault:
            self.push_may_start.set()

    @property
    def all_sent(self) -> bool:
        return self.left == 0

    def next_batch(self) -> np.ndarray | None:
        """The push's next frames not yet sent, from its cursor on (wrapping round once
        a request moved it forward); None when every frame has gone."""
        if not self.push_may_start.wait(HOLD_WAIT_S):
            raise errors.FailedPrecondition(
                f"push-after-fault: no request from the destination in {HOLD_WAIT_S:.0f} s")
        with self._lock:
            while self.left:
                if self._cursor >= len(self.frames):
                    self._cursor = 0
                hi = min(self._cursor + WINDOW * self.batch_pages, len(self.frames))
                window = self.frames[self._cursor:hi]
                unsent = np.flatnonzero(~self.sent[window])[:self.batch_pages]
                if not len(unsent):
                    self._cursor = hi
                    continue
                batch = window[unsent]
                self._cursor += int(unsent[-1]) + 1
                self._take(batch)
                self.pushed += len(batch)
                return batch
            return None

    def take_requested(self, frames: np.ndarray) -> np.ndarray:
        """The frames asked for, to send on the lane at once: those not yet sent (taken:
        the push skips them), and those a push batch has taken but may still be carrying
        (a 4 MiB batch behind others on its connection: the lane's copy overtakes it, and
        the later one finds the page there). The push moves on to just after them."""
        with self._lock:
            frames = np.unique(frames)
            frames = frames[self.todo[frames] & ~self.lane_sent[frames]]
            if len(frames):
                fresh = frames[~self.sent[frames]]
                self._take(fresh)
                self.resent += len(frames) - len(fresh)
                self.lane_sent[frames] = True
                self.requested += len(frames)
                self.push_may_start.set()
                self._cursor = int(np.searchsorted(self.frames, frames[-1], side="right"))
            return frames

    def _take(self, frames: np.ndarray) -> None:
        self.sent[frames] = True
        self.left -= len(frames)

    def seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def progress(self, done: bool = False) -> pb.PostcopyProgress:
        return pb.PostcopyProgress(total_pages=len(self.frames), pushed_pages=self.pushed,
                                   requested_pages=self.requested, resent_pages=self.resent,
                                   bytes=self.bytes, done=done,
                                   duration_ns=int((time.monotonic() - self.started) * 1e9))

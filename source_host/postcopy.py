"""The source's side of post-copy: every frame still to come, once, by the quickest way.

After the switch the guest runs at the destination and the frames it lacks are only
here. A push sends them in order on the data streams; the destination's requests (the
frames its guest blocked on) come on the urgent lane, connection 0, and go back on it
at once; the push then goes on from near the last request, where the guest is working
(QEMU's postcopy does the same). A frame goes once, whichever way takes it first: both
take it from here under one lock.

The transfer outlives its connections. When one breaks (the network between the hosts
dropped) the epoch ends and the transfer pauses, every frame still here; a recovery
opens a new epoch, the destination names what it still lacks (MISSING), and what a
broken connection carried and lost goes again (QEMU's postcopy recovery).
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
PUSH_START_S = 0.2
STOP_HOLD_S = 180.0  # push-stops-halfway: a link drop is noticed within ~20 s (keepalive)


class Transfer:
    def __init__(self, mem, frames: np.ndarray, batch_pages: int,
                 push_after_fault: bool = False, limit=None, halfway: str = "",
                 last: np.ndarray | None = None) -> None:
        self.mem = mem
        if frames.dtype == bool:  # (the switch's mask: no index pass in the downtime)
            self.todo = frames.copy()
        else:
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
        self.epochs = 0  # of data channels: more than one after a recovery
        self.lost = 0  # frames sent before a pause that never arrived: sent again
        self.paused_reason = ""  # why it is paused, while it is
        self.paused_s = 0.0
        self._paused_at: float | None = None
        self._cursor = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._epoch_over = False
        # The push starts with the destination's first request (the resumed guest's
        # first fault), or PUSH_START_S after the lanes are up: until then the CPUs
        # are the destination's commit and resume's (the downtime's). With the
        # injection point push-after-fault it waits for that request however long.
        self._may_push = False
        self._push_after_fault = push_after_fault
        # (injection points, in the first epoch, once half the frames have gone: "stop"
        # push-stops-halfway, the push stops until its connections break; "break"
        # postcopy-breaks-halfway, the epoch fails as if a connection broke)
        self._halfway = halfway
        self._stop_at = len(self.frames) // 2 if halfway else None
        # (injection point push-devices-last: these frames, the rings and I/O buffers,
        # are pushed after every other: dom0 reaches them first unless asked for)
        self._last = None
        if last is not None and len(last):
            self._last = np.zeros(len(self.todo), bool)
            self._last[last] = True
            self._last &= self.todo

    @property
    def all_sent(self) -> bool:
        return self.left == 0

    # ---- epochs

    def begin_epoch(self) -> None:
        with self._lock:
            self.epochs += 1
            self._epoch_over = False

    def end_epoch(self, reason: str) -> None:
        """The epoch's connections broke (or closed): a push held by an injection
        point lets go, and the transfer is paused until the next epoch."""
        with self._changed:
            self._epoch_over = True
            if not self.finished:
                self.paused_reason = reason
                self._paused_at = time.monotonic()
            self._changed.notify_all()

    def recover(self, missing: np.ndarray) -> None:
        """A new epoch after a pause: the destination lacks these frames; those of them
        sent already were lost on a broken connection and go again."""
        with self._lock:
            lacking = np.zeros(len(self.todo), bool)
            lacking[missing] = True
            lacking &= self.todo
            self.lost += int((lacking & self.sent).sum())
            self.sent = self.todo & ~lacking
            self.lane_sent = self.sent.copy()
            self.left = int(lacking.sum())
            if self._paused_at is not None:
                self.paused_s += time.monotonic() - self._paused_at
                self._paused_at = None
            self.paused_reason = ""

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def _hold(self, ready, what: str, timeout_s: float = HOLD_WAIT_S) -> None:
        """Wait (the push's thread) until ready(), or raise once the epoch is over."""
        if not self._changed.wait_for(lambda: ready() or self._epoch_over, timeout_s):
            raise errors.FailedPrecondition(f"{what}: nothing in {timeout_s:.0f} s")
        if self._epoch_over:
            raise errors.Unavailable("post-copy's data connections broke")

    # ---- frames

    def next_batch(self) -> np.ndarray | None:
        """The push's next frames not yet sent, from its cursor on (wrapping round once
        a request moved it forward); None when every frame has gone."""
        with self._changed:
            if self._push_after_fault:
                self._hold(lambda: self._may_push,
                           "push-after-fault: no request from the destination")
            elif not self._may_push:
                self._changed.wait_for(lambda: self._may_push or self._epoch_over,
                                       PUSH_START_S)
                self._may_push = True
            if self._stop_at is not None and self.pushed >= self._stop_at and self.epochs == 1:
                if self._halfway == "break":
                    raise errors.Unavailable("postcopy-breaks-halfway: the data "
                                             "connections broke (injected)")
                self._hold(lambda: False, "push-stops-halfway: the connections held",
                           STOP_HOLD_S)
            while self.left:
                if self._last is not None and self.left == int((self._last & ~self.sent).sum()):
                    self._last = None  # nothing else left: now these
                if self._cursor >= len(self.frames):
                    self._cursor = 0
                hi = min(self._cursor + WINDOW * self.batch_pages, len(self.frames))
                window = self.frames[self._cursor:hi]
                todo = ~self.sent[window]
                if self._last is not None:
                    todo &= ~self._last[window]
                unsent = np.flatnonzero(todo)[:self.batch_pages]
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
                self._may_push = True
                self._changed.notify_all()
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
        with self._lock:
            paused_s = self.paused_s + (time.monotonic() - self._paused_at
                                        if self._paused_at is not None else 0.0)
            return pb.PostcopyProgress(
                total_pages=len(self.frames), pushed_pages=self.pushed,
                requested_pages=self.requested, resent_pages=self.resent, bytes=self.bytes,
                done=done, duration_ns=int((time.monotonic() - self.started) * 1e9),
                paused=self.paused, paused_reason=self.paused_reason,
                recoveries=max(self.epochs - 1, 0), paused_ns=int(paused_s * 1e9),
                lost_pages=self.lost)

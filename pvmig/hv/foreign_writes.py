"""Writes into a guest's memory by others than the guest, against the save side's copies.

A frame can differ between the source's memory at the end and the destination's at
resume only if something wrote it after the save side last copied it. The guest's own
writes are logged and so copied again; the writes of dom0 (backends, xenstored) may not
be. This journal, kept by the source's agent for each domain, holds per frame the clock
of the last such foreign write, how it was made, and the clock of the last copy. From
them each differing frame gets a cause:

    copy-race           the write landed while the save side was copying that frame
    xenstore-ring       xenstored wrote the magic page after its last copy
    post-suspend-write  a backend wrote after the final read of the dirty bitmap, when
                        nothing that marks it can matter any more
    grant-map           a backend wrote through a grant mapping, which marks nothing
                        until the unmap (never, for a persistent grant or a ring)
    unexplained         no foreign write came after the frame's last copy: a lost guest
                        write, i.e. a bug in the migration itself

One clock tick per foreign write (a backend's request, xenstored's message) and one
per batch copied: a few scalar stores per I/O and one numpy store per batch, and only
while a migration of the domain is under way (reset arms it, disarm ends it).
"""

from __future__ import annotations

import itertools

import numpy as np

# how a foreign write was made
MAPPED, TRACKED, XENSTORED, TORN = 1, 2, 3, 4

CAUSES = ("", "grant-map", "post-suspend-write", "xenstore-ring", "copy-race", "unexplained",
          "dom0-before-arrival")
(NONE, GRANT_MAP, POST_SUSPEND, XENSTORE_RING, COPY_RACE, UNEXPLAINED,
 DOM0_BEFORE_ARRIVAL) = range(len(CAUSES))
# DOM0_BEFORE_ARRIVAL: post-copy, the destination's: dom0 reached the frame through its own
# mapping before the frame arrived (policy postcopy-dom0 unsafe); the guest kept the zero
# page that access made, and the page that came could not go in.


class ForeignWrites:
    def __init__(self, nr_frames: int) -> None:
        self.nr_frames = nr_frames
        self.reset()
        self.armed = False

    def reset(self) -> None:
        """A migration begins: what came before it is round 0's to copy."""
        self.armed = True
        # Ticks from next(): atomic under the GIL, so the save side's sending threads and
        # the backends on the event loop never share a tick (a += could lose one).
        self._ticks = itertools.count(1)
        self.final_read = 0  # the clock when the final pass read the bitmap; 0: not yet
        self.written = np.zeros(self.nr_frames, np.uint64)
        self.how = np.zeros(self.nr_frames, np.uint8)
        self.copied = np.zeros(self.nr_frames, np.uint64)

    def disarm(self) -> None:
        """The migration is over (moved or given up): nothing to record until the next."""
        self.armed = False

    def write(self, frame: int, how: int) -> None:
        if not self.armed:
            return
        self.written[frame] = next(self._ticks)
        self.how[frame] = how

    def copy(self, frames: np.ndarray) -> int:
        """The save side copies frames now (call before it reads them); its tick."""
        tick = next(self._ticks)
        self.copied[frames] = tick
        return tick

    def written_since(self, frames: np.ndarray, tick: int) -> np.ndarray:
        """Which of frames a foreign write reached after the copy of that tick."""
        if not self.armed:
            return np.zeros(len(frames), bool)
        return self.written[frames] > tick

    def seal(self) -> None:
        """The final read of the dirty bitmap: whatever is written from now on stays."""
        self.final_read = next(self._ticks)

    def causes(self) -> np.ndarray:
        """One cause code per frame (CAUSES); NONE for a frame nothing foreign wrote
        after its last copy. Only frames that differ are asked about, so a NONE there
        reads as unexplained (see explain)."""
        late = self.written > self.copied
        out = np.zeros(self.nr_frames, np.uint8)
        out[late & (self.how == MAPPED)] = GRANT_MAP
        if self.final_read:
            after = late & (self.written > self.final_read) & (
                (self.how == MAPPED) | (self.how == TRACKED))
            out[after] = POST_SUSPEND
        out[late & (self.how == XENSTORED)] = XENSTORE_RING
        out[late & (self.how == TORN)] = COPY_RACE
        # a tracked write before the final read is logged, so copied again: if it was
        # not, nothing here explains the frame
        return out


def explain(codes) -> list[str]:
    """Names for the cause codes of differing frames."""
    return [CAUSES[c] if c else "unexplained" for c in np.asarray(codes).tolist()]

"""The log-dirty bitmap: the hypervisor's record of frames written since the last read.

Soft-dirty page tables are not available on these hosts, so log-dirty is emulated: a
byte per frame in a shared-memory file. Writers (the guest's memory API, grant copies)
store the data first and mark the frame after; the save side reads and clears, then
copies the frames it found. A byte, not a bit, per frame: marking is a single store
with no read-modify-write, so a mark can never be lost to a concurrent clear of a
neighbouring frame.

Why the order makes read-and-clear safe: `read_and_clear` snapshots the map, then clears
only the frames the snapshot holds, one byte each. A mark that lands between the
snapshot and the clear is lost only if its frame was already marked, and then its write
happened before the clear, hence before the copy that follows. Every other mark
survives into the next read.
"""

from __future__ import annotations

import os

import numpy as np

from pvmig.hv.shm import SharedFile


class DirtyLog:
    def __init__(self, shared: SharedFile) -> None:
        self._shared = shared
        self.path = shared.path
        self.map = shared.bytes
        self.nr_frames = shared.size

    @classmethod
    def create(cls, path: str | os.PathLike, nr_frames: int) -> "DirtyLog":
        return cls(SharedFile.create(path, nr_frames))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "DirtyLog":
        return cls(SharedFile.open(path))

    def mark(self, frames: np.ndarray | int) -> None:
        """Record frames as written. Call after the data is in place, never before."""
        self.map[frames] = 1

    def count(self) -> int:
        """Frames marked now, without clearing (Xen's PEEK)."""
        return int(np.count_nonzero(self.map))

    def read_and_clear(self) -> np.ndarray:
        """Frames marked since the last call, ascending (Xen's CLEAN)."""
        return take(self.map)

    def close(self) -> None:
        self.map = None  # type: ignore[assignment]
        self._shared.close()

    def unlink(self) -> None:
        self._shared.unlink()


def take(marks: np.ndarray) -> np.ndarray:
    """Read and clear a byte-per-frame map that other threads or processes go on marking:
    the marked frames, ascending, as u32."""
    # Snapshot first: counting and collecting over a map that changes underneath fails.
    frames = np.flatnonzero(marks.copy()).astype(np.uint32)
    # Per-element stores only: a bulk clear (memset) would wipe marks made after the
    # snapshot on frames the snapshot did not hold.
    marks[frames] = 0
    return frames

"""The vCPU's memory API: every guest write goes through here.

The data is stored first and the frame marked dirty after. With the save side's
read-and-clear-then-copy, that order guarantees a write is either in the copy of the
current round or marked for the next one (see pvmig/hv/logdirty.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory


class VcpuMemory:
    def __init__(self, mem: GuestMemory, log: DirtyLog) -> None:
        self.mem = mem
        self.log = log

    @property
    def words(self) -> np.ndarray:
        return self.mem.words

    def write_pages(self, frames: np.ndarray, words: np.ndarray) -> None:
        """Store whole pages (rows of 512 u64) into `frames` (no repeats)."""
        self.mem.words[frames] = words
        self.log.mark(frames)

    @contextmanager
    def writing(self, frames: np.ndarray | int) -> Iterator[None]:
        """Mark `frames` dirty once the block's stores are done (even a block that
        failed part-way may have stored something)."""
        try:
            yield
        finally:
            self.log.mark(frames)

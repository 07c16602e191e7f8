"""A disk image: the storage blkback serves, a file of 4 KiB blocks on its host.

For shared storage both agents open the same path (the same file over loopback, or a
volume both hosts mount); the image never moves with the memory. A disk only one host
has is copied beside the memory (migrate --copy-storage): while that runs, the image
keeps a BlockLog of what blkback writes, as the hypervisor keeps log-dirty for memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pvmig import errors
from pvmig.hv import logdirty
from pvmig.hv.memory import frame_hashes, runs

BLOCK_SIZE = 4096


class BlockLog:
    """The dirty-block log of a disk being copied (QEMU's dirty bitmap of a mirror job).

    Every write marks its block after the data is in the image, as log-dirty marks a
    frame after the write; a round takes (reads and clears) the marks before it reads
    the blocks, so that a write after the take is in the copy or marked for the next
    round. Each block also has a generation, counted after each write: a copy sent
    with the generation read before its data was read is never older than that, and
    the destination keeps the newest (a write-blocking mirror's copy and a round's may
    cross on different connections)."""

    def __init__(self, blocks: int) -> None:
        self.dirty = np.zeros(blocks, np.uint8)
        self.gens = np.zeros(blocks, np.uint32)
        self.late: np.ndarray | None = None  # written since the final read (seal)
        self.writes = 0

    def mark(self, block: int) -> int:
        """After a write of `block`: its new generation."""
        self.gens[block] += 1
        self.dirty[block] = 1
        if self.late is not None:
            self.late[block] = 1
        self.writes += 1
        return int(self.gens[block])

    def take(self) -> np.ndarray:
        """The blocks written since the last take, ascending (u32); their marks cleared."""
        return logdirty.take(self.dirty)

    def count(self) -> int:
        return int(np.count_nonzero(self.dirty))

    def held(self, block: int, gen: int) -> None:
        """The destination holds generation `gen` of `block` (a write-blocking mirror's
        acknowledgement): unless written again since, it need not go again."""
        if self.gens[block] == gen:
            self.dirty[block] = 0

    def seal(self) -> None:
        """The final read of the log is next: what is written from now on reaches only
        this image (the frontend replays it at the destination), and is remembered."""
        self.late = np.zeros(len(self.dirty), np.uint8)


class DiskImage:
    def __init__(self, path: str | os.PathLike, blocks: int, *, fresh: bool = False) -> None:
        """Open (creating it if missing) an image of `blocks` blocks; `fresh` empties it
        first (a new domain's disk: its workload expects zeros)."""
        if blocks <= 0:
            raise errors.InvalidArgument(f"a disk needs at least one block, not {blocks}")
        self.path = Path(path)
        self.blocks = blocks
        self.log: BlockLog | None = None
        # write-blocking (storage migration): awaited after each write, before the
        # response: (block, generation, data) -> once the destination holds it
        self.mirror = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot open disk image {self.path}: {e.strerror}") from None
        if fresh:
            os.ftruncate(self._fd, 0)
        size = os.fstat(self._fd).st_size
        if size < blocks * BLOCK_SIZE:
            os.ftruncate(self._fd, blocks * BLOCK_SIZE)  # new blocks read as zeros

    @property
    def size(self) -> int:
        return self.blocks * BLOCK_SIZE

    def read(self, block: int) -> bytes:
        self._check(block)
        data = os.pread(self._fd, BLOCK_SIZE, block * BLOCK_SIZE)
        return data.ljust(BLOCK_SIZE, b"\0")

    def write(self, block: int, data: bytes | memoryview) -> int:
        """Write one block; its generation in the log (0 when none is kept)."""
        self._check(block)
        if len(data) != BLOCK_SIZE:
            raise errors.InvalidArgument(f"a block write takes {BLOCK_SIZE} bytes, not {len(data)}")
        os.pwrite(self._fd, data, block * BLOCK_SIZE)
        return self.log.mark(block) if self.log is not None else 0

    def write_rows(self, blocks: np.ndarray, rows: np.ndarray) -> None:
        """Blocks (ascending u32) from rows of (n, 4096) u8: one pwritev per run. A
        storage migration's destination; the log is not marked (nothing is kept here)."""
        if not len(blocks):
            return
        if int(blocks.max()) >= self.blocks:
            raise errors.InvalidArgument(f"block {int(blocks.max())} is outside disk "
                                         f"{self.path.name} ({self.blocks} blocks)")
        firsts, lengths = runs(blocks)
        lo = 0
        for first, count in zip(firsts.tolist(), lengths.tolist()):
            view, offset = memoryview(rows[lo:lo + count]).cast("B"), first * BLOCK_SIZE
            lo += count
            while view:  # (a short write on a full disk raises at the next call)
                n = os.pwritev(self._fd, [view], offset)
                view, offset = view[n:], offset + n

    def view(self) -> np.ndarray:
        """The image as (blocks, 4096) u8, read-only, mapped (the page cache the
        writes go through: a copy of a block reads what blkback wrote last)."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.blocks, BLOCK_SIZE))

    def block_hashes(self, blocks: np.ndarray | None = None) -> np.ndarray:
        """A 64-bit hash per block (all, or the given ones), as memory's frame hashes."""
        return frame_hashes(self.view().view(np.uint64), blocks)

    def preallocate(self) -> None:
        """Reserve every block's space now: a disk that does not fit fails here, not
        halfway through a copy."""
        try:
            os.posix_fallocate(self._fd, 0, self.size)
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: the filesystem cannot say
                raise

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check(self, block: int) -> None:
        if not 0 <= block < self.blocks:
            raise errors.InvalidArgument(
                f"block {block} is outside disk {self.path.name} ({self.blocks} blocks)")

"""A disk image: the storage blkback serves, a file of 4 KiB blocks on its host.

For shared storage both agents open the same path (the same file over loopback, or a
volume both hosts mount); the image never moves with the memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pvmig import errors

BLOCK_SIZE = 4096


class DiskImage:
    def __init__(self, path: str | os.PathLike, blocks: int, *, fresh: bool = False) -> None:
        """Open (creating it if missing) an image of `blocks` blocks; `fresh` empties it
        first (a new domain's disk: its workload expects zeros)."""
        if blocks <= 0:
            raise errors.InvalidArgument(f"a disk needs at least one block, not {blocks}")
        self.path = Path(path)
        self.blocks = blocks
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise errors.InvalidArgument(f"cannot open disk image {self.path}: {e.strerror}") from None
        if fresh:
            os.ftruncate(self._fd, 0)
        size = os.fstat(self._fd).st_size
        if size < blocks * BLOCK_SIZE:
            os.ftruncate(self._fd, blocks * BLOCK_SIZE)  # new blocks read as zeros

    def read(self, block: int) -> bytes:
        self._check(block)
        data = os.pread(self._fd, BLOCK_SIZE, block * BLOCK_SIZE)
        return data.ljust(BLOCK_SIZE, b"\0")

    def write(self, block: int, data: bytes | memoryview) -> None:
        self._check(block)
        if len(data) != BLOCK_SIZE:
            raise errors.InvalidArgument(f"a block write takes {BLOCK_SIZE} bytes, not {len(data)}")
        os.pwrite(self._fd, data, block * BLOCK_SIZE)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def _check(self, block: int) -> None:
        if not 0 <= block < self.blocks:
            raise errors.InvalidArgument(
                f"block {block} is outside disk {self.path.name} ({self.blocks} blocks)")

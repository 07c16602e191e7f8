"""Shared-memory files: the one way pvmig maps memory that two processes see.

Guest RAM and the log-dirty bitmap are plain files under a tmpfs (default /dev/shm),
mapped MAP_SHARED by the host agent and by the guest process. A fresh file is sparse:
its pages read as zeros and cost nothing until written, like a guest's untouched RAM.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np


class SharedFile:
    """A shared mapping of one file, viewed as a flat numpy array of bytes."""

    def __init__(self, path: Path, mapping: mmap.mmap, size: int) -> None:
        self.path = path
        self.size = size
        self._mmap = mapping
        self.bytes = np.frombuffer(mapping, dtype=np.uint8, count=size)

    @classmethod
    def create(cls, path: str | os.PathLike, size: int) -> "SharedFile":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two domains must never share a file by accident.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            return cls(path, mmap.mmap(fd, size), size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SharedFile":
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            return cls(path, mmap.mmap(fd, size), size)
        finally:
            os.close(fd)

    def close(self) -> None:
        # Views must go before the mapping can close; a caller still holding one keeps
        # the mapping alive (mmap refuses to close under an exported buffer).
        self.bytes = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

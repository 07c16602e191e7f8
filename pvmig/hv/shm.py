"""Shared-memory files: the one way pvmig maps memory that two processes see.

Guest RAM and the log-dirty bitmap are plain files under a tmpfs (default /dev/shm),
mapped MAP_SHARED by the host agent and by the guest process. A fresh file is sparse:
its pages read as zeros and cost nothing until written, like a guest's untouched RAM.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
# Linux 5.14's MADV_POPULATE_WRITE (Python 3.11's mmap has no name for it).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class SharedFile:
    """A shared mapping of one file, viewed as a flat numpy array of bytes."""

    def __init__(self, path: Path, mapping: mmap.mmap, size: int) -> None:
        self.path = path
        self.size = size
        self._mmap = mapping
        self.bytes = np.frombuffer(mapping, dtype=np.uint8, count=size)

    @classmethod
    def create(cls, path: str | os.PathLike, size: int, populate: bool = True
               ) -> "SharedFile":
        """populate=False: the file stays sparse, its pages allocated as they are first
        written (a post-copy destination's RAM: a page not in the file is one that has
        not arrived, pvmig.hv.userfault)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two domains must never share a file by accident.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            return cls(path, _map(fd, size) if populate else mmap.mmap(fd, size), size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | os.PathLike, populate: bool = True) -> "SharedFile":
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            return cls(path, _map(fd, size) if populate else mmap.mmap(fd, size), size)
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

    @property
    def mapping(self) -> mmap.mmap:
        return self._mmap

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def _map(fd: int, size: int) -> mmap.mmap:
    """Map and populate: allocate and map every page now, as a hypervisor allocates a
    domain's memory when it builds it. A first touch later costs ~12 us a page on these
    virtual machines (3 s per GiB): paid at creation, not in the middle of a migration."""
    mapping = mmap.mmap(fd, size)
    try:
        mapping.madvise(_MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno in (errno.EFAULT, errno.ENOMEM):
            # the file system has no room for every page, and a write to a page it
            # cannot back would be a SIGBUS in whoever touches it: refuse it now
            mapping.close()
            raise OSError(errno.ENOSPC, f"no room for {size >> 20} MiB of memory "
                          f"({os.strerror(e.errno)} populating it)") from None
        # kernels before 5.14 (EINVAL), sandboxes that refuse it: reserve the room at
        # least, the pages fault in later
        log.debug("MADV_POPULATE_WRITE unavailable (%s); pages fault in lazily", e)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            mapping.close()
            raise
    return mapping

"""Guest RAM: N frames of 4096 bytes in a shared-memory file.

The host agent creates and owns the file; the guest process maps it as its physical
memory and the agent maps it as foreign memory. Everything that touches many frames
does so through the numpy views here, in bulk, never with a Python loop per page.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from pvmig.hv.shm import SharedFile

PAGE_SIZE = 4096
PAGE_WORDS = PAGE_SIZE // 8

# Per-position keys of the frame hash, fixed so that both hosts compute the same hash:
# the same value in another word hashes differently.
_HASH_KEY = np.random.default_rng(0x9E3779B97F4A7C15).integers(
    0, 2**63, size=PAGE_WORDS, dtype=np.uint64)
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
# frames per step: temporaries of 1 MiB each, which stay in cache (0.33 s per GiB here,
# 0.42 with 4 MiB steps) and cost a hashing thread 3 MiB of scratch
_HASH_CHUNK = 256


class GuestMemory:
    """The frames of one domain, as `pages` (N x 4096 uint8) and `words` (N x 512 u64)."""

    def __init__(self, shared: SharedFile) -> None:
        if shared.size % PAGE_SIZE:
            raise ValueError(f"{shared.path}: size {shared.size} is not a whole number of pages")
        self._shared = shared
        self.path = shared.path
        self.nr_frames = shared.size // PAGE_SIZE
        self.pages = shared.bytes.reshape(self.nr_frames, PAGE_SIZE)
        self.words = self.pages.view(np.uint64)

    @classmethod
    def create(cls, path: str | os.PathLike, nr_frames: int) -> "GuestMemory":
        if nr_frames <= 0:
            raise ValueError(f"a domain needs at least one frame, not {nr_frames}")
        return cls(SharedFile.create(path, nr_frames * PAGE_SIZE))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GuestMemory":
        return cls(SharedFile.open(path))

    @property
    def ram_bytes(self) -> int:
        return self.nr_frames * PAGE_SIZE

    def frame_hashes(self, frames: np.ndarray | None = None) -> np.ndarray:
        """A 64-bit hash per frame (all frames, or the given ones, in that order)."""
        return frame_hashes(self.words, frames)

    def close(self) -> None:
        self.pages = self.words = None  # type: ignore[assignment]
        self._shared.close()

    def unlink(self) -> None:
        self._shared.unlink()


def hash_words(block: np.ndarray) -> np.ndarray:
    """Hash each row of an (n, 512) u64 array; equal rows give equal hashes.

    Each word, keyed by its position, goes through murmur3's 64-bit finalizer (a
    bijection in which every input bit reaches every output bit), then the row sums:
    one changed word always changes the sum, and several changed words collide only by
    chance (2**-64), not by pattern.

    In place, in scratch arrays the calling thread keeps: a fresh temporary for each of
    the finalizer's steps cost a page fault per 4 KiB each time (about 12 us here), which
    made hashing three times slower (0.95 s per GiB instead of 0.34)."""
    x, tmp = _scratch(len(block))[:2]
    np.bitwise_xor(block, _HASH_KEY, out=x)
    for m in (_M1, _M2):
        np.right_shift(x, _S33, out=tmp)
        x ^= tmp
        x *= m
    np.right_shift(x, _S33, out=tmp)
    x ^= tmp
    return x.sum(axis=1, dtype=np.uint64)


# Per thread, not one set behind a lock: a lock would make one migration's hashing wait
# for another's, inside its downtime. 3 MiB for each thread that hashes.
_local = threading.local()


def _scratch(n: int, count: int = 2) -> tuple[np.ndarray, ...]:
    """`count` arrays of n rows, this thread's, reused from call to call."""
    bufs = getattr(_local, "bufs", ())
    if len(bufs) < count or len(bufs[0]) < n:
        rows = max(n, _HASH_CHUNK)
        bufs = _local.bufs = tuple(np.empty((rows, PAGE_WORDS), np.uint64)
                                   for _ in range(max(count, len(bufs))))
    return tuple(b[:n] for b in bufs[:count])


def frame_hashes(words: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
    """A 64-bit hash per row of (n, 512) u64 `words` (all, or the given rows, in order)."""
    if frames is None:
        frames = np.arange(len(words), dtype=np.int64)
    out = np.empty(len(frames), dtype=np.uint64)
    for lo in range(0, len(frames), _HASH_CHUNK):
        sel = frames[lo:lo + _HASH_CHUNK]
        if is_run(sel):
            block = words[int(sel[0]):int(sel[-1]) + 1]  # contiguous: no gather copy
        else:  # gathered into scratch too (mode clip: "raise" buffers its output)
            block = np.take(words, sel, axis=0, out=_scratch(len(sel), 3)[2], mode="clip")
        out[lo:lo + len(sel)] = hash_words(block)
    return out


def is_run(frames: np.ndarray) -> bool:
    """Whether the frames are one ascending run (round 0's batches are): their rows are
    then a slice, a view, where any other selection is a gather, a copy."""
    n = len(frames)
    return n > 0 and int(frames[-1]) - int(frames[0]) == n - 1 and bool(
        (np.diff(frames.astype(np.int64)) == 1).all())


def save_image(mem: GuestMemory, path: str | os.PathLike) -> np.ndarray:
    """Write the frames to a file as they are now (for `pvmig verify`), and return the
    hashes of exactly what was written: others may go on writing the memory."""
    snapshot = mem.pages.copy()
    with open(path, "wb") as f:
        f.write(snapshot.data)
    return frame_hashes(snapshot.view(np.uint64))

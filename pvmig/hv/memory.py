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

# Per-position keys of the frame hash, fixed so that both hosts compute the same hash,
# odd so that each is invertible mod 2**64: the same value in another word hashes
# differently, and one changed word always changes the hash.
_HASH_KEY = np.random.default_rng(0x9E3779B97F4A7C15).integers(
    0, 2**63, size=PAGE_WORDS, dtype=np.uint64) | np.uint64(1)
_S32 = np.uint64(32)
# frames per step: a temporary of 1 MiB, which stays in cache, and 1 MiB of scratch for
# each hashing thread
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
    def create(cls, path: str | os.PathLike, nr_frames: int, populate: bool = True
               ) -> "GuestMemory":
        if nr_frames <= 0:
            raise ValueError(f"a domain needs at least one frame, not {nr_frames}")
        return cls(SharedFile.create(path, nr_frames * PAGE_SIZE, populate))

    @classmethod
    def open(cls, path: str | os.PathLike, populate: bool = True) -> "GuestMemory":
        return cls(SharedFile.open(path, populate))

    @property
    def mapping(self):
        """The mmap itself (userfaultfd registers it: pvmig.hv.userfault)."""
        return self._shared.mapping

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

    A multilinear hash mod 2**64: each word x = w ^ (w >> 32) (a bijection), times its
    position's odd key, summed over the row (one matmul). One changed word always
    changes the sum. Folding the high half into the low one first leaves any change of
    a word with at most 31 trailing zero bits, so that changes in several words cancel
    only by chance (at most 2**-33 for a pattern, over the keys), never by pattern (with
    plain words, bit 63 flipped in any two words would cancel).

    Three passes, in a scratch array the calling thread keeps: 5.8 GiB/s on these
    machines, where murmur3's finalizer per word (seven passes) ran at 2.6-3.0 and held
    the destination's background hashing to about its pace (docs/PERFORMANCE.md)."""
    (x,) = _scratch(len(block), 1)
    np.right_shift(block, _S32, out=x)
    x ^= block
    return np.matmul(x, _HASH_KEY)


# Per thread, not one set behind a lock: a lock would make one migration's hashing wait
# for another's, inside its downtime. 2 MiB for each thread that hashes.
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
            block = np.take(words, sel, axis=0, out=_scratch(len(sel), 2)[1], mode="clip")
        out[lo:lo + len(sel)] = hash_words(block)
    return out


def zero_rows(rows: np.ndarray) -> np.ndarray:
    """Which rows of (n, 4096) u8 pages are all zero. A page whose first word is not zero
    is not a zero page: only the others are read whole (a written guest costs a word a
    page, 10 times less than reading every page)."""
    words = rows.view(np.uint64)
    zero = words[:, 0] == 0
    if zero.any():
        maybe = np.flatnonzero(zero)
        zero[maybe] = ~words[maybe].any(axis=1)
    return zero


def is_run(frames: np.ndarray) -> bool:
    """Whether the frames are one ascending run (round 0's batches are): their rows are
    then a slice, a view, where any other selection is a gather, a copy."""
    n = len(frames)
    return n > 0 and int(frames[-1]) - int(frames[0]) == n - 1 and bool(
        (np.diff(frames.astype(np.int64)) == 1).all())


def runs(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first frame, length) of each ascending run in frames."""
    if not len(frames):
        return frames[:0], np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(frames.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(frames)])))
    return frames[starts], lengths


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) of each run of True in a per-frame mask (end exclusive)."""
    starts = np.flatnonzero(mask[1:] & ~mask[:-1]) + 1
    ends = np.flatnonzero(mask[:-1] & ~mask[1:]) + 1
    if len(mask) and mask[0]:
        starts = np.concatenate(([0], starts))
    if len(mask) and mask[-1]:
        ends = np.concatenate((ends, [len(mask)]))
    return starts, ends


def save_image(mem: GuestMemory, path: str | os.PathLike) -> np.ndarray:
    """Write the frames to a file as they are now (for `pvmig verify`), and return the
    hashes of exactly what was written: others may go on writing the memory."""
    snapshot = mem.pages.copy()
    with open(path, "wb") as f:
        f.write(snapshot.data)
    return frame_hashes(snapshot.view(np.uint64))

"""Guest RAM: N frames of 4096 bytes in a shared-memory file.

The host agent creates and owns the file; the guest process maps it as its physical
memory and the agent maps it as foreign memory. Everything that touches many frames
does so through the numpy views here, in bulk, never with a Python loop per page.
"""

from __future__ import annotations

import os

import numpy as np

from .shm import SharedFile

PAGE_SIZE = 4096
PAGE_WORDS = PAGE_SIZE // 8

# Per-word multipliers of the frame hash: odd, so that any change to one word changes
# its product, and fixed, so that both hosts compute the same hash.
_HASH_MUL = (np.random.default_rng(0x9E3779B97F4A7C15).integers(
    0, 2**63, size=PAGE_WORDS, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
_HASH_CHUNK = 4096  # frames per step: bounds the temporaries to 16 MiB


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
        if frames is None:
            frames = np.arange(self.nr_frames, dtype=np.int64)
        out = np.empty(len(frames), dtype=np.uint64)
        for lo in range(0, len(frames), _HASH_CHUNK):
            sel = frames[lo:lo + _HASH_CHUNK]
            if len(sel) and sel[-1] - sel[0] == len(sel) - 1 and np.all(np.diff(sel) == 1):
                block = self.words[sel[0]:sel[-1] + 1]  # contiguous: no gather copy
            else:
                block = self.words[sel]
            out[lo:lo + len(sel)] = hash_words(block)
        return out

    def close(self) -> None:
        self.pages = self.words = None  # type: ignore[assignment]
        self._shared.close()

    def unlink(self) -> None:
        self._shared.unlink()


def hash_words(block: np.ndarray) -> np.ndarray:
    """Hash each row of an (n, 512) u64 array; equal rows give equal hashes."""
    x = block * _HASH_MUL  # wraps mod 2**64; odd multipliers keep every word's change
    x ^= x >> np.uint64(29)  # a bijection: a changed product stays changed
    return x.sum(axis=1, dtype=np.uint64)

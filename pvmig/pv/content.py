"""What the guest's workloads write, so that anyone can say what a page or a block must
hold: a memory page at generation g, a disk block at version v (0: never written, all
zeros). The guest writes and checks them; the toolstack provisions a disk with them
(a disk created with content: DeviceConfig fill), and tests read them back.
"""

from __future__ import annotations

import numpy as np

from pvmig.hv.memory import PAGE_WORDS

PAGE_MAGIC = np.uint64(0x7061_6765_2D67_656E)  # "page-gen"
_HEADER = 4
_IDX = np.arange(PAGE_WORDS - _HEADER, dtype=np.uint64)
_K1, _K2, _K3, _K4 = (np.uint64(k) for k in (
    0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93))


def pattern(frames: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """The pages that frames must hold at generations gens, as (n, 512) u64."""
    f = frames.astype(np.uint64)[:, None]
    g = gens.astype(np.uint64)[:, None]
    out = np.empty((len(frames), PAGE_WORDS), dtype=np.uint64)
    payload = out[:, _HEADER:]
    np.multiply(f, _K1, out=payload)  # (the broadcast fills every column)
    payload += g * _K2
    payload += _IDX * _K3
    payload ^= payload >> np.uint64(31)
    payload *= _K4
    out[:, 0] = f[:, 0]
    out[:, 1] = g[:, 0]
    out[:, 2] = np.bitwise_xor.reduce(payload, axis=1)
    out[:, 3] = PAGE_MAGIC
    out[gens == 0] = 0
    return out


BLOCK_TAG = np.uint64(1 << 40)  # block patterns never equal memory-page patterns


def block_pattern(blocks: np.ndarray, versions: np.ndarray) -> np.ndarray:
    return pattern(blocks.astype(np.uint64) | BLOCK_TAG, versions)

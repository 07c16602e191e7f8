"""Frame hashes: how the coordinator compares two memories without moving them.

Each side hashes its frames (pvmig.memory.hash_words) and streams the hashes in chunks;
the coordinator compares them. A hash per frame is 8 bytes: 2 MiB for a 1 GiB guest.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ._proto import pvmig_pb2 as pb

CHUNK_FRAMES = 1 << 16  # 512 KiB of hashes per message


def chunks(hashes: np.ndarray) -> Iterator[pb.HashChunk]:
    for lo in range(0, len(hashes), CHUNK_FRAMES):
        yield pb.HashChunk(first_frame=lo,
                           hashes=hashes[lo:lo + CHUNK_FRAMES].astype("<u8").tobytes())


def differing(source: np.ndarray, dest: np.ndarray) -> np.ndarray | None:
    """Frames whose hashes differ, ascending; None when the sizes differ."""
    if len(source) != len(dest):
        return None
    return np.flatnonzero(source != dest)

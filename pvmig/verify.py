"""Frame hashes: how the coordinator compares two memories without moving them.

Each side hashes its frames (pvmig.memory.hash_words) and streams the hashes in chunks;
the coordinator compares them. A hash per frame is 8 bytes: 2 MiB for a 1 GiB guest.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import errors
from ._proto import pvmig_pb2 as pb
from .devlayout import shared_areas
from .memory import GuestMemory

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


def by_area(differing: np.ndarray, areas) -> dict[str, int]:
    """How many of the differing frames lie in each (area, first, count); the rest,
    frames only the guest writes, under "guest-only"."""
    out: dict[str, int] = {}
    left = np.ones(len(differing), dtype=bool)
    for name, first, count in areas:
        inside = (differing >= first) & (differing < first + count)
        if inside.any():
            out[name] = int(inside.sum())
            left &= ~inside
    if left.any():
        out["guest-only"] = int(left.sum())
    return out


def verify_images(source, dest) -> dict:
    """Compare two saved memories (pvmig migrate --save-images) frame by frame; place
    every difference in the area it lies in, read from the source's own info page."""
    mems = []
    for path in (source, dest):
        try:
            mems.append(GuestMemory.open(path))
        except (OSError, ValueError) as e:
            raise errors.InvalidArgument(f"cannot read memory image {path}: {e}") from None
    src, dst = mems
    if src.nr_frames != dst.nr_frames:
        raise errors.InvalidArgument(f"{source} has {src.nr_frames} frames, {dest} "
                                     f"{dst.nr_frames}: not two copies of one guest")
    diff = differing(src.frame_hashes(), dst.frame_hashes())
    areas = by_area(diff, shared_areas(src))
    return {"frames": src.nr_frames, "differing": int(len(diff)),
            "differing-by-area": areas, "differing-frames": [int(f) for f in diff[:32]]}

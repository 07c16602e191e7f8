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


def verify_images(source, dest) -> dict:
    """Compare two saved memories (pvmig migrate --save-images) frame by frame; place
    every difference in the area it lies in, read from the source's own info page."""
    from . import errors
    from .guestinfo import XENSTORE_FRAME, MAGIC, view
    from .devlayout import BlkArea, NetArea
    from .memory import GuestMemory

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
    areas = [("xenstore", XENSTORE_FRAME, 1)]
    info = view(src)[0]
    if int(info["magic"]) == MAGIC:
        if int(info["blk_blocks"]):
            blk = BlkArea.at(int(info["dev_first"]), int(info["blk_blocks"]))
            areas += [("vbd-ring", blk.ring, 1), ("vbd-buffers", blk.buffers, blk.end - blk.buffers)]
        if int(info["net_first"]):
            net = NetArea.at(int(info["net_first"]))
            areas += [("vif-rings", net.tx_ring, 2),
                      ("vif-buffers", net.tx_buffers, net.end - net.tx_buffers)]
    by_area: dict[str, int] = {}
    left = np.ones(len(diff), dtype=bool)
    for name, first, count in areas:
        inside = (diff >= first) & (diff < first + count)
        if inside.any():
            by_area[name] = int(inside.sum())
            left &= ~inside
    if left.any():
        by_area["guest-only"] = int(left.sum())
    return {"frames": src.nr_frames, "differing": int(len(diff)),
            "differing-by-area": by_area, "differing-frames": [int(f) for f in diff[:32]]}

"""Frame hashes: how the coordinator compares two memories without moving them.

Each side hashes its frames (pvmig.hv.memory.hash_words) and streams the hashes in chunks;
the coordinator compares them. A hash per frame is 8 bytes: 2 MiB for a 1 GiB guest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.foreign_writes import COPY_RACE, explain
from pvmig.hv.memory import GuestMemory
from pvmig.pv.devlayout import shared_areas

CHUNK_FRAMES = 1 << 16  # 512 KiB of hashes per message
MAX_DETAIL = 32  # differing frames listed one by one


def chunks(hashes: np.ndarray, causes: np.ndarray | None = None) -> Iterator[pb.HashChunk]:
    for lo in range(0, len(hashes), CHUNK_FRAMES):
        yield pb.HashChunk(first_frame=lo,
                           hashes=hashes[lo:lo + CHUNK_FRAMES].astype("<u8").tobytes(),
                           causes=b"" if causes is None else causes[lo:lo + CHUNK_FRAMES].tobytes())


def differing(source: np.ndarray, dest: np.ndarray) -> np.ndarray | None:
    """Frames whose hashes differ, ascending; None when the sizes differ."""
    if len(source) != len(dest):
        return None
    return np.flatnonzero(source != dest)


def place(frames: np.ndarray, areas) -> np.ndarray:
    """The index in `areas` of the area each frame lies in; -1 for frames only the
    guest writes."""
    where = np.full(len(frames), -1, dtype=np.int64)
    for i, (_name, first, count) in enumerate(areas):
        where[(frames >= first) & (frames < first + count)] = i
    return where


def by_area(differing: np.ndarray, areas) -> dict[str, int]:
    """How many of the differing frames lie in each (area, first, count); the rest,
    frames only the guest writes, under "guest-only"."""
    where = place(differing, areas)
    out = {name: int((where == i).sum()) for i, (name, _f, _c) in enumerate(areas)}
    out = {k: v for k, v in out.items() if v}
    if (where < 0).any():
        out["guest-only"] = int((where < 0).sum())
    return out


CLASSES = ("undefined", "observed", "torn", "lost")


def classify(differing: np.ndarray, causes: np.ndarray | None, areas,
             observed=()) -> dict:
    """Each differing frame's class and cause (DESIGN.md, "Verifier"):

    observed   the guest's checks found wrong data in it: a corruption it saw
    torn       copied while a backend wrote it (cause copy-race), the guest has not
               used it
    undefined  written by dom0 (a ring, an I/O buffer, the xenstore page) after its
               last copy, and not used by the guest: a request it will replay, or a
               page it rebuilds on resume
    lost       a frame only the guest writes: a write the migration lost

    `causes`: the source's cause code per frame of the whole memory (foreign_writes),
    or None where the source did not say (an image saved without its journal)."""
    where = place(differing, areas)
    codes = causes[differing] if causes is not None else None
    cls = np.where(where >= 0, 0, 3)
    if codes is not None:
        cls[codes == COPY_RACE] = 2
    cls[np.isin(differing, np.asarray(list(observed), dtype=np.int64))] = 1
    head = differing[:MAX_DETAIL]
    names = ["guest-only" if w < 0 else areas[w][0] for w in where[:MAX_DETAIL].tolist()]
    why = explain(codes[:MAX_DETAIL]) if codes is not None else ["unknown"] * len(head)
    detail = [{"frame": f, "area": a, "class": CLASSES[c], "cause": k}
              for f, a, c, k in zip(head.tolist(), names, cls[:MAX_DETAIL].tolist(), why)]
    by_cause: dict[str, int] = {}
    if codes is not None:
        for k, n in zip(*np.unique(codes, return_counts=True)):
            name = explain([int(k)])[0]
            by_cause[name] = by_cause.get(name, 0) + int(n)
    return {"by-class": {CLASSES[c]: int(n) for c, n in zip(*np.unique(cls, return_counts=True))},
            "by-cause": by_cause, "frames": detail}


def save_causes(causes: np.ndarray, image: str | os.PathLike) -> None:
    """The journal's verdict beside a saved source image, for `pvmig verify` later."""
    Path(f"{image}.causes").write_bytes(causes.astype(np.uint8).tobytes())


def load_causes(image: str | os.PathLike, nr_frames: int) -> np.ndarray | None:
    path = Path(f"{image}.causes")
    if not path.exists():
        return None
    causes = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if len(causes) != nr_frames:
        raise errors.InvalidArgument(f"{path} holds {len(causes)} causes for "
                                     f"{nr_frames} frames: not this image's")
    return causes


def verify_images(source, dest, observed=()) -> dict:
    """Compare two saved memories (pvmig migrate --save-images) frame by frame; place
    every difference in the area it lies in, read from the source's own info page, and
    classify it with the causes saved beside the source image. `observed`: the frames
    the guest's checks named after resume (the report's), if known."""
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
    areas = shared_areas(src)
    verdict = classify(diff, load_causes(source, src.nr_frames), areas, observed)
    return {"frames": src.nr_frames, "differing": int(len(diff)),
            "differing-by-area": by_area(diff, areas),
            "differing-by-class": verdict["by-class"],
            "differing-by-cause": verdict["by-cause"],
            "differing-frames": verdict["frames"]}

"""The guest's info page (frame 0): its configuration, cursors and self-check counters.

The guest writes it through its memory API like any other state; it migrates with the
rest of RAM. The host agent reads it, as foreign memory, to report how the guest is
doing. Only the guest ever writes it.

Frames 1..gen_frames hold the generation table (u32 per frame); the workload frames
follow.
"""

from __future__ import annotations

import numpy as np

from .memory import PAGE_SIZE, GuestMemory

MAGIC = 0x5056_4D49_4731_0001  # "PVMIG1", layout version 1
MAX_FAILURES = 16

FAILURE = np.dtype([("frame", "<u8"), ("expected", "<u8"), ("found", "<u8")])
INFO = np.dtype([
    ("magic", "<u8"),
    ("nr_frames", "<u8"),
    ("gen_first", "<u8"), ("gen_frames", "<u8"),
    ("work_first", "<u8"), ("work_frames", "<u8"),
    ("dirty_rate", "<f8"), ("hot_fraction", "<f8"), ("hot_share", "<f8"), ("fill", "<f8"),
    ("seed", "<u8"),
    ("steps", "<u8"), ("pages_written", "<u8"),
    ("checks_run", "<u8"), ("checks_failed", "<u8"),
    ("sweeps", "<u8"), ("sweep_cursor", "<u8"), ("resumes", "<u8"),
    ("sweeps_since_resume", "<u8"), ("checks_since_resume", "<u8"),
    ("failed_since_resume", "<u8"),
    ("nr_failures", "<u8"),
    ("failures", FAILURE, (MAX_FAILURES,)),
])
assert INFO.itemsize <= PAGE_SIZE

COUNTERS = ("steps", "pages_written", "checks_run", "checks_failed", "sweeps", "resumes",
            "sweeps_since_resume", "checks_since_resume", "failed_since_resume")


def view(mem: GuestMemory) -> np.ndarray:
    """A one-element structured array over frame 0 (writes go to guest RAM)."""
    return mem.pages[0, :INFO.itemsize].view(INFO)


def layout(nr_frames: int) -> tuple[int, int, int, int]:
    """(gen_first, gen_frames, work_first, work_frames) for a domain of nr_frames."""
    gen_frames = -(-nr_frames * 4 // PAGE_SIZE)
    work_first = 1 + gen_frames
    if work_first >= nr_frames:
        raise ValueError(f"{nr_frames} frames leave no room for the workload")
    return 1, gen_frames, work_first, nr_frames - work_first


def read(mem: GuestMemory) -> dict:
    """A snapshot of the counters and recorded failures; empty if the guest never booted."""
    info = view(mem)[0].copy()
    if int(info["magic"]) != MAGIC:
        return {}
    out = {name: int(info[name]) for name in COUNTERS}
    n = min(int(info["nr_failures"]), MAX_FAILURES)
    out["failures"] = [
        {"frame": int(f["frame"]), "expected": int(f["expected"]), "found": int(f["found"])}
        for f in info["failures"][:n]]
    return out

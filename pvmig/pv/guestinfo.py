"""The guest's info page (frame 0): its configuration, cursors and self-check counters.

The guest writes it through its memory API like any other state; it migrates with the
rest of RAM. The host agent reads it, as foreign memory, to report how the guest is
doing. Only the guest ever writes it.

Guest physical memory, frame by frame:
    0                   this info page
    1                   the xenstore ring: the "magic" page xenstored maps (untracked)
    gen_first..         the generation table, a u32 per frame
    dev_first..         the PV devices' rings, shadows and buffers (none without devices)
    work_first..        the memory workload's frames
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pvmig.hv.memory import PAGE_SIZE, GuestMemory

MAGIC = 0x5056_4D49_4731_0002  # "PVMIG1", layout version 2
INFO_FRAME = 0
XENSTORE_FRAME = 1
MAX_FAILURES = 16

FAILURE = np.dtype([("frame", "<u8"), ("expected", "<u8"), ("found", "<u8")])
INFO = np.dtype([
    ("magic", "<u8"),
    ("nr_frames", "<u8"),
    ("gen_first", "<u8"), ("gen_frames", "<u8"),
    ("dev_first", "<u8"), ("dev_frames", "<u8"),
    ("work_first", "<u8"), ("work_frames", "<u8"),
    ("dirty_rate", "<f8"), ("hot_fraction", "<f8"), ("hot_share", "<f8"), ("fill", "<f8"),
    ("seed", "<u8"),
    # the block device (blk_blocks 0: none): what the guest needs to find it again
    ("blk_devid", "<u8"), ("blk_blocks", "<u8"), ("blk_io_rate", "<f8"),
    ("blk_persistent", "<u8"),
    ("net_devid", "<u8"), ("net_first", "<u8"),  # net_first 0: no network device
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
    return mem.pages[INFO_FRAME, :INFO.itemsize].view(INFO)


@dataclass(frozen=True)
class Layout:
    nr_frames: int
    gen_first: int
    gen_frames: int
    dev_first: int
    dev_frames: int
    work_first: int
    work_frames: int


def layout(nr_frames: int, dev_frames: int = 0) -> Layout:
    """Where everything lives in a domain of nr_frames with dev_frames for devices."""
    gen_first = XENSTORE_FRAME + 1
    gen_frames = -(-nr_frames * 4 // PAGE_SIZE)
    dev_first = gen_first + gen_frames
    work_first = dev_first + dev_frames
    if work_first >= nr_frames:
        raise ValueError(f"{nr_frames} frames leave no room for the workload")
    return Layout(nr_frames, gen_first, gen_frames, dev_first, dev_frames, work_first,
                  nr_frames - work_first)


def workload(mem: GuestMemory) -> dict:
    """The rates the guest runs at now, as it keeps them (its workload moves with it and
    changes on request: pvmig domain workload); empty if the guest never booted."""
    info = view(mem)[0].copy()
    if int(info["magic"]) != MAGIC:
        return {}
    return {"dirty_rate": float(info["dirty_rate"]),
            "hot_fraction": float(info["hot_fraction"]),
            "hot_share": float(info["hot_share"]), "fill": float(info["fill"]),
            "seed": int(info["seed"])}


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

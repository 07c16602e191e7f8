"""Where the guest's PV devices keep their state in guest RAM (the device area).

Everything a frontend needs to go on after a move lives here, so that it migrates
with the memory: the ring pages, blkfront's shadow of in-flight requests, the block
workload's table of acknowledged versions, the I/O buffers, and the counters the
host agent reads for the report (as it reads the info page).

blk, from dev_first:
    ring            one page, the blkif shared ring (granted to the backend)
    shadow          a header of counters, then one entry per ring slot
    versions        the last acknowledged write version of each disk block, u32
    buffers         one page per ring slot: the data of that slot's request
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pvmig.hv.memory import PAGE_SIZE, GuestMemory
from pvmig.pv import guestinfo

BLK_SLOTS = 32  # a one-page blkif ring

BLK_COUNTERS = np.dtype([
    ("magic", "<u8"),
    ("writes_issued", "<u8"), ("writes_acked", "<u8"),
    ("reads_issued", "<u8"), ("reads_checked", "<u8"), ("read_failures", "<u8"),
    ("errors", "<u8"),             # responses with a non-OKAY status
    ("replayed", "<u8"),           # requests re-queued from the shadow on a resume
    ("inflight_at_suspend", "<u8"),
    ("resumes", "<u8"),
    ("trusted_old_ring", "<u8"),   # responses taken from the old ring (recovery=naive)
    ("first_failure_block", "<i8"),
    ("nr_failed_frames", "<u8"),   # entries in the failure log (it keeps the first ones)
])
BLK_MAGIC = 0x626C_6B66_726F_6E74  # "blkfront"
FREE, INFLIGHT = 0, 1
SHADOW = np.dtype([
    ("state", "u1"), ("op", "u1"), ("pad", "<u2"),
    ("block", "<u4"), ("version", "<u4"), ("pad2", "<u4"),
    ("id", "<u8"), ("issued", "<u8"),
])
SHADOW_OFFSET = 128
# The failure log: the buffer frame of each read that failed its check, so that the
# verifier can tie a corruption the guest saw to the frames that differ.
FAILED_OFFSET = 2048
MAX_FAILED = 64
assert BLK_COUNTERS.itemsize <= SHADOW_OFFSET
assert SHADOW_OFFSET + BLK_SLOTS * SHADOW.itemsize <= FAILED_OFFSET
assert FAILED_OFFSET + MAX_FAILED * 4 <= PAGE_SIZE


@dataclass(frozen=True)
class BlkArea:
    ring: int
    shadow: int
    versions: int
    version_frames: int
    buffers: int
    blocks: int

    @staticmethod
    def frames_needed(blocks: int) -> int:
        return 2 + _version_frames(blocks) + BLK_SLOTS

    @classmethod
    def at(cls, first: int, blocks: int) -> "BlkArea":
        vf = _version_frames(blocks)
        return cls(ring=first, shadow=first + 1, versions=first + 2, version_frames=vf,
                   buffers=first + 2 + vf, blocks=blocks)

    @property
    def end(self) -> int:
        return self.buffers + BLK_SLOTS

    def counters(self, mem: GuestMemory) -> np.ndarray:
        return mem.pages[self.shadow, :BLK_COUNTERS.itemsize].view(BLK_COUNTERS)

    def shadow_table(self, mem: GuestMemory) -> np.ndarray:
        return mem.pages[self.shadow, SHADOW_OFFSET:SHADOW_OFFSET + BLK_SLOTS * SHADOW.itemsize
                         ].view(SHADOW)

    def failed_frames(self, mem: GuestMemory) -> np.ndarray:
        return mem.pages[self.shadow, FAILED_OFFSET:FAILED_OFFSET + MAX_FAILED * 4].view("<u4")

    def version_table(self, mem: GuestMemory) -> np.ndarray:
        words = mem.pages[self.versions:self.versions + self.version_frames].reshape(-1)
        return words.view(np.uint32)[:self.blocks]


def read_blk_counters(mem: GuestMemory, area: BlkArea) -> dict:
    c = area.counters(mem)[0].copy()
    if int(c["magic"]) != BLK_MAGIC:
        return {}
    out = {name: int(c[name]) for name in BLK_COUNTERS.names if name != "magic"}
    if out["first_failure_block"] < 0:  # none
        del out["first_failure_block"]
    return out


def read_blk_failures(mem: GuestMemory, area: BlkArea) -> list[int]:
    """The buffer frames of the reads the guest found wrong (the first MAX_FAILED)."""
    c = area.counters(mem)[0]
    if int(c["magic"]) != BLK_MAGIC:
        return []
    n = min(int(c["nr_failed_frames"]), MAX_FAILED)
    return [int(f) for f in area.failed_frames(mem)[:n]]


def _version_frames(blocks: int) -> int:
    return -(-blocks * 4 // PAGE_SIZE)


# ---- net: tx ring, rx ring, state (counters, then a window of sequence numbers seen),
# then NET_SLOTS tx buffers and NET_SLOTS rx buffers

NET_SLOTS = 32
NET_MAGIC = 0x6E65_7466_726F_6E74  # "netfront"
NET_COUNTERS = np.dtype([
    ("magic", "<u8"),
    ("requests", "<u8"), ("duplicates", "<u8"), ("responses", "<u8"),
    ("tx_full", "<u8"), ("rx_errors", "<u8"), ("tx_errors", "<u8"),
    ("highest_seq", "<u8"), ("resumes", "<u8"), ("dropped_at_resume", "<u8"),
    ("longest_gap", "<u8"),  # the most sequence numbers skipped between two requests
    ("tx_inflight", "<u8"), ("inflight_at_suspend", "<u8"),
])
NET_SEEN_OFFSET = 128
NET_SEEN_BITS = (PAGE_SIZE - NET_SEEN_OFFSET) * 8


@dataclass(frozen=True)
class NetArea:
    tx_ring: int
    rx_ring: int
    state: int
    tx_buffers: int
    rx_buffers: int

    FRAMES = 3 + 2 * NET_SLOTS

    @classmethod
    def at(cls, first: int) -> "NetArea":
        return cls(first, first + 1, first + 2, first + 3, first + 3 + NET_SLOTS)

    @property
    def end(self) -> int:
        return self.rx_buffers + NET_SLOTS

    def counters(self, mem: GuestMemory) -> np.ndarray:
        return mem.pages[self.state, :NET_COUNTERS.itemsize].view(NET_COUNTERS)

    def seen(self, mem: GuestMemory) -> np.ndarray:
        return mem.pages[self.state, NET_SEEN_OFFSET:]


def read_net_counters(mem: GuestMemory, area: NetArea) -> dict:
    c = area.counters(mem)[0].copy()
    if int(c["magic"]) != NET_MAGIC:
        return {}
    return {name: int(c[name]) for name in NET_COUNTERS.names if name != "magic"}


def shared_areas(mem: GuestMemory) -> list[tuple[str, int, int]]:
    """(area, first frame, count) of the frames others than the guest write: the
    xenstore page (xenstored) and each device's rings and I/O buffers (its backend).
    Read from the guest's own info page, so it works on a saved image too."""
    out = [("xenstore", guestinfo.XENSTORE_FRAME, 1)]
    info = guestinfo.view(mem)[0]
    if int(info["magic"]) != guestinfo.MAGIC:
        return out
    if int(info["blk_blocks"]):
        blk = BlkArea.at(int(info["dev_first"]), int(info["blk_blocks"]))
        devid = int(info["blk_devid"])
        out += [(f"vbd{devid}-ring", blk.ring, 1),
                (f"vbd{devid}-buffers", blk.buffers, blk.end - blk.buffers)]
    if int(info["net_first"]):
        net = NetArea.at(int(info["net_first"]))
        devid = int(info["net_devid"])
        out += [(f"vif{devid}-rings", net.tx_ring, 2),
                (f"vif{devid}-buffers", net.tx_buffers, net.end - net.tx_buffers)]
    return out

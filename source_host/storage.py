"""The save side of a storage migration (migrate --copy-storage): QEMU's mirror job for
the PV block path.

From Begin each disk keeps a BlockLog (pvmig.dom0.disk) of what blkback writes. The
first storage round sends every block; later rounds (the disk's own, then beside each
of memory's) send the blocks written since, and the final pass the last of them, after
the memory's frames (a response the copied ring holds was written after its data, so
its block is in the log the final pass reads). In write-blocking mode, once the first
round is done, each guest write goes to the destination (a DISK_SYNC record on a data
connection of its own) before blkback answers it; the log still marks it, and the
destination's acknowledgement clears the mark unless the block was written again. A
mirror that fails falls back to the log: the write is the source's, and goes in a round.

After the final read the log is sealed: what blkback writes after it reaches only the
source's image (the frontend replays those requests at the destination), and the
blocks are remembered, to explain differences at verification.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from pvmig.dom0.disk import BLOCK_SIZE, BlockLog, DiskImage
from pvmig.migration.policy import StorageMode

log = logging.getLogger(__name__)
LATE = 1  # a block's cause at verification: written after the final pass (replayed)
HOLD_POLL_S = 0.05


@dataclass
class SourceDisk:
    devid: int
    image: DiskImage
    log: BlockLog
    view: np.ndarray  # the image, mapped read-only: rounds send from it
    backend: object = None  # its BlkBack (write latency)


@dataclass
class StorageCopy:
    """One migration's disks, from Begin to the end (SaveSession.storage)."""

    disks: list[SourceDisk]
    mode: StorageMode = StorageMode.BACKGROUND
    rounds_done: int = 0
    copied: bool = False  # a first round got through: every block went once
    sealed: bool = False
    bytes: int = 0
    blocks_sent: int = 0
    mirrored: int = 0
    mirrored_bytes: int = 0
    mirror_broken: str = ""
    on_sent: object = None  # called with the bytes each mirrored write put on the wire
    _mirror = None  # the DataStream write-blocking writes go on
    _hold_at: int | None = None  # (storage-holds-halfway: the block the first round stops at)
    _released: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, devices, mode: StorageMode, hold_halfway: bool = False) -> "StorageCopy":
        """Logs on for every disk of a domain's devices (DomainDevices)."""
        disks = []
        for devid, image in sorted(devices.disks.items()):
            image.log = BlockLog(image.blocks)
            blk = devices.backends.get(devid, (None, None))[0]
            if blk is not None:
                blk.stats.write_ns.clear()  # latency from the migration's start
            disks.append(SourceDisk(devid, image, image.log, image.view(), blk))
        copy = cls(disks, mode)
        if hold_halfway:
            copy._hold_at = disks[0].image.blocks // 2
        return copy

    @property
    def size(self) -> int:
        return sum(d.image.size for d in self.disks)

    @property
    def paths(self) -> list:
        return [d.image.path for d in self.disks]

    def take(self, first: bool) -> list[tuple[SourceDisk, np.ndarray]]:
        """Each disk's blocks for the next round: all of them in the first (the marks
        cleared first all the same), else those written since the last take."""
        out = []
        for d in self.disks:
            blocks = d.log.take()
            if first:
                blocks = np.arange(d.image.blocks, dtype=np.uint32)
            if first and self._hold_at is not None and d is self.disks[0]:
                # (storage-holds-halfway: two parts, the second's first batch held)
                out += [(d, blocks[:self._hold_at]), (d, blocks[self._hold_at:])]
                continue
            out.append((d, blocks))
        return out

    @staticmethod
    def again(taken: list[tuple[SourceDisk, np.ndarray]]) -> None:
        """A round that did not get through: its blocks go in the next."""
        for d, blocks in taken:
            d.log.dirty[blocks] = 1

    def count(self) -> int:
        return sum(d.log.count() for d in self.disks)

    # ---- write-blocking

    def mirror_on(self, stream) -> None:
        """From now on each write reaches the destination before its response."""
        if self.mode is not StorageMode.WRITE_BLOCKING or self.sealed or self.mirror_broken:
            return
        self._mirror = stream
        for d in self.disks:
            d.image.mirror = partial(self._write_through, d)

    def mirror_off(self) -> None:
        """No more writes through (those on their way finish or fail: their blocks stay
        marked until acknowledged)."""
        self._mirror = None
        for d in self.disks:
            d.image.mirror = None

    async def _write_through(self, disk: SourceDisk, block: int, gen: int, data: bytes) -> None:
        stream = self._mirror
        if stream is None or disk.image.mirror is None:
            return
        try:
            sent = await stream.write_through(disk.devid, block, gen, data)
        except Exception as e:  # the write is the source's: the log keeps it for a round
            if self._mirror is not stream:
                return  # (closed or replaced on purpose: a reconnect, the final pass)
            if not self.mirror_broken:
                self.mirror_broken = str(e)
                log.warning("write-blocking mirror broke (%s): the dirty log carries the "
                            "writes from here", e)
            self.mirror_off()
            return
        disk.log.held(block, gen)
        self.mirrored += 1
        self.mirrored_bytes += sent.wire_bytes
        if self.on_sent is not None:
            self.on_sent(sent.wire_bytes)

    # ---- the final pass and after

    def seal(self) -> None:
        """Before the final read of the logs."""
        self.mirror_off()
        self.sealed = True
        for d in self.disks:
            d.log.seal()

    def late(self) -> np.ndarray:
        """Per block of every disk (devid order): LATE if written after the final pass."""
        return np.concatenate([
            (d.log.late if d.log.late is not None else np.zeros(d.image.blocks, np.uint8))
            * np.uint8(LATE) for d in self.disks])

    def hashes(self) -> np.ndarray:
        return np.concatenate([d.image.block_hashes() for d in self.disks])

    def write_latency(self) -> tuple[int, int, int]:
        """(p50 ns, p99 ns, writes) of the guest's writes since Begin."""
        lat = np.concatenate([np.fromiter(d.backend.stats.write_ns, np.int64,
                                          len(d.backend.stats.write_ns))
                              for d in self.disks if d.backend is not None] or
                             [np.zeros(0, np.int64)])
        if not len(lat):
            return 0, 0, 0
        p50, p99 = np.percentile(lat, [50, 99])
        return int(p50), int(p99), len(lat)

    def hold(self, blocks: np.ndarray, broken=lambda: False) -> None:
        """storage-holds-halfway (in a stream's thread): the first round stops at half
        the disk until the migration ends, or its connection breaks (the destination
        said something, or is gone: the send that follows finds out which)."""
        if self._hold_at is not None and len(blocks) and int(blocks[-1]) >= self._hold_at:
            while not self._released.wait(HOLD_POLL_S) and not broken():
                pass

    def stop(self) -> None:
        """The migration is over (aborted, or the source copy goes): logs off."""
        self.mirror_off()
        self._released.set()
        for d in self.disks:
            d.image.log = None

    def stats(self, s) -> None:
        """Into a round's RoundStats: the write latency so far, the mirror's count."""
        s.write_p50_ns, s.write_p99_ns, s.writes = self.write_latency()
        s.mirrored_writes = self.mirrored
        s.mirrored_bytes = self.mirrored_bytes
        s.mirror_broken = self.mirror_broken


__all__ = ["StorageCopy", "SourceDisk", "LATE", "BLOCK_SIZE"]

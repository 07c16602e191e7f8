"""The destination's side of a storage migration (migrate --copy-storage).

At prepare, each of the domain's disks gets a new image under this agent's storage dir:
refused if one is there already (shared storage, or an earlier copy: never written
over) or if the disks do not fit, and reserved whole (fallocate) so that a full disk is
found before the copy, not halfway. Blocks arrive on the data channels (DISK records,
pvmig.migration.wire) and go into the image through the fd blkback will serve it from;
a block is kept only if it is not older than the copy already here (its generation:
a write-blocking write and a round's copy of the same block may cross). A discarded
migration deletes the images it made; a committed one keeps them, the domain's disks.

Verification hashes each image as it was at resume, as memory's: blocks are hashed
after their last write, in the background while the copy runs.

An agent that crashes mid-copy cannot delete what it made then: each migration's images
are named in a record under the agent's data dir (PARTIAL) from before the first is
created until the commit makes them the domain's; the next start deletes the images of
every record whose migration never committed here (discard_partial).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pvmig import errors
from pvmig.dom0.devices import disk_path
from pvmig.dom0.disk import BLOCK_SIZE, DiskImage
from pvmig.host.commit_log import Role
from pvmig.hv import logdirty
from pvmig.hv.memory import frame_hashes
from pvmig.migration import policy, wire

log = logging.getLogger(__name__)
PARTIAL = "partial-images"  # under the agent's data dir: MIGRATION.json, the paths


@dataclass
class DiskCopy:
    """One disk arriving: its image (the one blkback will serve) and what is held."""

    devid: int
    image: DiskImage
    gens: np.ndarray      # u32 per block: the generation of the copy held
    written: np.ndarray   # u8 per block: written here (else still the fresh image's zeros)
    unhashed: np.ndarray  # u8 per block: written since it was last hashed
    hashes: np.ndarray    # u64 per block, as of its last write
    lock: threading.Lock = field(default_factory=threading.Lock)
    received_bytes: int = 0

    @classmethod
    def of(cls, devid: int, image: DiskImage) -> "DiskCopy":
        n = image.blocks
        zero = frame_hashes(np.zeros((1, BLOCK_SIZE // 8), np.uint64))[0]
        return cls(devid, image, np.zeros(n, np.uint32), np.zeros(n, np.uint8),
                   np.zeros(n, np.uint8), np.full(n, zero, np.uint64))  # a fresh image

    def apply(self, blocks: np.ndarray, zero: np.ndarray, gens: np.ndarray,
              rows: np.ndarray) -> int:
        """Keep what is not older than the copy held (in a data connection's thread);
        the blocks kept."""
        nb = len(blocks)
        with self.lock:  # the check and the write as one, against the other connections
            keep = gens[:nb] >= self.gens[blocks]
            keep_zero = (gens[nb:] >= self.gens[zero]) & (self.written[zero] != 0)
            kept, kept_zero = blocks[keep], zero[keep_zero]
            self.image.write_rows(kept, rows[keep] if not keep.all() else rows)
            if len(kept_zero):  # a block zeroed since an earlier copy (fresh ones are zero)
                self.image.write_rows(kept_zero, np.zeros((len(kept_zero), BLOCK_SIZE),
                                                          np.uint8))
            self.gens[blocks] = np.maximum(self.gens[blocks], gens[:nb])
            self.gens[zero] = np.maximum(self.gens[zero], gens[nb:])
            self.written[kept] = 1
            # after the writes, as log-dirty: a block is hashed after its last write
            self.unhashed[kept] = 1
            self.unhashed[kept_zero] = 1
            self.received_bytes += nb * BLOCK_SIZE
        return len(kept) + len(kept_zero)

    def hash_pending(self) -> None:
        blocks = logdirty.take(self.unhashed)  # cleared first: a later write marks again
        if len(blocks):
            self.hashes[blocks] = self.image.block_hashes(blocks)


class StorageTarget:
    """The disks of one incoming migration (RestoreSession.storage)."""

    def __init__(self, paths: list[Path], record: Path, fills_up: bool = False) -> None:
        self.paths = paths  # the images this migration created (deleted if discarded)
        self.record = record  # their names, for a restart after a crash (PARTIAL)
        self.disks: dict[int, DiskCopy] = {}
        self.fills_up = fills_up  # (the injection point storage-fills-up)

    @classmethod
    def create(cls, host, migration_id: str, configs: list[dict],
               fills_up: bool = False) -> "StorageTarget":
        """A new image for each disk, or a refusal that leaves nothing behind."""
        storage_dir, host_name = host.storage_dir, host.name
        vbds = [c for c in configs if c.get("kind", "vbd") == "vbd"]
        if not vbds:
            raise errors.InvalidArgument("--copy-storage: the domain has no disk to copy")
        paths = [disk_path(c["disk"], storage_dir) for c in vbds]
        for c, path in zip(vbds, paths):
            if path.exists():
                raise errors.FailedPrecondition(
                    f"disk image {path} already exists on {host_name}: shared storage "
                    "(migrate without --copy-storage), or a copy left by an earlier "
                    "migration (that one's source keeps its image unless "
                    "--remove-source-storage): remove it first")
        # each file system the disks go on, asked before anything is made there
        need: dict[int, tuple[Path, int]] = {}
        for c, path in zip(vbds, paths):
            where = _existing(path.parent)
            dev = os.stat(where).st_dev
            need[dev] = (where, need.get(dev, (where, 0))[1] + int(c["blocks"]) * BLOCK_SIZE)
        for where, nbytes in need.values():
            free = shutil.disk_usage(where).free
            if nbytes + policy.STORAGE_HEADROOM_BYTES > free:
                raise errors.ResourceExhausted(
                    f"{host_name}'s storage at {where} has {free / 2**20:.1f} MiB free; the "
                    f"disks to copy there need {nbytes / 2**20:.1f} MiB (and "
                    f"{policy.STORAGE_HEADROOM_BYTES >> 20} MiB to spare): refused before "
                    "the copy")
        record = host.data_dir / PARTIAL / f"{migration_id}.json"
        try:
            _write_record(record, paths)  # before the first image: a crash finds it
        except OSError as e:
            raise errors.FailedPrecondition(
                f"{host_name} cannot record the images it is to make in {record.parent}: "
                f"{e.strerror}") from None
        target = cls([], record, fills_up)
        try:
            for c, path in zip(vbds, paths):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                target.paths.append(path)
                os.close(fd)
                image = DiskImage(path, int(c["blocks"]))
                try:
                    image.preallocate()
                except OSError as e:
                    raise errors.ResourceExhausted(
                        f"{host_name}'s storage at {path.parent} cannot hold disk {c['disk']!r} "
                        f"({int(c['blocks']) * BLOCK_SIZE / 2**20:.1f} MiB): {e.strerror}: "
                        "refused before the copy") from None
                finally:
                    image.close()
        except FileExistsError as e:
            target.delete()
            raise errors.FailedPrecondition(f"disk image {e.filename} appeared on "
                                            f"{host_name} meanwhile: refused") from None
        except OSError as e:  # a directory it may not write, a quota
            target.delete()
            raise errors.FailedPrecondition(
                f"{host_name} cannot make disk image {e.filename or ''}: {e.strerror}: "
                "refused before the copy") from None
        except BaseException:
            target.delete()
            raise
        return target

    def attach(self, disks: dict[int, DiskImage]) -> None:
        """The images as the domain's devices opened them (blkback's, later)."""
        self.disks = {devid: DiskCopy.of(devid, image) for devid, image in disks.items()}

    def receive(self, conn, h: wire.Header, buf: np.ndarray) -> int:
        """A DISK or DISK_SYNC record, in a data connection's thread: the blocks it
        carried (counted in the round as pages are)."""
        disk = self.disks.get(h.device)
        if disk is None:
            raise errors.InvalidArgument(f"disk batch for device {h.device}: this migration "
                                         f"copies {sorted(self.disks)}")
        blocks, zero, gens, rows = wire.read_blocks(conn, h, buf, disk.image.blocks)
        try:
            if self.fills_up and len(blocks) and int(blocks[-1]) >= disk.image.blocks // 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.apply(blocks, zero, gens, rows)
        except OSError as e:
            raise errors.ResourceExhausted(
                f"writing disk {disk.image.path} at the destination: {e.strerror} (the copy "
                "stops; the migration aborts and the partial image is deleted)") from None
        return len(blocks) + len(zero)

    def hash_pending(self) -> None:
        for disk in self.disks.values():
            disk.hash_pending()

    def hashes(self) -> np.ndarray:
        """Every disk's block hashes as of resume, in devid order."""
        return np.concatenate([self.disks[d].hashes for d in sorted(self.disks)])

    @property
    def received_bytes(self) -> int:
        return sum(d.received_bytes for d in self.disks.values())

    def delete(self) -> None:
        """The images this migration created (a discard: the source's stay)."""
        _delete(self.paths)
        self.paths = []
        self.record.unlink(missing_ok=True)

    def keep(self) -> None:
        """Committed: the images are the domain's disks now."""
        self.paths = []
        self.record.unlink(missing_ok=True)


def discard_partial(host) -> list[str]:
    """At start: the images of migrations this agent was receiving when it stopped and
    never committed, deleted (a committed one's are its domain's). The migrations."""
    found = []
    for record in sorted((host.data_dir / PARTIAL).glob("*.json")):
        migration_id = record.stem
        if host.commits.read(migration_id, Role.DESTINATION) is None:
            try:
                paths = [Path(p) for p in json.loads(record.read_text())]
            except (OSError, ValueError) as e:
                log.error("unreadable record of partial images %s (%s): left as it is",
                          record, e)
                continue
            log.warning("migration %s: never committed here before this agent stopped: "
                        "deleting its partial disk image(s) %s", migration_id,
                        ", ".join(map(str, paths)))
            _delete(paths)
            found.append(migration_id)
        record.unlink(missing_ok=True)
    return found


def _existing(path: Path) -> Path:
    """The path, or its nearest ancestor that exists (where a new file would go)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_record(record: Path, paths: list[Path]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump([str(p) for p in paths], f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, record)


def _delete(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
            log.info("deleted the partial disk image %s", path)
        except FileNotFoundError:
            pass

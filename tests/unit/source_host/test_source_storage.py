"""The save side of a storage migration (source_host/storage.py), on real disk images:
the first round takes every block, a round that fails gives its blocks back, the sealed
logs say what came after the final pass, and the write-blocking mirror clears a block's
mark once the destination holds its latest write, or breaks back to the log."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from pvmig.dom0.disk import BLOCK_SIZE, BlockLog, DiskImage
from pvmig.migration import wire
from pvmig.migration.policy import StorageMode
from source_host.storage import LATE, StorageCopy

pytestmark = pytest.mark.timeout(30)


class _Backend:
    """What StorageCopy reads of a BlkBack: its write latencies."""

    def __init__(self, write_ns=()):
        self.stats = SimpleNamespace(write_ns=deque(write_ns, maxlen=8192))


@pytest.fixture
def devices(tmp_path):
    """Two disks (devids 768 of 16 blocks and 5 of 8, listed out of order) and their
    backends, as DomainDevices has them."""
    disks = {768: DiskImage(tmp_path / "xvdb.img", 16), 5: DiskImage(tmp_path / "xvda.img", 8)}
    backends = {768: (_Backend(), None), 5: (_Backend(), None)}
    yield SimpleNamespace(disks=disks, backends=backends)
    for image in disks.values():
        image.close()


def _data(v: int) -> bytes:
    return bytes([v]) * BLOCK_SIZE


def _start(devices, mode=StorageMode.BACKGROUND, **kw) -> StorageCopy:
    return StorageCopy.start(devices, mode, **kw)


# ---- start, take, again


def test_start_puts_a_log_on_each_disk_in_devid_order(devices):
    devices.backends[5][0].stats.write_ns.extend([10, 20])  # before the migration
    copy = _start(devices)
    assert [d.devid for d in copy.disks] == [5, 768]
    for d in copy.disks:
        assert isinstance(d.log, BlockLog) and d.image.log is d.log
        assert len(d.log.dirty) == d.image.blocks and d.backend is devices.backends[d.devid][0]
        assert d.view.shape == (d.image.blocks, BLOCK_SIZE)
    assert copy.size == 24 * BLOCK_SIZE
    assert copy.paths == [devices.disks[5].path, devices.disks[768].path]
    assert copy.write_latency() == (0, 0, 0)  # latency counts from the start


def test_a_disk_without_a_backend_is_copied_all_the_same(devices):
    del devices.backends[768]
    copy = _start(devices)
    assert [d.backend is None for d in copy.disks] == [False, True]
    assert [len(b) for _, b in copy.take(first=True)] == [8, 16]


def test_the_first_take_gives_every_block_and_clears_the_marks(devices):
    copy = _start(devices)
    devices.disks[768].write(3, _data(1))
    devices.disks[5].write(7, _data(1))
    assert copy.count() == 2
    taken = copy.take(first=True)
    assert [(d.devid, b.dtype, b.tolist()) for d, b in taken] == [
        (5, np.uint32, list(range(8))), (768, np.uint32, list(range(16)))]
    assert copy.count() == 0  # in this copy already: not again
    assert [b.tolist() for _, b in copy.take(first=False)] == [[], []]


def test_a_later_take_gives_what_was_written_since(devices):
    copy = _start(devices)
    copy.take(first=True)
    for b in (9, 2, 9):
        devices.disks[768].write(b, _data(b))
    devices.disks[5].write(0, _data(1))
    taken = copy.take(first=False)
    assert [b.tolist() for _, b in taken] == [[0], [2, 9]]
    assert copy.count() == 0


def test_again_gives_a_failed_round_s_blocks_to_the_next(devices):
    copy = _start(devices)
    devices.disks[768].write(4, _data(4))
    taken = copy.take(first=False)
    devices.disks[768].write(11, _data(11))  # written while the round ran
    copy.again(taken)
    assert copy.count() == 2
    assert [b.tolist() for _, b in copy.take(first=False)] == [[], [4, 11]]
    first = copy.take(first=True)
    copy.again(first)  # a first round that did not get through: every block again
    assert copy.count() == 24


# ---- seal and late


def test_late_is_what_was_written_after_the_seal_per_block_of_every_disk(devices):
    copy = _start(devices)
    devices.disks[5].write(1, _data(1))
    assert not copy.late().any() and len(copy.late()) == 24  # not sealed: nothing late
    copy.seal()
    assert copy.sealed
    devices.disks[5].write(6, _data(6))
    devices.disks[768].write(0, _data(2))
    devices.disks[768].write(15, _data(2))
    late = copy.late()
    assert late.dtype == np.uint8 and len(late) == 8 + 16
    assert np.flatnonzero(late).tolist() == [6, 8 + 0, 8 + 15]
    assert (late[late != 0] == LATE).all()


def test_hashes_are_every_block_of_every_disk_in_devid_order(devices):
    copy = _start(devices)
    devices.disks[768].write(2, _data(7))
    h = copy.hashes()
    assert h.tolist() == (devices.disks[5].block_hashes().tolist()
                          + devices.disks[768].block_hashes().tolist())
    assert h[8 + 2] != h[8 + 3] == h[0]


def test_stop_takes_the_logs_off(devices):
    copy = _start(devices)
    copy.stop()
    assert all(image.log is None for image in devices.disks.values())
    assert devices.disks[5].write(1, _data(1)) == 0
    assert copy.count() == 0


# ---- write latency


def test_write_latency_is_the_percentiles_over_every_disk(devices):
    copy = _start(devices)
    devices.backends[5][0].stats.write_ns.extend(range(1, 51))
    devices.backends[768][0].stats.write_ns.extend(range(51, 101))
    lat = np.arange(1, 101)
    assert copy.write_latency() == (int(np.percentile(lat, 50)), int(np.percentile(lat, 99)),
                                    100)
    assert copy.write_latency()[:2] == (50, 99)
    s = SimpleNamespace()
    copy.stats(s)
    assert (s.write_p50_ns, s.write_p99_ns, s.writes) == (50, 99, 100)
    assert (s.mirrored_writes, s.mirror_broken) == (0, "")


# ---- the write-blocking mirror


class _Stream:
    """A DataStream's write_through: records each write; fails when told; runs `meanwhile`
    (another guest write) while the write is on its way."""

    def __init__(self, fail: Exception | None = None, meanwhile=None):
        self.writes, self.fail, self.meanwhile = [], fail, meanwhile

    async def write_through(self, devid, block, gen, data):
        if self.meanwhile is not None:
            self.meanwhile()
        if self.fail is not None:
            raise self.fail
        self.writes.append((devid, block, gen, bytes(data)))
        return wire.Sent(1, 0, wire.HEADER.size + 8 + len(data))


def _guest_write(image: DiskImage, block: int, data: bytes) -> None:
    """As blkback: the write, then the mirror before the response."""
    gen = image.write(block, data)
    if image.mirror is not None:
        asyncio.run(image.mirror(block, gen, data))


def test_the_mirror_is_on_only_in_write_blocking_mode(devices):
    copy = _start(devices, StorageMode.BACKGROUND)
    copy.mirror_on(_Stream())
    assert all(image.mirror is None for image in devices.disks.values())
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    copy.mirror_on(_Stream())
    assert all(image.mirror is not None for image in devices.disks.values())
    copy.mirror_off()
    assert all(image.mirror is None for image in devices.disks.values())


def test_the_mirror_stays_off_once_sealed(devices):
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    copy.mirror_on(_Stream())
    copy.seal()
    assert all(image.mirror is None for image in devices.disks.values())
    copy.mirror_on(_Stream())
    assert all(image.mirror is None for image in devices.disks.values())


def test_a_write_held_by_the_destination_is_not_dirty(devices):
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    copy.take(first=True)
    stream = _Stream()
    copy.mirror_on(stream)
    image = devices.disks[768]
    _guest_write(image, 6, _data(0x66))
    _guest_write(image, 6, _data(0x67))
    assert stream.writes == [(768, 6, 1, _data(0x66)), (768, 6, 2, _data(0x67))]
    assert copy.count() == 0 and copy.mirrored == 2
    assert image.read(6) == _data(0x67)


def test_a_block_written_again_meanwhile_stays_dirty(devices):
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    copy.take(first=True)
    image = devices.disks[5]
    stream = _Stream(meanwhile=lambda: image.write(3, _data(0x33)) if image.log.gens[3] < 2
                     else None)
    copy.mirror_on(stream)
    _guest_write(image, 3, _data(0x30))  # generation 1 held; 2 written on the way
    assert stream.writes == [(5, 3, 1, _data(0x30))]
    assert [b.tolist() for _, b in copy.take(first=False)] == [[3], []]
    assert copy.mirrored == 1


def test_a_broken_mirror_falls_back_to_the_log(devices):
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    copy.take(first=True)
    copy.mirror_on(_Stream(fail=ConnectionResetError("reset by peer")))
    image = devices.disks[768]
    _guest_write(image, 9, _data(9))  # the guest's write stands all the same
    assert image.read(9) == _data(9)
    assert copy.mirror_broken == "reset by peer" and copy.mirrored == 0
    assert all(i.mirror is None for i in devices.disks.values())
    assert [b.tolist() for _, b in copy.take(first=False)] == [[], [9]]  # it goes in a round
    copy.mirror_on(_Stream())  # new connections: the mirror stays broken
    assert all(i.mirror is None for i in devices.disks.values())
    s = SimpleNamespace()
    copy.stats(s)
    assert s.mirror_broken == "reset by peer"


def test_a_mirror_turned_off_meanwhile_does_not_send(devices):
    copy = _start(devices, StorageMode.WRITE_BLOCKING)
    stream = _Stream()
    copy.mirror_on(stream)
    image = devices.disks[5]
    call = image.mirror
    copy.mirror_off()  # (a reconnect, or the seal) between the write and its mirror
    gen = image.write(2, _data(2))
    asyncio.run(call(2, gen, _data(2)))
    assert stream.writes == [] and copy.count() == 1 and copy.mirrored == 0


# ---- storage-holds-halfway


def test_hold_stops_the_first_round_at_half_the_disk_until_the_end(devices):
    copy = _start(devices, hold_halfway=True)  # the first disk, devid 5: 8 blocks
    copy.hold(np.arange(0, 4, dtype=np.uint32))  # below half: goes on
    copy.hold(np.empty(0, np.uint32))
    done = threading.Event()
    t = threading.Thread(target=lambda: (copy.hold(np.arange(2, 6, dtype=np.uint32)),
                                         done.set()))
    t.start()
    assert not done.wait(0.1)  # held
    copy.stop()
    t.join(5)
    assert done.is_set() and not t.is_alive()


def test_hold_does_nothing_without_the_injection(devices):
    copy = _start(devices)
    copy.hold(np.arange(0, 16, dtype=np.uint32))  # returns at once


def test_mirrored_writes_count_their_bytes_and_a_closed_mirror_is_no_breakage(tmp_path):
    """What each write through put on the wire is counted (the report, the metrics); a
    write whose stream was closed on purpose (a reconnect, the final pass) fails
    without marking the mirror broken."""
    image = DiskImage(tmp_path / "d.img", 8)
    devices = SimpleNamespace(disks={0: image}, backends={})
    copy = StorageCopy.start(devices, StorageMode.WRITE_BLOCKING)
    seen = []
    copy.on_sent = seen.append
    stream = _Stream()
    copy.mirror_on(stream)
    _guest_write(image, 3, bytes([7]) * BLOCK_SIZE)
    assert copy.mirrored == 1 and copy.mirrored_bytes == seen[0] > BLOCK_SIZE
    assert copy.count() == 0  # held at the destination: not dirty

    closing = _Stream(fail=RuntimeError("closed"),
                      meanwhile=lambda: copy.mirror_off())  # closed while on its way
    copy.mirror_on(closing)
    _guest_write(image, 4, bytes([9]) * BLOCK_SIZE)
    assert copy.mirror_broken == "" and copy.count() == 1  # block 4: for the next round
    image.close()

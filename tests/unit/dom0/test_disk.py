"""A disk image and its dirty-block log (pvmig/dom0/disk.py), on real files: a write
is in the image before it is marked, each write counts a generation, a take clears what
it returns, an acknowledgement clears only the generation it names, the sealed log
remembers what came after, and rows go in by runs."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pvmig import errors
from pvmig.dom0 import disk as disk_mod
from pvmig.dom0.disk import BLOCK_SIZE, BlockLog, DiskImage
from pvmig.hv.memory import frame_hashes

pytestmark = pytest.mark.timeout(30)

BLOCKS = 64


@pytest.fixture
def image(tmp_path):
    img = DiskImage(tmp_path / "disk.img", BLOCKS)
    yield img
    img.close()


def _block(value: int) -> bytes:
    return bytes([value]) * BLOCK_SIZE


def _on_disk(path, block: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * BLOCK_SIZE)
        return f.read(BLOCK_SIZE)


# ---- BlockLog


def test_a_fresh_log_is_empty():
    log = BlockLog(16)
    assert log.count() == 0 and log.writes == 0 and log.late is None
    taken = log.take()
    assert taken.dtype == np.uint32 and taken.tolist() == []
    assert (log.gens == 0).all()


def test_mark_counts_a_generation_per_write_of_each_block():
    log = BlockLog(16)
    assert [log.mark(3), log.mark(3), log.mark(9), log.mark(3)] == [1, 2, 1, 3]
    assert log.gens[3] == 3 and log.gens[9] == 1 and log.gens[0] == 0
    assert log.writes == 4
    assert log.count() == 2  # blocks, not writes
    assert log.count() == 2  # a peek: nothing cleared


def test_take_returns_the_marked_blocks_ascending_and_clears_only_them():
    log = BlockLog(32)
    for b in (20, 4, 31, 4, 0):
        log.mark(b)
    taken = log.take()
    assert taken.dtype == np.uint32 and taken.tolist() == [0, 4, 20, 31]
    assert log.count() == 0 and log.take().tolist() == []
    log.mark(4)  # written again after the take: in the next one
    assert log.take().tolist() == [4]
    assert log.gens[4] == 3  # the generations are kept across takes


def test_held_clears_the_mark_only_for_the_current_generation():
    log = BlockLog(8)
    g = log.mark(5)
    log.mark(6)
    log.held(5, g)
    assert log.dirty[5] == 0 and log.dirty[6] == 1
    g1 = log.mark(2)
    log.mark(2)  # written again before the acknowledgement of g1 came
    log.held(2, g1)
    assert log.dirty[2] == 1  # the copy held is older: the block goes again
    assert log.take().tolist() == [2, 6]


def test_seal_remembers_only_what_is_written_after_it():
    log = BlockLog(8)
    log.mark(1)
    log.seal()
    assert log.late is not None and not log.late.any()
    log.mark(3)
    log.mark(3)
    log.mark(7)
    assert np.flatnonzero(log.late).tolist() == [3, 7]
    assert log.take().tolist() == [1, 3, 7]  # still marked dirty as well
    assert np.flatnonzero(log.late).tolist() == [3, 7]  # a take leaves late alone


# ---- DiskImage: opening


def test_a_new_image_has_its_size_and_reads_zeros(tmp_path):
    img = DiskImage(tmp_path / "d.img", 10)
    try:
        assert img.size == 10 * BLOCK_SIZE
        assert os.path.getsize(tmp_path / "d.img") == img.size
        assert img.read(9) == bytes(BLOCK_SIZE)
    finally:
        img.close()


def test_reopening_keeps_the_content_and_fresh_empties_it(tmp_path):
    path = tmp_path / "d.img"
    img = DiskImage(path, 4)
    img.write(2, _block(0x5A))
    img.close()
    again = DiskImage(path, 4)
    assert again.read(2) == _block(0x5A)
    again.close()
    fresh = DiskImage(path, 4, fresh=True)
    assert fresh.read(2) == bytes(BLOCK_SIZE)
    assert os.path.getsize(path) == 4 * BLOCK_SIZE
    fresh.close()


@pytest.mark.parametrize("blocks", [0, -1])
def test_a_disk_of_no_blocks_is_refused(tmp_path, blocks):
    with pytest.raises(errors.InvalidArgument, match="at least one block"):
        DiskImage(tmp_path / "d.img", blocks)
    assert not (tmp_path / "d.img").exists()


# ---- DiskImage: writes and the log


def test_a_write_without_a_log_returns_generation_0(image):
    assert image.write(7, _block(1)) == 0
    assert _on_disk(image.path, 7) == _block(1)


def test_a_write_with_a_log_returns_its_generation_and_marks_it(image):
    image.log = BlockLog(BLOCKS)
    assert image.write(7, _block(1)) == 1
    assert image.write(7, _block(2)) == 2
    assert image.write(8, _block(3)) == 1
    assert image.log.writes == 3 and image.log.take().tolist() == [7, 8]
    assert image.read(7) == _block(2) and _on_disk(image.path, 8) == _block(3)


def test_a_write_is_in_the_image_before_it_is_marked(image, monkeypatch):
    """As log-dirty: a take that sees the mark reads the new data."""
    image.log = BlockLog(BLOCKS)
    seen = []
    real_mark = image.log.mark

    def mark(block):
        seen.append((block, _on_disk(image.path, block)))
        return real_mark(block)

    monkeypatch.setattr(image.log, "mark", mark)
    image.write(11, _block(0x77))
    assert seen == [(11, _block(0x77))]


@pytest.mark.parametrize("block", [-1, BLOCKS, BLOCKS + 100])
def test_a_block_outside_the_disk_is_refused(image, block):
    image.log = BlockLog(BLOCKS)
    with pytest.raises(errors.InvalidArgument, match=f"block {block} is outside disk disk.img"):
        image.write(block, _block(1))
    with pytest.raises(errors.InvalidArgument, match="outside"):
        image.read(block)
    assert image.log.writes == 0
    assert os.path.getsize(image.path) == image.size


@pytest.mark.parametrize("length", [0, 512, BLOCK_SIZE - 1, BLOCK_SIZE + 1])
def test_a_write_of_the_wrong_length_is_refused(image, length):
    image.log = BlockLog(BLOCKS)
    with pytest.raises(errors.InvalidArgument, match=f"not {length}"):
        image.write(3, b"\x01" * length)
    assert image.read(3) == bytes(BLOCK_SIZE) and image.log.count() == 0


# ---- write_rows


def test_write_rows_puts_each_row_in_its_block_and_nothing_else(image):
    for b in range(BLOCKS):
        image.write(b, _block(0xA5))
    image.log = BlockLog(BLOCKS)
    blocks = np.array([0, 1, 2, 10, 30, 31, 63], np.uint32)
    rows = np.random.default_rng(3).integers(0, 256, (len(blocks), BLOCK_SIZE), np.uint8)
    image.write_rows(blocks, rows)
    for b, row in zip(blocks.tolist(), rows):
        assert _on_disk(image.path, b) == row.tobytes()
    others = np.setdiff1d(np.arange(BLOCKS), blocks)
    assert all(_on_disk(image.path, b) == _block(0xA5) for b in others.tolist())
    assert image.log.count() == 0 and image.log.writes == 0  # the destination's: unmarked


def test_write_rows_writes_one_pwritev_per_run(image, monkeypatch):
    calls = []
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        calls.append((offset // BLOCK_SIZE, sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(disk_mod.os, "pwritev", pwritev)
    blocks = np.array([4, 5, 6, 9, 20, 21], np.uint32)
    rows = np.arange(len(blocks), dtype=np.uint8)[:, None].repeat(BLOCK_SIZE, 1) + 1
    image.write_rows(blocks, rows)
    assert calls == [(4, 3 * BLOCK_SIZE), (9, BLOCK_SIZE), (20, 2 * BLOCK_SIZE)]
    assert [image.read(b)[0] for b in blocks.tolist()] == [1, 2, 3, 4, 5, 6]


def test_write_rows_goes_on_after_a_short_write(image, monkeypatch):
    real = os.pwritev

    def short(fd, buffers, offset):  # at most one block a call
        return real(fd, [memoryview(buffers[0])[:BLOCK_SIZE]], offset)

    monkeypatch.setattr(disk_mod.os, "pwritev", short)
    rows = np.stack([np.full(BLOCK_SIZE, v, np.uint8) for v in (7, 8, 9)])
    image.write_rows(np.array([1, 2, 3], np.uint32), rows)
    assert [image.read(b) for b in (1, 2, 3)] == [_block(7), _block(8), _block(9)]


def test_write_rows_of_nothing_writes_nothing(image, monkeypatch):
    monkeypatch.setattr(disk_mod.os, "pwritev", lambda *a: pytest.fail("written"))
    image.write_rows(np.empty(0, np.uint32), np.empty((0, BLOCK_SIZE), np.uint8))


def test_write_rows_refuses_a_block_outside_the_disk_before_writing(image):
    rows = np.full((2, BLOCK_SIZE), 9, np.uint8)
    with pytest.raises(errors.InvalidArgument, match=f"block {BLOCKS} is outside"):
        image.write_rows(np.array([3, BLOCKS], np.uint32), rows)
    assert image.read(3) == bytes(BLOCK_SIZE)
    assert os.path.getsize(image.path) == image.size


# ---- view, hashes, preallocate


def test_view_maps_the_image_read_only_and_sees_later_writes(image):
    view = image.view()
    assert view.shape == (BLOCKS, BLOCK_SIZE) and view.dtype == np.uint8
    image.write(12, _block(0x42))
    image.write_rows(np.array([40], np.uint32), np.full((1, BLOCK_SIZE), 0x43, np.uint8))
    assert (view[12] == 0x42).all() and (view[40] == 0x43).all() and not view[13].any()
    with pytest.raises(ValueError):
        view[0, 0] = 1


def test_block_hashes_follow_the_content(image):
    zero = frame_hashes(np.zeros((1, BLOCK_SIZE // 8), np.uint64))[0]
    h0 = image.block_hashes()
    assert h0.dtype == np.uint64 and len(h0) == BLOCKS and (h0 == zero).all()
    image.write(5, _block(1))
    image.write(6, _block(1))
    image.write(7, _block(2))
    h1 = image.block_hashes()
    assert h1[5] == h1[6] != h1[7]
    assert h1[5] != zero and h1[7] != zero
    assert (np.delete(h1, [5, 6, 7]) == zero).all()
    some = np.array([7, 0, 5], np.uint32)  # any order, as asked
    assert image.block_hashes(some).tolist() == h1[some].tolist()
    run = np.arange(4, 9, dtype=np.uint32)
    assert image.block_hashes(run).tolist() == h1[4:9].tolist()


def test_preallocate_reserves_every_block(tmp_path):
    img = DiskImage(tmp_path / "big.img", 256)
    try:
        before = os.stat(img.path).st_blocks * 512
        img.preallocate()
        after = os.stat(img.path).st_blocks * 512
        if after == before == 0:
            pytest.skip("this filesystem cannot preallocate")
        assert before < img.size <= after
        assert img.read(100) == bytes(BLOCK_SIZE)  # still reads as zeros
    finally:
        img.close()


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_preallocate_passes_where_the_filesystem_cannot_say(image, monkeypatch, code):
    def fallocate(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_mod.os, "posix_fallocate", fallocate)
    image.preallocate()


def test_preallocate_raises_when_the_disk_does_not_fit(image, monkeypatch):
    def fallocate(fd, offset, length):
        assert (offset, length) == (0, image.size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_mod.os, "posix_fallocate", fallocate)
    with pytest.raises(OSError) as e:
        image.preallocate()
    assert e.value.errno == errno.ENOSPC

"""The destination's side of a storage migration (dest_host/storage.py), on real files
and a real socket pair: a block is kept only if it is not older than the copy held, a
zero block is written only over what this side wrote, hashes follow the writes; the
images are made whole or refused leaving nothing, and deleted only if made here."""

from __future__ import annotations

import errno
import os
from collections import namedtuple

import numpy as np
import pytest
from support import send_in_thread

from dest_host import storage
from dest_host.storage import DiskCopy, StorageTarget
from pvmig import errors
from pvmig.dom0 import disk as disk_mod
from pvmig.dom0.disk import BLOCK_SIZE, BlockLog, DiskImage
from pvmig.migration import policy, wire

pytestmark = pytest.mark.timeout(60)

BLOCKS = 64
LIMIT = 32


def _rows(*values: int) -> np.ndarray:
    return np.stack([np.full(BLOCK_SIZE, v, np.uint8) for v in values])


def _u32(*values: int) -> np.ndarray:
    return np.array(values, np.uint32)


NONE = np.empty(0, np.uint32)
NO_ROWS = np.empty((0, BLOCK_SIZE), np.uint8)


@pytest.fixture
def copy(tmp_path):
    image = DiskImage(tmp_path / "dst.img", BLOCKS)
    yield DiskCopy.of(3, image)
    image.close()


# ---- DiskCopy.apply


def test_a_fresh_copy_holds_nothing_and_hashes_as_the_zeros_it_is(copy):
    assert copy.devid == 3 and not copy.gens.any() and not copy.written.any()
    assert not copy.unhashed.any() and copy.received_bytes == 0
    assert copy.hashes.tolist() == copy.image.block_hashes().tolist()


def test_blocks_land_and_are_marked_written_and_unhashed(copy):
    kept = copy.apply(_u32(1, 2, 9), NONE, _u32(4, 1, 2), _rows(0x11, 0x22, 0x99))
    assert kept == 3
    assert [copy.image.read(b)[0] for b in (1, 2, 9)] == [0x11, 0x22, 0x99]
    assert copy.image.read(3) == bytes(BLOCK_SIZE)
    assert copy.gens[[1, 2, 9]].tolist() == [4, 1, 2] and copy.gens.sum() == 7
    assert np.flatnonzero(copy.written).tolist() == [1, 2, 9]
    assert np.flatnonzero(copy.unhashed).tolist() == [1, 2, 9]
    assert copy.received_bytes == 3 * BLOCK_SIZE


def test_an_older_copy_of_a_block_is_dropped_a_newer_or_equal_one_kept(copy):
    copy.apply(_u32(5), NONE, _u32(3), _rows(0x33))
    copy.unhashed[:] = 0
    assert copy.apply(_u32(5), NONE, _u32(2), _rows(0x22)) == 0  # a round's, crossed
    assert copy.image.read(5)[0] == 0x33 and copy.gens[5] == 3 and not copy.unhashed.any()
    assert copy.apply(_u32(5), NONE, _u32(3), _rows(0x3A)) == 1  # the same generation
    assert copy.image.read(5)[0] == 0x3A
    assert copy.apply(_u32(5), NONE, _u32(4), _rows(0x44)) == 1
    assert copy.image.read(5)[0] == 0x44 and copy.gens[5] == 4 and copy.unhashed[5] == 1
    assert copy.received_bytes == 4 * BLOCK_SIZE  # received, kept or not


def test_a_batch_keeps_exactly_its_blocks_not_older_than_held(copy):
    copy.apply(_u32(2, 4, 6), NONE, _u32(5, 5, 5), _rows(1, 1, 1))
    kept = copy.apply(_u32(1, 2, 3, 4, 6), NONE, _u32(1, 4, 1, 6, 5), _rows(10, 20, 30, 40, 60))
    assert kept == 4
    assert [copy.image.read(b)[0] for b in range(1, 7)] == [10, 1, 30, 40, 0, 60]
    assert copy.gens[:7].tolist() == [0, 1, 5, 1, 6, 0, 5]


def test_a_zero_block_is_not_written_where_this_side_never_wrote(copy):
    """The fresh image is zeros there already: the block is not touched."""
    copy.image.write(7, b"\x77" * BLOCK_SIZE)  # (not through apply: so we would see a write)
    assert copy.apply(NONE, _u32(7), _u32(2), NO_ROWS) == 0
    assert copy.image.read(7)[0] == 0x77
    assert copy.gens[7] == 2  # the copy held is of that generation all the same
    assert not copy.unhashed.any() and not copy.written.any()


def test_a_zero_block_clears_what_this_side_wrote(copy):
    copy.apply(_u32(7, 8), NONE, _u32(1, 1), _rows(0x77, 0x88))
    copy.unhashed[:] = 0
    assert copy.apply(_u32(8), _u32(7), _u32(2, 2), _rows(0x8A)) == 2
    assert copy.image.read(7) == bytes(BLOCK_SIZE) and copy.image.read(8)[0] == 0x8A
    assert np.flatnonzero(copy.unhashed).tolist() == [7, 8]
    assert copy.gens[[7, 8]].tolist() == [2, 2]


def test_an_older_zero_block_does_not_clear_a_newer_copy(copy):
    copy.apply(_u32(7), NONE, _u32(3), _rows(0x77))
    copy.unhashed[:] = 0
    assert copy.apply(NONE, _u32(7), _u32(2), NO_ROWS) == 0
    assert copy.image.read(7)[0] == 0x77 and copy.gens[7] == 3 and not copy.unhashed.any()


def test_hash_pending_brings_the_hashes_to_the_image(copy):
    rng = np.random.default_rng(5)
    copy.apply(_u32(0, 1, 2, 30, 63), NONE, _u32(1, 1, 1, 1, 1),
               rng.integers(0, 256, (5, BLOCK_SIZE), np.uint8))
    assert copy.hashes.tolist() != copy.image.block_hashes().tolist()
    copy.hash_pending()
    assert copy.hashes.tolist() == copy.image.block_hashes().tolist()
    assert not copy.unhashed.any()
    copy.apply(_u32(1), _u32(30), _u32(2, 2), _rows(0x31))
    assert np.flatnonzero(copy.unhashed).tolist() == [1, 30]
    copy.hash_pending()
    assert copy.hashes.tolist() == copy.image.block_hashes().tolist()


def test_hash_pending_hashes_only_what_was_written(copy, monkeypatch):
    copy.apply(_u32(4, 9), NONE, _u32(1, 1), _rows(4, 9))
    asked = []
    real = copy.image.block_hashes

    def block_hashes(blocks=None):
        asked.append(None if blocks is None else blocks.tolist())
        return real(blocks)

    monkeypatch.setattr(copy.image, "block_hashes", block_hashes)
    copy.hash_pending()
    copy.hash_pending()  # nothing new: nothing read
    assert asked == [[4, 9]]


# ---- StorageTarget.create and delete


def _vbd(disk, devid=0, blocks=16):
    return {"kind": "vbd", "devid": devid, "disk": disk, "blocks": blocks}


_Host = namedtuple("_Host", "storage_dir name data_dir")


def _create(configs, storage_dir, name="hostb", fills_up=False):
    """StorageTarget.create for a host with that storage dir (its data dir beside)."""
    host = _Host(storage_dir, name, storage_dir.parent / f"{storage_dir.name}-agent-data")
    return StorageTarget.create(host, "m1", configs, fills_up=fills_up)


def _listing(d):
    return sorted(p.name for p in d.iterdir()) if d.exists() else None


def test_create_makes_each_disk_image_preallocated(tmp_path):
    sd = tmp_path / "storage"
    configs = [_vbd("a.img", 0, 16), {"kind": "vif", "devid": 0, "disk": ""},
               _vbd("b.img", 1, 300)]
    target = _create(configs, sd, "hostb")
    assert target.paths == [sd / "a.img", sd / "b.img"]
    assert _listing(sd) == ["a.img", "b.img"]
    for path, blocks in ((sd / "a.img", 16), (sd / "b.img", 300)):
        st = os.stat(path)
        assert st.st_size == blocks * BLOCK_SIZE
        assert st.st_mode & 0o777 == 0o600
        assert st.st_blocks * 512 >= st.st_size  # reserved whole, not sparse
        assert path.read_bytes() == bytes(st.st_size)
    assert target.disks == {} and not target.fills_up


def test_create_refuses_a_domain_with_no_disk(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="no disk to copy"):
        _create([{"kind": "vif", "devid": 0, "disk": ""}], tmp_path, "hostb")


def test_create_refuses_an_existing_image_and_leaves_it_untouched(tmp_path):
    existing = tmp_path / "b.img"
    existing.write_bytes(b"the guest's data")
    os.utime(existing, (1_000_000, 1_000_000))
    with pytest.raises(errors.FailedPrecondition) as e:
        _create([_vbd("a.img"), _vbd("b.img", 1)], tmp_path, "hostb")
    assert str(existing) in str(e.value) and "already exists on hostb" in str(e.value)
    assert existing.read_bytes() == b"the guest's data"
    assert os.stat(existing).st_mtime == 1_000_000
    assert _listing(tmp_path) == ["b.img"]  # a.img not made either


def test_create_refuses_an_existing_image_at_an_absolute_path(tmp_path):
    shared = tmp_path / "shared.img"
    shared.write_bytes(b"x" * BLOCK_SIZE)
    with pytest.raises(errors.FailedPrecondition, match=str(shared)):
        _create([_vbd(str(shared))], tmp_path / "storage", "hostb")
    assert shared.read_bytes() == b"x" * BLOCK_SIZE


def _free(monkeypatch, free_bytes):
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        return usage(1 << 40, 0, free_bytes)

    monkeypatch.setattr(storage.shutil, "disk_usage", disk_usage)


def test_create_refuses_disks_that_do_not_fit_and_makes_no_image(tmp_path, monkeypatch):
    need = (100 + 200) * BLOCK_SIZE
    _free(monkeypatch, need + policy.STORAGE_HEADROOM_BYTES - 1)
    with pytest.raises(errors.ResourceExhausted) as e:
        _create([_vbd("a.img", 0, 100), _vbd("b.img", 1, 200)], tmp_path, "hostb")
    assert "hostb's storage" in str(e.value) and "refused before the copy" in str(e.value)
    assert _listing(tmp_path) == []


def test_create_takes_disks_that_just_fit_with_the_headroom(tmp_path, monkeypatch):
    need = (100 + 200) * BLOCK_SIZE
    _free(monkeypatch, need + policy.STORAGE_HEADROOM_BYTES)
    target = _create([_vbd("a.img", 0, 100), _vbd("b.img", 1, 200)], tmp_path,
                                  "hostb")
    assert _listing(tmp_path) == ["a.img", "b.img"]
    target.delete()


def test_a_disk_the_filesystem_cannot_hold_leaves_nothing_behind(tmp_path, monkeypatch):
    """Space said free, then fallocate finds it is not (another writer, quotas)."""
    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_mod.os, "posix_fallocate", fallocate)
    with pytest.raises(errors.ResourceExhausted, match="cannot hold disk 'b.img'"):
        _create([_vbd("a.img", 0, 8), _vbd("b.img", 1, 8)], tmp_path, "hostb")
    assert calls == [8 * BLOCK_SIZE, 8 * BLOCK_SIZE]
    assert _listing(tmp_path) == []  # a.img, made, deleted too


def test_delete_removes_only_the_images_it_made(tmp_path):
    (tmp_path / "other.img").write_bytes(b"someone else's")
    target = _create([_vbd("a.img"), _vbd("b.img", 1)], tmp_path, "hostb")
    (tmp_path / "a.img").unlink()  # gone already: no matter
    target.delete()
    assert _listing(tmp_path) == ["other.img"]
    assert target.paths == []
    target.delete()  # twice: nothing more
    assert _listing(tmp_path) == ["other.img"]


def test_a_refused_create_deletes_nothing_it_did_not_make(tmp_path):
    """Two disks naming one image: the second finds the first there (O_EXCL)."""
    (tmp_path / "other.img").write_bytes(b"kept")
    with pytest.raises(errors.FailedPrecondition, match="appeared"):
        _create([_vbd("a.img"), _vbd("a.img", 1)], tmp_path, "hostb")
    assert _listing(tmp_path) == ["other.img"]


def test_a_disk_in_a_directory_not_there_yet_is_made_or_refused_cleanly(tmp_path):
    """Each disk's directory is made if missing (an absolute path elsewhere too)."""
    sd, elsewhere = tmp_path / "storage", tmp_path / "elsewhere"
    sd.mkdir()
    configs = [_vbd("a.img", 0, 8), _vbd(str(elsewhere / "b.img"), 1, 8)]
    try:
        target = _create(configs, sd, "hostb")
    except errors.PvmigError:
        assert _listing(sd) == [] and not (elsewhere / "b.img").exists()
    else:
        assert target.paths == [sd / "a.img", elsewhere / "b.img"]
        assert all(p.exists() for p in target.paths)
        target.delete()


# ---- StorageTarget.receive


@pytest.fixture
def target(tmp_path):
    """Disks 0 and 5 made by create, opened as the domain's devices would."""
    t = _create([_vbd("d0.img", 0, BLOCKS), _vbd("d5.img", 5, BLOCKS)], tmp_path / "dst")
    images = {0: DiskImage(t.paths[0], BLOCKS), 5: DiskImage(t.paths[1], BLOCKS)}
    t.attach(images)
    yield t
    for image in images.values():
        image.close()


@pytest.fixture
def source(tmp_path):
    img = DiskImage(tmp_path / "src.img", BLOCKS)
    img.log = BlockLog(BLOCKS)
    rng = np.random.default_rng(9)
    for b in range(BLOCKS):
        img.write(b, bytes(BLOCK_SIZE) if b % 8 == 7 else rng.bytes(BLOCK_SIZE))
    yield img
    img.close()


def _send(pair, source, blocks, device):
    out, _ = pair
    return send_in_thread(lambda: wire.send_blocks(
        out, source.view(), np.asarray(blocks, np.uint32), source.log.gens, device=device,
        seq=1, round=0, scratch=wire.Scratch(LIMIT)))


def _receive(pair, target, source, blocks, device=5):
    _, inp = pair
    t, box = _send(pair, source, blocks, device)
    try:
        return target.receive(inp, wire.read_header(inp), np.empty((LIMIT, BLOCK_SIZE),
                                                                    np.uint8))
    finally:
        t.join()


def test_receive_writes_a_batch_into_its_disk(pair, target, source):
    got = _receive(pair, target, source, range(0, 32), device=5)
    assert got == 32
    d5, d0 = target.disks[5], target.disks[0]
    assert np.array_equal(d5.image.view()[:32], source.view()[:32])
    assert not d5.image.view()[32:].any() and not d0.image.view().any()
    assert d5.gens[:32].tolist() == [1] * 32 and not d0.gens.any()
    assert target.received_bytes == (32 - 4) * BLOCK_SIZE  # the zero blocks: numbers only
    target.hash_pending()
    assert target.hashes().tolist() == (d0.image.block_hashes().tolist()
                                         + d5.image.block_hashes().tolist())


def test_receive_refuses_a_disk_this_migration_does_not_copy(pair, target, source):
    with pytest.raises(errors.InvalidArgument, match=r"device 9: this migration copies \[0, 5\]"):
        _receive(pair, target, source, [1], device=9)


def test_a_full_disk_stops_the_copy_past_its_half(pair, tmp_path, source):
    t = _create([_vbd("d.img", 2, BLOCKS)], tmp_path / "dst", "hostb",
                             fills_up=True)
    image = DiskImage(t.paths[0], BLOCKS)
    t.attach({2: image})
    try:
        assert _receive(pair, t, source, range(0, BLOCKS // 2), device=2) == BLOCKS // 2
        with pytest.raises(errors.ResourceExhausted) as e:
            _receive(pair, t, source, range(BLOCKS // 2, BLOCKS // 2 + 8), device=2)
        assert str(t.paths[0]) in str(e.value) and "No space left on device" in str(e.value)
        assert not image.view()[BLOCKS // 2:].any()  # nothing of that batch written
        assert np.array_equal(image.view()[:BLOCKS // 2], source.view()[:BLOCKS // 2])
        t.delete()
        assert not t.paths and _listing(tmp_path / "dst") == []
    finally:
        image.close()


# ---- a crash mid-copy: the next start deletes what was never committed


class _Commits:
    def __init__(self, committed=()):
        self.committed = set(committed)

    def read(self, migration_id, role):
        return object() if migration_id in self.committed else None


_Agent = namedtuple("_Agent", "storage_dir name data_dir commits")


@pytest.mark.parametrize("committed", [False, True])
def test_the_next_start_deletes_only_what_was_never_committed(tmp_path, committed):
    sd = tmp_path / "store"
    host = _Agent(sd, "hostb", tmp_path / "data", _Commits({"m1"} if committed else ()))
    target = StorageTarget.create(host, "m1", [_vbd("a.img"), _vbd("b.img", 1)])
    assert (tmp_path / "data" / storage.PARTIAL / "m1.json").exists()
    # (the agent dies here: nothing deletes or keeps them)
    found = storage.discard_partial(host)
    assert found == ([] if committed else ["m1"])
    assert all(p.exists() == committed for p in target.paths)
    assert not list((tmp_path / "data" / storage.PARTIAL).iterdir())


def test_keep_makes_the_images_the_domains(tmp_path):
    sd = tmp_path / "store"
    host = _Agent(sd, "hostb", tmp_path / "data", _Commits())
    target = StorageTarget.create(host, "m1", [_vbd("a.img")])
    target.keep()
    assert storage.discard_partial(host) == [] and (sd / "a.img").exists()
    target.delete()  # (kept: nothing of it is deleted any more)
    assert (sd / "a.img").exists()

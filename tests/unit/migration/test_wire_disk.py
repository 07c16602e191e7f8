"""DISK and DISK_SYNC records on a data channel (pvmig/migration/wire.py), over a real
socket pair: blocks of a real disk image with their generations, zero blocks as their
numbers only, the disk's devid in the header, and a bad record refused before its data
is read (or, damaged on the way, by its checksum)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from support import send_in_thread

from pvmig import errors
from pvmig.dom0.disk import BLOCK_SIZE, BlockLog, DiskImage
from pvmig.migration import wire
from pvmig.rpc.data_channel import Connection

pytestmark = pytest.mark.timeout(60)

BLOCKS = 128
LIMIT = 32  # the receiver's buffer, in blocks
DEVID = 51713  # xvda's devid: above 255, so the whole u16 is used


@pytest.fixture
def disk(tmp_path):
    """Random blocks, zero at 8-11 and 20, each written a known number of times (its
    generation): block b written (b % 3) + 1 times."""
    img = DiskImage(tmp_path / "src.img", BLOCKS)
    img.log = BlockLog(BLOCKS)
    rng = np.random.default_rng(11)
    for b in range(BLOCKS):
        for _ in range(b % 3 + 1):
            data = bytes(BLOCK_SIZE) if b in (8, 9, 10, 11, 20) else rng.bytes(BLOCK_SIZE)
            img.write(b, data)
    yield img
    img.close()


def _buf(fill: int = 0xEE) -> np.ndarray:
    return np.full((LIMIT, BLOCK_SIZE), fill, np.uint8)


def _move(pair, disk, blocks, *, seq=5, round=3):
    out, inp = pair
    blocks = np.asarray(blocks, np.uint32)
    t, box = send_in_thread(lambda: wire.send_blocks(
        out, disk.view(), blocks, disk.log.gens, device=DEVID, seq=seq, round=round,
        scratch=wire.Scratch(LIMIT)))
    h = wire.read_header(inp)
    got = wire.read_blocks(inp, h, _buf(), disk.blocks)
    t.join()
    if "error" in box:
        raise box["error"]
    return h, got, box["result"]


@pytest.mark.parametrize("blocks", [
    list(range(0, 32)),                # a run with zero blocks inside
    [1, 5, 9, 20, 77, 127],            # scattered, some zero
    [8, 9, 10, 11],                    # all zero: numbers only
    [40],                              # one block
], ids=["run", "scattered", "all-zero", "one"])
def test_blocks_arrive_with_their_generations_and_zero_blocks_as_numbers(pair, disk, blocks):
    h, (got, zero, gens, rows), sent = _move(pair, disk, blocks)
    view = disk.view()
    expect_zero = [b for b in blocks if not view[b].any()]
    expect_data = [b for b in blocks if view[b].any()]
    assert (h.type, h.device, h.round, h.seq, h.encoding) == (wire.DISK, DEVID, 3, 5, wire.RAW)
    assert got.tolist() == expect_data and zero.tolist() == expect_zero
    assert h.n_frames == sent.normal == len(expect_data)
    assert h.n_zero == sent.zero == len(expect_zero)
    assert h.data_len == BLOCK_SIZE * len(expect_data)
    # the generations of the blocks, then of the zero blocks
    assert gens.tolist() == [b % 3 + 1 for b in expect_data + expect_zero]
    assert np.array_equal(rows, view[expect_data])
    assert sent.wire_bytes == (wire.HEADER.size + 4 * len(blocks) + 4 * len(blocks)
                               + BLOCK_SIZE * len(expect_data))


class _WriteAfterGens:
    """The log's generations, with blkback writing `block` just after they are read."""

    def __init__(self, disk, block, data):
        self.disk, self.block, self.data = disk, block, data

    def __getitem__(self, blocks):
        gens = self.disk.log.gens[blocks]
        self.disk.write(self.block, self.data)
        return gens


def test_the_generation_sent_is_read_before_the_data(pair, disk):
    """A write between the two: the data is newer than its generation, never older."""
    out, inp = pair
    before = int(disk.log.gens[3])
    new = b"\x01" * BLOCK_SIZE
    t, box = send_in_thread(lambda: wire.send_blocks(
        out, disk.view(), np.array([3, 4], np.uint32), _WriteAfterGens(disk, 3, new),
        device=DEVID, seq=0, round=0, scratch=wire.Scratch(LIMIT)))
    h = wire.read_header(inp)
    got, _, gens, rows = wire.read_blocks(inp, h, _buf(), BLOCKS)
    t.join()
    assert "error" not in box
    assert disk.log.gens[3] == before + 1
    assert got.tolist() == [3, 4] and gens.tolist() == [before, int(disk.log.gens[4])]
    assert rows[0].tobytes() == new  # the destination keeps it, and the next round's


class _WritingConnection(Connection):
    """blkback writes the image while the record is on its way."""

    def __init__(self, sock, disk, block):
        super().__init__(sock, "source")
        self.disk, self.block = disk, block

    def send(self, parts):
        self.disk.write(self.block, b"\x02" * BLOCK_SIZE)
        super().send(parts)


def test_a_write_while_the_record_goes_does_not_damage_it(pair, disk):
    """The record is a copy (gathered, checksummed, sent): its checksum holds."""
    out, inp = pair
    old = disk.view()[[5, 6, 7]].copy()
    writing = _WritingConnection(out.sock, disk, 6)
    t, box = send_in_thread(lambda: wire.send_blocks(
        writing, disk.view(), np.array([5, 6, 7], np.uint32), disk.log.gens, device=DEVID,
        seq=1, round=0, scratch=wire.Scratch(LIMIT)))
    got, _, _, rows = wire.read_blocks(inp, wire.read_header(inp), _buf(), BLOCKS)
    t.join()
    assert "error" not in box
    assert got.tolist() == [5, 6, 7] and np.array_equal(rows, old)
    assert (disk.view()[6] == 2).all()  # written: marked, it goes again


def test_a_disk_sync_record_carries_one_block(pair, disk):
    out, inp = pair
    data = np.full((1, BLOCK_SIZE), 0x3C, np.uint8)
    sent = wire.send_block_rows(out, wire.DISK_SYNC, np.array([99], np.uint32),
                                np.array([7], np.uint32), data, device=DEVID)
    h = wire.read_header(inp)
    assert (h.type, h.device, h.n_frames, h.n_zero) == (wire.DISK_SYNC, DEVID, 1, 0)
    got, zero, gens, rows = wire.read_blocks(inp, h, _buf(), BLOCKS)
    assert got.tolist() == [99] and zero.tolist() == [] and gens.tolist() == [7]
    assert (rows == 0x3C).all()
    assert sent.wire_bytes == wire.HEADER.size + 4 + 4 + BLOCK_SIZE


def test_a_zero_disk_sync_write_is_a_number_and_a_generation(pair):
    out, inp = pair
    sent = wire.send_block_rows(out, wire.DISK_SYNC, np.array([17], np.uint32),
                                np.array([4], np.uint32), np.zeros((1, BLOCK_SIZE), np.uint8),
                                device=DEVID)
    assert (sent.normal, sent.zero, sent.wire_bytes) == (0, 1, wire.HEADER.size + 8)
    h = wire.read_header(inp)
    assert h.data_len == 0 and h.n_zero == 1
    buf = _buf()
    got, zero, gens, rows = wire.read_blocks(inp, h, buf, BLOCKS)
    assert got.tolist() == [] and zero.tolist() == [17] and gens.tolist() == [4]
    assert rows.shape == (0, BLOCK_SIZE) and (buf == 0xEE).all()


def test_the_header_packs_the_device_where_the_reserved_u16_was():
    h = wire.Header(wire.DISK, round=2, seq=9, n_frames=3, n_zero=1, data_len=3 * BLOCK_SIZE,
                    checksum=0x1122334455667788, device=DEVID)
    raw = h.pack()
    assert len(raw) == wire.HEADER.size == 36
    assert struct.unpack_from("<BBH", raw) == (wire.DISK, wire.RAW, DEVID)
    assert wire.Header.unpack(raw) == h
    assert wire.Header.unpack(wire.Header(wire.PAGES).pack()).device == 0


def test_the_device_is_under_the_checksum(pair):
    """A record whose devid changed on the way is damage, not another disk's blocks."""
    out, inp = pair
    rows = np.full((1, BLOCK_SIZE), 1, np.uint8)
    gens, blocks = np.array([1], np.uint32), np.array([2], np.uint32)
    h = wire.Header(wire.DISK, n_frames=1, data_len=BLOCK_SIZE, device=DEVID)
    body = [blocks.tobytes(), b"", gens.tobytes(), rows]
    h.checksum = wire.checksum(h, body)
    h.device = DEVID + 1
    out.send([h.pack(), *body])
    got = wire.read_header(inp)
    with pytest.raises(errors.DataLoss, match=f"disk {DEVID + 1} batch 0: checksum mismatch"):
        wire.read_blocks(inp, got, _buf(), BLOCKS)


def _record(out, header: wire.Header, blocks, zero, gens, rows, damage=None) -> None:
    """A record as send_block_rows makes it, then damaged in one place: header fields set
    after the checksum, or a body part changed."""
    body = [np.asarray(blocks, np.uint32).tobytes(), np.asarray(zero, np.uint32).tobytes(),
            np.asarray(gens, np.uint32).tobytes(), np.asarray(rows, np.uint8).tobytes()]
    header.checksum = wire.checksum(header, body)
    if damage is not None:
        part, offset = damage
        b = bytearray(body[part])
        b[offset] ^= 0x01  # (a block number stays inside the disk)
        body[part] = bytes(b)
    out.send([header.pack(), *body])


@pytest.mark.parametrize("damage", [(0, 0), (1, 0), (2, 4), (3, BLOCK_SIZE + 100)],
                         ids=["block-number", "zero-number", "generation", "data"])
def test_a_record_damaged_on_the_way_is_data_loss(pair, damage):
    out, inp = pair
    rows = np.random.default_rng(2).integers(1, 256, (2, BLOCK_SIZE), np.uint8)
    h = wire.Header(wire.DISK, seq=12, n_frames=2, n_zero=1, data_len=2 * BLOCK_SIZE,
                    device=DEVID)
    _record(out, h, [3, 4], [5], [1, 2, 3], rows, damage)
    with pytest.raises(errors.DataLoss, match="batch 12: checksum mismatch"):
        wire.read_blocks(inp, wire.read_header(inp), _buf(), BLOCKS)


MARK = b"NEXT-RECORD"


@pytest.mark.parametrize("header,message", [
    (wire.Header(wire.DISK, n_frames=LIMIT, n_zero=1, data_len=LIMIT * BLOCK_SIZE),
     "32 blocks and 1 zero blocks .* at most 32 blocks"),
    (wire.Header(wire.DISK, n_frames=2, data_len=BLOCK_SIZE), "2 blocks .* in 4096 bytes"),
    (wire.Header(wire.DISK, n_zero=1, data_len=BLOCK_SIZE), "0 blocks and 1 zero blocks"),
    (wire.Header(wire.DISK, encoding=wire.ZSTD, n_frames=1, data_len=BLOCK_SIZE),
     "1 blocks and 0 zero blocks in 4096 bytes \\(encoding 1;"),
], ids=["too-many", "length-short", "length-for-zero", "encoding"])
def test_a_bad_header_is_refused_before_the_body_is_read(pair, header, message):
    out, inp = pair
    header.seq = 31
    out.send([header.pack(), MARK])
    buf = _buf()
    with pytest.raises(errors.InvalidArgument, match=f"disk batch 31: {message}"):
        wire.read_blocks(inp, wire.read_header(inp), buf, BLOCKS)
    got = bytearray(len(MARK))
    inp.recv_into(got)
    assert bytes(got) == MARK  # not a byte of the body was taken
    assert (buf == 0xEE).all()


@pytest.mark.parametrize("blocks,zero", [([3, BLOCKS], []), ([], [1, BLOCKS + 5]),
                                         ([2**32 - 1], [])],
                         ids=["block", "zero-block", "huge"])
def test_a_block_outside_the_disk_is_refused_before_its_data_is_read(pair, blocks, zero):
    out, inp = pair
    n = len(blocks)
    h = wire.Header(wire.DISK, seq=8, n_frames=n, n_zero=len(zero), data_len=n * BLOCK_SIZE,
                    device=DEVID)
    _record(out, h, blocks, zero, [1] * (n + len(zero)), np.full((n, BLOCK_SIZE), 7))
    out.send([MARK])
    buf = _buf()
    outside = max(blocks + zero)
    with pytest.raises(errors.InvalidArgument,
                       match=f"block {outside} is outside disk {DEVID} \\({BLOCKS} blocks\\)"):
        wire.read_blocks(inp, wire.read_header(inp), buf, BLOCKS)
    assert (buf == 0xEE).all()  # nothing of the data landed
    data = bytearray(n * BLOCK_SIZE + len(MARK))
    inp.recv_into(data)  # ... it is all still on the connection
    assert bytes(data[-len(MARK):]) == MARK and (np.frombuffer(data[:-len(MARK)], np.uint8)
                                                  == 7).all()


def test_the_last_block_of_the_disk_is_in_it(pair):
    out, inp = pair
    wire.send_block_rows(out, wire.DISK, np.array([BLOCKS - 1], np.uint32),
                         np.array([1], np.uint32), np.full((1, BLOCK_SIZE), 2, np.uint8),
                         device=DEVID)
    got, _, _, rows = wire.read_blocks(inp, wire.read_header(inp), _buf(), BLOCKS)
    assert got.tolist() == [BLOCKS - 1] and (rows == 2).all()


def test_a_full_batch_fits_the_buffer(pair, disk):
    blocks = list(range(BLOCKS - LIMIT, BLOCKS))
    h, (got, zero, _, rows), _ = _move(pair, disk, blocks)
    assert len(got) + len(zero) == LIMIT
    assert np.array_equal(rows, disk.view()[got])

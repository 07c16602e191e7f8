"""Records on a data channel (pvmig/migration/wire.py), over a real socket pair: pages
from one guest memory straight into another, and every bad record refused before a
byte of it lands."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import send_in_thread

from pvmig import errors
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration import wire
from pvmig.rpc.data_channel import Closed, Connection

pytestmark = pytest.mark.timeout(60)

N = 256
SENTINEL = 0xA5
LIMIT = 64  # the receiver's batch limit in these tests


@pytest.fixture
def src(make_memory):
    """Random frames, with zero runs at 16-31 and 100-103 and a lone zero frame at 50."""
    mem = make_memory(N, "src")
    mem.pages[:] = np.random.default_rng(7).integers(0, 256, mem.pages.shape, np.uint8)
    mem.pages[16:32] = 0
    mem.pages[100:104] = 0
    mem.pages[50] = 0
    return mem


@pytest.fixture
def dst(make_memory):
    mem = make_memory(N, "dst")
    mem.pages[:] = SENTINEL
    return mem


def _move(pair, src, dst, frames, **kw):
    out, inp = pair
    t, box = send_in_thread(lambda: wire.send_pages(
        out, src, np.asarray(frames, np.uint32), seq=kw.pop("seq", 9), round=2,
        scratch=wire.Scratch(LIMIT), **kw))
    h = wire.read_header(inp)
    got = wire.Receiver(dst, LIMIT).receive(inp, h)
    t.join()
    if "error" in box:
        raise box["error"]
    return h, got, box["result"]


@pytest.mark.parametrize("frames", [
    list(range(0, 64)),               # a run with zero pages inside: views of the runs
    list(range(40, 56)),              # a run with one zero frame
    list(range(100, 104)),            # all zero: numbers only
    [3, 9, 17, 200, 201, 255, 50],    # scattered, some zero: gathered
    list(range(0, 128, 2))[:LIMIT],   # more runs than MAX_PARTS: one gather
], ids=["run", "run-one-zero", "all-zero", "scattered", "many-runs"])
def test_pages_land_exactly_where_they_belong(pair, src, dst, frames):
    h, got, sent = _move(pair, src, dst, frames)
    assert got.ok and got.pages == len(frames) == sent.normal + sent.zero
    zero = [f for f in frames if not src.pages[f].any()]
    assert sent.zero == h.n_zero == len(zero)
    assert sent.wire_bytes == wire.HEADER.size + 4 * len(frames) + PAGE_SIZE * sent.normal
    assert sorted(got.landed.tolist()) == sorted(frames)
    assert np.array_equal(dst.pages[frames], src.pages[frames])
    others = np.setdiff1d(np.arange(N), frames)
    assert (dst.pages[others] == SENTINEL).all()  # nothing else touched


def test_zstd_pages_land_too(pair, src, dst):
    frames = list(range(16, 48))  # half zero, half random: random pages do not shrink
    src.pages[32:48] = 7  # ... these do
    h, got, sent = _move(pair, src, dst, frames, compressor=zstandard.ZstdCompressor())
    assert h.encoding == wire.ZSTD and got.ok
    assert sent.wire_bytes < wire.HEADER.size + 4 * 32 + PAGE_SIZE * 16
    assert np.array_equal(dst.pages[frames], src.pages[frames])


def test_a_torn_copy_sends_the_head_it_found_and_never_writes_guest_memory(pair, src, dst):
    before = src.pages[5].copy()
    head = np.full(PAGE_SIZE // 2, 0xEE, np.uint8)
    _, got, _ = _move(pair, src, dst, list(range(0, 8)), torn=(5, head))
    assert got.ok
    assert (dst.pages[5, :PAGE_SIZE // 2] == 0xEE).all()
    assert np.array_equal(dst.pages[5, PAGE_SIZE // 2:], before[PAGE_SIZE // 2:])
    assert np.array_equal(src.pages[5], before)


@pytest.mark.parametrize("frames", [list(range(0, 8)), [1, 5, 9]], ids=["run", "scattered"])
def test_a_damaged_batch_lands_and_is_reported(pair, src, dst, frames):
    """A run lands in place before its checksum can be checked; the receiver says so
    (ok False) and the source decides (source_host.save: _settle)."""
    h, got, _ = _move(pair, src, dst, frames, corrupt=True)
    assert not got.ok and got.pages == len(frames)


def _raw(out, header: wire.Header, body: bytes = b"") -> None:
    out.send([header.pack(), body])


@pytest.mark.parametrize("header,body,message", [
    (wire.Header(wire.PAGES, n_frames=LIMIT + 1), b"", "more than the batch limit of 64"),
    (wire.Header(wire.PAGES, n_frames=2, data_len=PAGE_SIZE), b"",
     "4096 bytes of data for 2 frames"),
    (wire.Header(wire.PAGES, encoding=7, n_frames=1, data_len=PAGE_SIZE), b"",
     "unknown encoding 7"),
    (wire.Header(wire.PAGES, n_frames=1, data_len=PAGE_SIZE),
     struct.pack("<I", N), "frame 256 is outside the domain"),
    (wire.Header(wire.PAGES, n_zero=2), struct.pack("<II", 3, 10**9),
     "frame 1000000000 is outside the domain"),
], ids=["too-many", "length", "encoding", "frame-outside", "zero-frame-outside"])
def test_a_bad_batch_is_refused_before_a_byte_lands(pair, dst, header, body, message):
    out, inp = pair
    header.seq = 44
    _raw(out, header, body + b"\x00" * (PAGE_SIZE if header.data_len else 0))
    with pytest.raises(errors.InvalidArgument, match=message):
        wire.Receiver(dst, LIMIT).receive(inp, wire.read_header(inp))
    assert (dst.pages == SENTINEL).all()


def test_a_truncated_record_is_a_closed_connection_not_a_write(pair, src, dst):
    out, inp = pair
    _raw(out, wire.Header(wire.PAGES, n_frames=4, data_len=4 * PAGE_SIZE, seq=3),
         np.arange(4, dtype="<u4").tobytes() + b"\x01" * 100)
    out.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(Closed, match="short of a record"):
        wire.Receiver(dst, LIMIT).receive(inp, wire.read_header(inp))
    # (a run lands in place: what arrived of it is there, and the migration cannot end
    # without this connection's round end, so the destination's copy never runs)
    assert (dst.pages[4:] == SENTINEL).all()


def test_control_records_and_answers(pair):
    out, inp = pair
    wire.send_control(out, wire.DEVICE_STATE, data=b"state")
    wire.send_ack(out, 3, 1234, [5, 9])
    wire.send_error(out, errors.FailedPrecondition("no such thing"))
    h = wire.read_header(inp)
    assert h.type == wire.DEVICE_STATE and wire.read_control_body(inp, h) == b"state"
    h = wire.read_header(inp)
    body = wire.read_control_body(inp, h)
    assert (h.type, h.round, h.n_frames, np.frombuffer(body, "<u8").tolist()) == (
        wire.ACK, 3, 1234, [5, 9])
    h = wire.read_header(inp)
    err = wire.error_of(wire.read_control_body(inp, h))
    assert isinstance(err, errors.FailedPrecondition) and str(err) == "no such thing"


def test_a_damaged_control_record_is_refused(pair):
    out, inp = pair
    h = wire.Header(wire.DEVICE_STATE, data_len=3, checksum=1)
    _raw(out, h, b"abc")
    with pytest.raises(errors.DataLoss, match="device state record: checksum mismatch"):
        wire.read_control_body(inp, wire.read_header(inp))
    _raw(out, wire.Header(wire.DEVICE_STATE, data_len=wire.MAX_CONTROL + 1))
    with pytest.raises(errors.InvalidArgument, match="at most"):
        wire.read_control_body(inp, wire.read_header(inp))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, N - 1), min_size=1, max_size=LIMIT, unique=True),
       st.booleans())
def test_any_set_of_frames_round_trips(src, dst, frames, sort):
    """Whatever frames a round picks (ascending as a log read gives them, or not)."""
    dst.pages[:] = SENTINEL
    frames = sorted(frames) if sort else frames
    a, b = socket.socketpair()
    try:
        _, got, _ = _move((Connection(a, "s"), Connection(b, "d")), src, dst, frames)
        assert got.ok and np.array_equal(dst.pages[frames], src.pages[frames])
        others = np.setdiff1d(np.arange(N), frames)
        assert (dst.pages[others] == SENTINEL).all()
    finally:
        a.close()
        b.close()


class _WrittenDuringSend(Connection):
    """A connection during whose send dom0 writes the frames being sent (the source's
    backends go on after the guest suspends)."""

    def __init__(self, sock, mem) -> None:
        super().__init__(sock, "source")
        self.mem = mem

    def send(self, parts) -> None:
        self.mem.pages[0:8] ^= 0xFF
        super().send(parts)


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_snapshot_batch_stays_whole_when_its_frames_change_during_the_send(
        src, dst, snapshot):
    a, b = socket.socketpair()
    try:
        conn = _WrittenDuringSend(a, src)
        before = src.pages[0:8].copy()
        frames = np.arange(0, 8, dtype=np.uint32)
        t, box = send_in_thread(lambda: wire.send_pages(
            conn, src, frames, seq=1, round=0, scratch=wire.Scratch(LIMIT), snapshot=snapshot))
        inp = Connection(b, "destination")
        got = wire.Receiver(dst, LIMIT).receive(inp, wire.read_header(inp))
        t.join()
        assert "error" not in box
        # A view of guest RAM sends what the write left; a snapshot what was there when
        # its checksum was taken, and it arrives whole.
        assert got.ok is snapshot
        if snapshot:
            assert (dst.pages[0:8] == before).all()
    finally:
        a.close()
        b.close()


def test_a_discard_bitmap_round_trips_and_a_wrong_size_is_refused(pair):
    a, b = pair
    mask = np.zeros(1000, bool)
    mask[[0, 7, 8, 999]] = True
    wire.send_bitmap(a, wire.DISCARD, mask)
    assert wire.read_bitmap(b, wire.read_header(b), 1000).tolist() == mask.tolist()
    wire.send_bitmap(a, wire.DISCARD, mask)
    with pytest.raises(errors.InvalidArgument, match="bitmap of 1000 frames"):
        wire.read_bitmap(b, wire.read_header(b), 2000)

"""Page batches (pvmig/migration/pages.py): pack on the source, unpack + apply on the destination."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.memory import PAGE_SIZE, GuestMemory
from pvmig.migration import pages

pytestmark = pytest.mark.timeout(60)

N = 64
SENTINEL = 0xA5


def _pack(mem, frames, seq=7, round=3):
    batch = pb.PageBatch()
    packed = pages.pack(mem, np.asarray(frames), seq=seq, round=round, out=batch)
    return batch, packed


def _wire(batch: pb.PageBatch) -> pb.PageBatch:
    """The batch as the destination gets it: serialized and parsed again."""
    return pb.PageBatch.FromString(batch.SerializeToString())


def _u32(b: bytes) -> list[int]:
    return np.frombuffer(b, dtype="<u4").tolist()


@pytest.fixture
def src(make_memory):
    """Frames: 0-15 random, 16-31 zero, 32 only its first byte set, 33 only its last
    byte set, 34 only its last word's top bit set, the rest random."""
    mem = make_memory(N, "src")
    rng = np.random.default_rng(42)
    mem.pages[:] = rng.integers(0, 256, size=mem.pages.shape, dtype=np.uint8)
    mem.pages[16:35] = 0
    mem.pages[32, 0] = 1
    mem.pages[33, PAGE_SIZE - 1] = 1
    mem.pages[34, PAGE_SIZE - 1] = 0x80
    return mem


@pytest.fixture
def dst(make_memory):
    mem = make_memory(N, "dst")
    mem.pages[:] = SENTINEL
    return mem


def _apply(dst, batch):
    pages.apply(dst, pages.unpack(_wire(batch), dst.nr_frames))


# ---- round trips


def test_a_batch_round_trips(src, dst):
    frames = np.array([40, 3, 17, 32, 33, 34, 20, 63, 0], dtype=np.uint32)
    batch, packed = _pack(src, frames, seq=11, round=2)
    assert (batch.seq, batch.round) == (11, 2)

    got = pages.unpack(_wire(batch), N)
    assert got.pages == len(frames)
    pages.apply(dst, got)

    assert np.array_equal(dst.pages[frames], src.pages[frames])
    untouched = np.setdiff1d(np.arange(N), frames)
    assert (dst.pages[untouched] == SENTINEL).all()


def test_zero_pages_travel_as_numbers_only(src, dst):
    frames = np.array([1, 16, 2, 17, 32, 33, 34, 31, 5], dtype=np.uint32)
    batch, packed = _pack(src, frames)
    # in their order in the request, split by kind
    assert _u32(batch.frames) == [1, 2, 32, 33, 34, 5]
    assert _u32(batch.zero_frames) == [16, 17, 31]
    assert len(batch.data) == PAGE_SIZE * 6
    assert (packed.normal, packed.zero) == (6, 3)
    assert packed.wire_bytes == len(batch.data) + len(batch.frames) + len(batch.zero_frames)
    # the data is the normal pages, in their order
    assert batch.data == src.pages[[1, 2, 32, 33, 34, 5]].tobytes()

    _apply(dst, batch)
    assert np.array_equal(dst.pages[frames], src.pages[frames])
    assert not dst.pages[[16, 17, 31]].any()  # zeroed over the sentinel


def test_a_batch_of_only_zero_pages_has_no_data(src, dst):
    frames = np.arange(16, 32, dtype=np.uint32)
    batch, packed = _pack(src, frames)
    assert batch.data == b""
    assert batch.frames == b""
    assert _u32(batch.zero_frames) == list(range(16, 32))
    assert (packed.normal, packed.zero, packed.wire_bytes) == (0, 16, 64)
    _apply(dst, batch)
    assert not dst.pages[16:32].any()
    assert (dst.pages[:16] == SENTINEL).all() and (dst.pages[32:] == SENTINEL).all()


def test_a_batch_without_zero_pages(src, dst):
    frames = np.arange(0, 16, dtype=np.uint32)
    batch, packed = _pack(src, frames)
    assert batch.zero_frames == b""
    assert (packed.normal, packed.zero) == (16, 0)
    _apply(dst, batch)
    assert np.array_equal(dst.pages[:16], src.pages[:16])


def test_an_empty_batch(src, dst):
    batch, packed = _pack(src, np.array([], dtype=np.uint32))
    assert (packed.normal, packed.zero, packed.wire_bytes) == (0, 0, 0)
    got = pages.unpack(_wire(batch), N)
    assert got.pages == 0
    pages.apply(dst, got)
    assert (dst.pages == SENTINEL).all()


def test_pack_does_not_change_the_source(src):
    before = src.pages.copy()
    _pack(src, np.arange(N, dtype=np.uint32))
    assert np.array_equal(src.pages, before)


def test_pack_reuses_an_output_batch(src, dst):
    """pack fills `out` whole: nothing of a previous batch in the same message stays."""
    batch = pb.PageBatch()
    pages.pack(src, np.arange(0, 20, dtype=np.uint32), seq=1, round=0, out=batch)
    packed = pages.pack(src, np.array([40, 41], dtype=np.uint32), seq=2, round=1, out=batch)
    assert (batch.seq, batch.round, packed.normal, packed.zero) == (2, 1, 2, 0)
    assert _u32(batch.frames) == [40, 41] and batch.zero_frames == b""
    _apply(dst, batch)
    assert np.array_equal(dst.pages[[40, 41]], src.pages[[40, 41]])
    assert (np.delete(dst.pages, [40, 41], axis=0) == SENTINEL).all()


# ---- refusals


def _refused(dst, batch, exc, match):
    before = dst.pages.copy()
    with pytest.raises(exc, match=match):
        pages.apply(dst, pages.unpack(batch, dst.nr_frames))
    assert np.array_equal(dst.pages, before), "a refused batch wrote to memory"


@pytest.mark.parametrize("field", ["data", "frames", "zero_frames"])
def test_a_corrupt_batch_is_refused_with_its_seq(src, dst, field):
    batch, _ = _pack(src, np.array([3, 16, 4, 17, 9], dtype=np.uint32), seq=1234)
    raw = bytearray(getattr(batch, field))
    raw[len(raw) // 2] ^= 0x01  # one bit, on the wire
    setattr(batch, field, bytes(raw))
    _refused(dst, batch, errors.DataLoss, r"^batch 1234: checksum mismatch")


def test_a_wrong_checksum_is_refused(src, dst):
    batch, _ = _pack(src, np.array([3, 16], dtype=np.uint32), seq=5)
    batch.checksum ^= 1
    _refused(dst, batch, errors.DataLoss, "batch 5")


def test_a_frame_outside_the_domain_is_refused(src, dst, make_memory):
    small = make_memory(N // 2, "small")
    small.pages[:] = SENTINEL
    # 31 is the domain's last frame, 32 is one past it
    batch, _ = _pack(src, np.array([0, 31, 32], dtype=np.uint32), seq=8)
    _refused(small, batch, errors.InvalidArgument,
             r"batch 8: frame 32 is outside the domain \(32 frames\)")
    # the same for a zero frame: 20 is inside, 40 is not
    src.pages[40] = 0
    batch, _ = _pack(src, np.array([0, 20, 40], dtype=np.uint32), seq=9)
    assert _u32(batch.zero_frames) == [20, 40]
    _refused(small, batch, errors.InvalidArgument,
             r"batch 9: zero frame 40 is outside the domain")
    # the boundary itself is fine
    batch, _ = _pack(src, np.array([0, 31], dtype=np.uint32), seq=10)
    _apply(small, batch)
    assert np.array_equal(small.pages[[0, 31]], src.pages[[0, 31]])


@pytest.mark.parametrize("delta", [-1, +1, -PAGE_SIZE, +PAGE_SIZE])
def test_data_of_the_wrong_length_is_refused(src, dst, delta):
    batch, _ = _pack(src, np.array([1, 2, 3], dtype=np.uint32), seq=21)
    data = batch.data[:delta] if delta < 0 else batch.data + b"\x01" * delta
    # a sender that got the length wrong but the checksum right
    batch.data = data
    batch.checksum = pages.checksum(batch.seq, batch.round, batch.frames, batch.zero_frames, data)
    _refused(dst, batch, errors.InvalidArgument, "batch 21: .* bytes of data for 3 frames")


@pytest.mark.parametrize("field", ["frames", "zero_frames"])
def test_a_frame_list_that_is_not_whole_u32_is_refused(src, dst, field):
    batch, _ = _pack(src, np.array([1, 16], dtype=np.uint32), seq=30)
    setattr(batch, field, getattr(batch, field) + b"\x00")
    batch.checksum = pages.checksum(batch.seq, batch.round, batch.frames, batch.zero_frames, batch.data)
    _refused(dst, batch, errors.InvalidArgument, "batch 30: frame list")


# ---- property: any subset, any mix of zero and non-zero pages


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages-shm")
    a, b = GuestMemory.create(d / "a", N), GuestMemory.create(d / "b", N)
    yield a, b
    a.close()
    b.close()


_KINDS = st.sampled_from(["zero", "random", "first-byte", "last-byte", "top-bit"])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_batch_round_trips(pair, data):
    a, b = pair
    frames = data.draw(st.lists(st.integers(0, N - 1), unique=True, max_size=N), label="frames")
    kinds = data.draw(st.lists(_KINDS, min_size=len(frames), max_size=len(frames)),
                      label="kinds")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    seq = data.draw(st.integers(0, 2**64 - 1), label="seq")
    rng = np.random.default_rng(seed)

    a.pages[:] = rng.integers(0, 256, size=a.pages.shape, dtype=np.uint8)
    b.pages[:] = SENTINEL
    for f, kind in zip(frames, kinds):
        if kind != "random":
            a.pages[f] = 0
        if kind == "first-byte":
            a.pages[f, 0] = rng.integers(1, 256)
        elif kind == "last-byte":
            a.pages[f, PAGE_SIZE - 1] = rng.integers(1, 256)
        elif kind == "top-bit":
            a.words[f, rng.integers(0, PAGE_SIZE // 8)] = 1 << 63
    frames = np.array(frames, dtype=np.uint32)
    zeros = [int(f) for f, k in zip(frames, kinds) if k == "zero"]
    normal = [int(f) for f, k in zip(frames, kinds) if k != "zero"]

    batch, packed = _pack(a, frames, seq=seq)
    assert (packed.normal, packed.zero) == (len(normal), len(zeros))
    assert _u32(batch.frames) == normal
    assert _u32(batch.zero_frames) == zeros
    assert len(batch.data) == PAGE_SIZE * len(normal)

    got = pages.unpack(_wire(batch), N)
    assert got.pages == len(frames)
    pages.apply(b, got)
    assert np.array_equal(b.pages[frames], a.pages[frames])
    rest = np.setdiff1d(np.arange(N), frames)
    assert (b.pages[rest] == SENTINEL).all()


# ---- compression (migrate --compress zstd)


def test_compressible_pages_travel_compressed_and_random_ones_as_they_are(src, dst):
    import zstandard
    cctx = zstandard.ZstdCompressor(level=1)
    src.pages[40:50] = np.arange(PAGE_SIZE, dtype=np.uint32).view(np.uint8)[:PAGE_SIZE] % 7
    text = pb.PageBatch()
    packed = pages.pack(src, np.arange(40, 50), seq=1, round=1, out=text, compressor=cctx)
    assert text.encoding == "zstd" and packed.wire_bytes < 10 * PAGE_SIZE // 4
    noise = pb.PageBatch()
    pages.pack(src, np.arange(0, 10), seq=2, round=1, out=noise, compressor=cctx)
    assert noise.encoding == "" and len(noise.data) == 10 * PAGE_SIZE
    for batch in (text, noise):
        _apply(dst, batch)
    assert np.array_equal(dst.pages[40:50], src.pages[40:50])
    assert np.array_equal(dst.pages[0:10], src.pages[0:10])


def test_bad_compressed_data_and_unknown_encodings_are_refused(src, dst):
    """(The checksum covers the encoding: a batch relabelled on the way is refused as
    corrupt; these are batches a sender made so.)"""
    import zstandard
    src.pages[40:42] = 3
    batch = pb.PageBatch()
    pages.pack(src, np.arange(40, 42), seq=5, round=1, out=batch,
               compressor=zstandard.ZstdCompressor())
    broken = pb.PageBatch()
    broken.CopyFrom(batch)
    broken.data = b"\x28\xb5\x2f\xfd" + b"junk" * 8  # a zstd frame header, then garbage
    broken.checksum = pages.checksum(5, 1, broken.frames, broken.zero_frames, broken.data,
                                     "zstd")
    with pytest.raises(errors.InvalidArgument, match="batch 5: bad zstd data"):
        pages.unpack(broken, N)
    odd = pb.PageBatch()
    odd.CopyFrom(batch)
    odd.encoding = "lz4"
    with pytest.raises(errors.DataLoss, match="batch 5: checksum mismatch"):
        pages.unpack(odd, N)  # relabelled on the way
    odd.checksum = pages.checksum(5, 1, odd.frames, odd.zero_frames, odd.data, "lz4")
    with pytest.raises(errors.InvalidArgument, match="unknown encoding 'lz4'"):
        pages.unpack(odd, N)
    # a compressed batch that inflates to the wrong size is refused as well
    short = pb.PageBatch()
    short.CopyFrom(batch)
    short.frames = batch.frames[:4]
    short.checksum = pages.checksum(5, 1, short.frames, short.zero_frames, short.data,
                                    "zstd")
    with pytest.raises(errors.InvalidArgument, match="batch 5"):
        pages.unpack(short, N)


def test_zstd_data_claiming_more_than_the_batch_holds_is_refused(src):
    import zstandard
    batch = pb.PageBatch(seq=9, round=1, frames=np.array([1], "<u4").tobytes(),
                         encoding="zstd",
                         data=zstandard.ZstdCompressor().compress(b"\0" * (64 << 20)))
    batch.checksum = pages.checksum(9, 1, batch.frames, b"", batch.data, "zstd")
    with pytest.raises(errors.InvalidArgument, match="claims 67108864 bytes for 1 frames"):
        pages.unpack(batch, N)


def test_a_straggling_older_batch_never_overwrites_a_newer_copy(make_memory):
    """Frames copied in round 3 stay when a round-1 batch for them arrives late (a stream
    that broke); the round-1 batch's other frames are applied."""
    mem = make_memory(8)
    applied = np.zeros(8, dtype=np.uint32)
    frames = np.array([1, 2, 3], dtype="<u4")
    late = pages.Unpacked(frames, np.array([5, 6], dtype="<u4"),
                          np.full((3, pages.PAGE_SIZE), 1, dtype=np.uint8))
    applied[[2, 6]] = 4  # round 3's copies of frames 2 and 6
    mem.pages[2], mem.pages[6] = 3, 3
    kept = pages.newer(late, applied, 2)  # the batch is round 1's: generation 2
    assert kept.frames.tolist() == [1, 3] and kept.zero_frames.tolist() == [5]
    pages.apply(mem, kept)
    assert mem.pages[1, 0] == 1 and mem.pages[3, 0] == 1 and mem.pages[2, 0] == 3
    assert mem.pages[6, 0] == 3 and mem.pages[5, 0] == 0
    assert pages.newer(late, np.zeros(8, dtype=np.uint32), 2) is late  # nothing stale

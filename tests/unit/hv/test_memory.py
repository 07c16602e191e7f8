"""GuestMemory (pvmig/hv/memory.py): the shared RAM file and its frame hashes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pvmig.hv import memory
from pvmig.hv.memory import PAGE_SIZE, PAGE_WORDS, GuestMemory, zero_rows

pytestmark = pytest.mark.timeout(30)


# ---- create / open


def test_create_gives_zeroed_frames_of_the_right_shape(make_memory):
    mem = make_memory(5)
    assert mem.nr_frames == 5
    assert mem.ram_bytes == 5 * PAGE_SIZE
    assert mem.path.stat().st_size == 5 * PAGE_SIZE
    assert mem.pages.shape == (5, PAGE_SIZE) and mem.pages.dtype == np.uint8
    assert mem.words.shape == (5, PAGE_WORDS) and mem.words.dtype == np.uint64
    assert not mem.pages.any()
    # words and pages are two views of the same bytes
    mem.words[2, 1] = 0x0102030405060708
    assert mem.pages[2, 8:16].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]


def test_two_mappings_of_one_file_see_each_others_writes(make_memory, shm_dir):
    a = make_memory(8)
    b = GuestMemory.open(shm_dir / "ram")
    try:
        assert b.nr_frames == 8 and b.path == a.path
        a.pages[3, 100] = 0x5A
        a.pages[7, PAGE_SIZE - 1] = 0xA5
        assert b.pages[3, 100] == 0x5A
        assert b.pages[7, PAGE_SIZE - 1] == 0xA5
        b.words[0] = np.arange(PAGE_WORDS, dtype=np.uint64)
        assert np.array_equal(a.words[0], np.arange(PAGE_WORDS, dtype=np.uint64))
        assert np.array_equal(a.pages, b.pages)
    finally:
        b.close()


def test_create_refuses_an_existing_file(make_memory, shm_dir):
    a = make_memory(4)
    a.pages[1, :] = 7
    with pytest.raises(FileExistsError):
        GuestMemory.create(shm_dir / "ram", 4)
    with pytest.raises(FileExistsError):
        GuestMemory.create(shm_dir / "ram", 9)  # nor with another size
    # The failed creates neither removed, resized nor cleared the domain's memory.
    assert (shm_dir / "ram").stat().st_size == 4 * PAGE_SIZE
    b = GuestMemory.open(shm_dir / "ram")
    try:
        assert (b.pages[1] == 7).all()
    finally:
        b.close()


@pytest.mark.parametrize("nr_frames", [0, -1])
def test_create_rejects_no_frames(shm_dir, nr_frames):
    with pytest.raises(ValueError):
        GuestMemory.create(shm_dir / "ram", nr_frames)
    assert not (shm_dir / "ram").exists()


@pytest.mark.parametrize("size", [1, PAGE_SIZE - 1, PAGE_SIZE + 1, 3 * PAGE_SIZE + 17])
def test_open_rejects_a_size_that_is_not_whole_pages(shm_dir, size):
    path = shm_dir / "odd"
    path.write_bytes(b"\0" * size)
    with pytest.raises(ValueError, match="not a whole number of pages"):
        GuestMemory.open(path)


def test_open_rejects_an_empty_file(shm_dir):
    path = shm_dir / "empty"
    path.touch()
    with pytest.raises(ValueError):
        GuestMemory.open(path)


def test_open_of_a_missing_file_fails(shm_dir):
    with pytest.raises(FileNotFoundError):
        GuestMemory.open(shm_dir / "nothing")


# ---- frame hashes


def _fill_random(mem: GuestMemory, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mem.words[:] = rng.integers(0, 2**64, size=mem.words.shape, dtype=np.uint64)


def test_equal_pages_have_equal_hashes(make_memory):
    mem = make_memory(16)
    _fill_random(mem)
    mem.pages[5] = mem.pages[2]
    mem.pages[9] = 0
    mem.pages[12] = 0
    h = mem.frame_hashes()
    assert h.dtype == np.uint64 and h.shape == (16,)
    assert h[5] == h[2]
    assert h[9] == h[12]
    # distinct random pages: distinct hashes
    others = np.delete(h, [5, 12])
    assert len(set(others.tolist())) == len(others)


def test_equal_pages_hash_equal_across_two_memories(make_memory):
    a, b = make_memory(8, "a"), make_memory(8, "b")
    _fill_random(a, seed=1)
    b.pages[:] = a.pages[::-1]
    assert np.array_equal(a.frame_hashes(), b.frame_hashes()[::-1])


@pytest.mark.parametrize("pos", [0, 1, 7, 8, 9, 2047, 2048, PAGE_SIZE - 8, PAGE_SIZE - 2,
                                 PAGE_SIZE - 1])
@pytest.mark.parametrize("change", ["xor1", "xor80", "set_ff_or_00"])
@pytest.mark.parametrize("background", ["random", "zero"])
def test_a_single_changed_byte_changes_the_hash(make_memory, pos, change, background):
    mem = make_memory(4)
    if background == "random":
        _fill_random(mem, seed=pos)
    before = mem.frame_hashes()
    old = int(mem.pages[2, pos])
    new = {"xor1": old ^ 0x01, "xor80": old ^ 0x80,
           "set_ff_or_00": 0x00 if old == 0xFF else 0xFF}[change]
    mem.pages[2, pos] = new
    after = mem.frame_hashes()
    assert after[2] != before[2], f"byte {pos}: {old:#x} -> {new:#x} kept the hash"
    assert np.array_equal(np.delete(after, 2), np.delete(before, 2))
    mem.pages[2, pos] = old
    assert np.array_equal(mem.frame_hashes(), before)


@pytest.mark.parametrize("flip", [0x01, 0x80])
def test_every_single_byte_change_changes_the_hash(make_memory, flip):
    """Exhaustive over positions: frame p holds the page of frame PAGE_SIZE with byte
    p flipped; every one hashes differently from the original."""
    mem = make_memory(PAGE_SIZE + 1)
    _fill_random(mem, seed=flip)
    mem.pages[:PAGE_SIZE] = mem.pages[PAGE_SIZE]
    mem.pages[np.arange(PAGE_SIZE), np.arange(PAGE_SIZE)] ^= flip  # frame p: byte p flipped
    h = mem.frame_hashes()
    same = np.flatnonzero(h[:PAGE_SIZE] == h[PAGE_SIZE])
    assert same.size == 0, f"flipping byte(s) {same.tolist()} kept the hash"


def test_a_value_in_another_word_changes_the_hash(make_memory):
    """The same frame holding a value in word 0, then the same value in word 1 instead
    (a misplaced write): the verifier must see two different pages."""
    mem = make_memory(1)
    mem.words[0, 0] = 1 << 63
    before = mem.frame_hashes()[0]
    mem.words[0, 0] = 0
    mem.words[0, 1] = 1 << 63
    assert mem.frame_hashes()[0] != before


def test_two_flipped_bits_change_the_hash(make_memory):
    """64 random pages, each compared with itself with bit 63 flipped in two words."""
    mem = make_memory(128)
    _fill_random(mem, seed=99)
    rng = np.random.default_rng(99)
    mem.pages[64:] = mem.pages[:64]
    for f in range(64, 128):
        w, v = rng.choice(PAGE_WORDS, size=2, replace=False)
        mem.words[f, [w, v]] ^= np.uint64(1 << 63)
    h = mem.frame_hashes()
    undetected = np.flatnonzero(h[:64] == h[64:])
    assert undetected.size == 0, f"{undetected.size} of 64 two-bit changes kept the hash"


def test_word_order_within_a_page_matters(make_memory):
    mem = make_memory(2)
    mem.words[0, :2] = [1, 2]
    mem.words[1, :2] = [2, 1]
    h = mem.frame_hashes()
    assert h[0] != h[1]


CHUNK = memory._HASH_CHUNK
BIG = 2 * CHUNK + 300  # three chunks of hashing for a full pass


@pytest.fixture(scope="module")
def big_memory(tmp_path_factory):
    mem = GuestMemory.create(tmp_path_factory.mktemp("shm") / "big", BIG)
    _fill_random(mem, seed=7)
    mem.pages[[10, CHUNK + 4, BIG - 1]] = 0                 # some zero pages
    mem.pages[[20, CHUNK + 200, CHUNK]] = mem.pages[3]      # some duplicates
    yield mem
    mem.close()


@pytest.fixture(scope="module")
def big_hashes(big_memory):
    h = big_memory.frame_hashes()
    assert h.shape == (BIG,)
    return h


def _subsets():
    rng = np.random.default_rng(11)
    scattered = np.sort(rng.choice(BIG, size=CHUNK + CHUNK // 2, replace=False))
    return {
        "empty": np.array([], dtype=np.int64),
        "one frame": np.array([BIG - 100]),
        "first frame": np.array([0]),
        "last frame": np.array([BIG - 1]),
        "contiguous within a chunk": np.arange(100, CHUNK - 100),
        "contiguous, exactly a chunk": np.arange(50, 50 + CHUNK),
        "contiguous, longer than a chunk": np.arange(17, 17 + CHUNK + CHUNK // 2),
        "contiguous to the end": np.arange(BIG - CHUNK - 5, BIG),
        "everything": np.arange(BIG),
        "scattered, sorted, longer than a chunk": scattered,
        "scattered, unsorted": rng.permutation(scattered),
        "descending": np.arange(BIG - 1, -1, -1),
        "with repeats": rng.integers(0, BIG, size=CHUNK + 700),
        # contiguous in the first chunk, with a gap in the second
        "contiguous chunk then a gapped one": np.concatenate(
            [np.arange(0, CHUNK), np.arange(CHUNK, CHUNK + 200), np.arange(CHUNK + 201, BIG)]),
        # a run whose ends are len-1 apart but that is not a contiguous run
        "ends look contiguous": np.array([5, 7, 6, 8]),
        "u32 as from read_and_clear": np.flatnonzero(
            rng.random(BIG) < 0.6).astype(np.uint32),
    }


@pytest.mark.parametrize("name", list(_subsets()))
def test_hashes_of_a_subset_match_the_full_hashes(big_memory, big_hashes, name):
    frames = _subsets()[name]
    got = big_memory.frame_hashes(frames)
    assert got.dtype == np.uint64
    assert got.shape == (len(frames),)
    assert np.array_equal(got, big_hashes[frames.astype(np.int64)])


def test_full_hashes_match_frame_by_frame(big_memory, big_hashes):
    for f in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, BIG - 1]:
        assert big_memory.frame_hashes(np.array([f]))[0] == big_hashes[f]
    assert big_hashes[20] == big_hashes[3] == big_hashes[CHUNK + 200] == big_hashes[CHUNK]
    assert big_hashes[10] == big_hashes[CHUNK + 4] == big_hashes[BIG - 1]


def test_hashes_are_the_same_in_another_process(make_memory):
    """Both hosts must compute the same hash of the same page."""
    mem = make_memory(3)
    _fill_random(mem, seed=3)
    mem.pages[2] = 0
    code = ("import sys, numpy as np\n"
            "from pvmig.hv.memory import GuestMemory\n"
            "m = GuestMemory.open(sys.argv[1])\n"
            "print(' '.join(str(int(h)) for h in m.frame_hashes()))\n")
    out = subprocess.run([sys.executable, "-c", code, str(mem.path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert [int(x) for x in out] == mem.frame_hashes().tolist()


def test_zero_rows_reads_past_a_zero_first_word(make_memory):
    """A page is zero only if every word is: one whose first word is zero and whose last
    byte is not is a normal page (the shortcut reads those whole)."""
    mem = make_memory(6)
    _fill_random(mem, seed=3)
    mem.pages[1] = 0
    mem.pages[2] = 0
    mem.pages[2, PAGE_SIZE - 1] = 1
    mem.pages[3, :8] = 0  # first word zero, the rest random
    mem.pages[5] = 0
    assert zero_rows(mem.pages).tolist() == [False, True, False, False, False, True]
    assert zero_rows(mem.pages[[5, 2, 1]]).tolist() == [True, False, True]


@pytest.mark.parametrize("bits", [[1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 0], [0, 0], [1, 1, 1], []])
def test_mask_runs_are_the_runs_of_its_frames(bits):
    mask = np.array(bits, bool)
    starts, ends = memory.mask_runs(mask)
    first, lengths = memory.runs(np.flatnonzero(mask))
    assert starts.tolist() == first.tolist() and (ends - starts).tolist() == lengths.tolist()

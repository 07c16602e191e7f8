"""DirtyLog: the emulated log-dirty bitmap (pvmig/hv/logdirty.py).

The key property: with writers that store the data first and mark after, and a reader
that reads-and-clears then copies, no write is ever lost; after the writer stops, one
last read-and-clear + copy leaves the copy equal to memory.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory

pytestmark = pytest.mark.timeout(30)


# ---- basics


def test_fresh_log_is_empty(make_log):
    log = make_log(64)
    assert log.nr_frames == 64
    assert log.count() == 0
    frames = log.read_and_clear()
    assert frames.dtype == np.uint32
    assert frames.tolist() == []


def test_mark_count_read_and_clear(make_log):
    log = make_log(100)
    log.mark(np.array([70, 3, 99, 3], dtype=np.int64))  # unordered, with a repeat
    log.mark(0)                                         # a single frame as an int
    log.mark(np.array([42], dtype=np.uint32))
    assert log.count() == 5
    assert log.count() == 5  # count is a peek: it does not clear

    frames = log.read_and_clear()
    assert frames.dtype == np.uint32
    assert frames.tolist() == [0, 3, 42, 70, 99]  # ascending, each once
    assert log.count() == 0
    assert not log.map.any()
    assert log.read_and_clear().tolist() == []  # a second read is empty


def test_marks_after_a_read_go_to_the_next_read(make_log):
    log = make_log(16)
    log.mark(np.array([1, 2]))
    assert log.read_and_clear().tolist() == [1, 2]
    log.mark(np.array([2, 15]))
    assert log.count() == 2
    assert log.read_and_clear().tolist() == [2, 15]
    assert log.read_and_clear().tolist() == []


def test_two_mappings_share_the_bitmap(make_log, shm_dir):
    writer = make_log(32)
    reader = DirtyLog.open(shm_dir / "log")
    try:
        assert reader.nr_frames == 32
        writer.mark(np.array([5, 31]))
        assert reader.count() == 2
        assert reader.read_and_clear().tolist() == [5, 31]
        assert writer.count() == 0  # the clear went to the shared file
    finally:
        reader.close()


def test_create_refuses_an_existing_file(make_log, shm_dir):
    log = make_log(8)
    log.mark(3)
    with pytest.raises(FileExistsError):
        DirtyLog.create(shm_dir / "log", 8)
    # The failed create neither removed nor reset the existing log.
    assert (shm_dir / "log").exists()
    assert log.read_and_clear().tolist() == [3]


# ---- the read-and-clear ordering, deterministically


class _HookedMap(np.ndarray):
    """The log's map, with a hook run once just before the first store of zeros.

    read_and_clear snapshots the map, then clears the frames of the snapshot. The hook
    plays a writer that strikes exactly between the snapshot and the clear.
    """

    def __setitem__(self, key, value):
        hook = getattr(self, "hook", None)
        if hook is not None and np.all(np.asarray(value) == 0):
            self.hook = None
            hook()
        super().__setitem__(key, value)


def test_a_write_between_snapshot_and_clear_is_never_lost(make_memory, make_log):
    mem, log = make_memory(8), make_log(8)
    shadow = np.zeros_like(mem.pages)

    def write(frame: int, value: int) -> None:
        mem.words[frame] = value  # data first ...
        log.mark(frame)           # ... then the mark

    write(2, 1)
    write(5, 1)
    hooked = log.map.view(_HookedMap)
    log.map = hooked

    def writer_strikes() -> None:
        write(2, 2)  # already marked: this mark is wiped by the clear, its data is in place
        write(6, 2)  # not in the snapshot: its mark must survive the clear

    hooked.hook = writer_strikes
    frames = log.read_and_clear()
    assert hooked.hook is None, "the hook did not run: the test did not interleave"
    shadow[frames] = mem.pages[frames]
    assert frames.tolist() == [2, 5]
    assert (shadow[2].view(np.uint64) == 2).all()  # the copy after the clear has the new data

    frames = log.read_and_clear()
    assert frames.tolist() == [6], "a mark made after the snapshot was wiped by the clear"
    shadow[frames] = mem.pages[frames]
    assert np.array_equal(shadow, mem.pages)


# ---- the read-and-clear ordering, against a real concurrent writer
#
# The writer (another process) runs in episodes; each episode stops it at an arbitrary
# point of its stream of writes, and the reader's final pass must then leave its copy
# equal to memory. Many episodes: many "last writes" put to the test, not just one.

EPISODES = 60
EPISODE_S = 0.02
NR_FRAMES = 32
GO, STOP, PARKED = 0, 1, 2  # the control words shared with the writer


def _writer(mem_path, log_path, ctl, ready, writes):
    """A vCPU in another process: every write stores a new counter in all words of the
    page(s), THEN marks them. Runs episode ctl[GO] until ctl[STOP] reaches it."""
    mem = GuestMemory.open(mem_path)
    log = DirtyLog.open(log_path)
    words = mem.words
    rng = np.random.default_rng(1234)
    # Skewed: half the writes hit 4 hot frames, so frames are often re-marked while
    # already marked (the case that read_and_clear's comment reasons about).
    picks = np.where(rng.random(1 << 16) < 0.5, rng.integers(0, 4, 1 << 16),
                     rng.integers(0, mem.nr_frames, 1 << 16))
    groups = [np.unique(rng.integers(0, mem.nr_frames, 3)) for _ in range(64)]
    n = episode = 0
    ready.set()
    deadline = time.monotonic() + 60  # never outlive a broken test
    while time.monotonic() < deadline:
        while ctl[GO] == episode and time.monotonic() < deadline:
            time.sleep(0.0001)
        if ctl[GO] < 0:
            break
        episode = ctl[GO]
        while ctl[STOP] < episode:
            for _ in range(32):
                n += 1
                if n % 8:
                    f = int(picks[n & 0xFFFF])
                    words[f] = n
                    log.mark(f)
                else:  # now and then a multi-frame write, as the guest's write_pages does
                    fs = groups[(n >> 3) & 63]
                    words[fs] = n
                    log.mark(fs)
        writes.value = n
        ctl[PARKED] = episode


def test_concurrent_writer_never_loses_a_write(make_memory, make_log):
    mem, log = make_memory(NR_FRAMES), make_log(NR_FRAMES)
    ctx = multiprocessing.get_context("spawn")
    ctl, ready, writes = ctx.RawArray("q", 3), ctx.Event(), ctx.RawValue("q", 0)
    proc = ctx.Process(target=_writer, daemon=True,
                       args=(str(mem.path), str(log.path), ctl, ready, writes))
    proc.start()
    shadow = np.zeros_like(mem.pages)
    rounds = busy_rounds = 0
    lost = []
    try:
        assert ready.wait(15), "the writer process did not start"
        for episode in range(1, EPISODES + 1):
            ctl[GO] = episode
            until = time.monotonic() + EPISODE_S
            while time.monotonic() < until:
                frames = log.read_and_clear()      # read-and-clear first ...
                shadow[frames] = mem.pages[frames]  # ... then copy
                rounds += 1
                busy_rounds += bool(len(frames))
            ctl[STOP] = episode
            until = time.monotonic() + 5
            while ctl[PARKED] != episode:
                assert proc.is_alive() and time.monotonic() < until, "the writer is stuck"
                time.sleep(0.0001)
            # The writer is parked between two writes: the final pass.
            frames = log.read_and_clear()
            shadow[frames] = mem.pages[frames]
            bad = np.flatnonzero((shadow != mem.pages).any(axis=1))
            if bad.size:
                lost.append((episode, bad.tolist(), shadow.view(np.uint64)[bad, 0].tolist(),
                             mem.words[bad, 0].tolist()))
                shadow[:] = mem.pages  # start the next episode in step
        ctl[GO] = -1
        proc.join(5)
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"
    finally:
        ctl[GO] = -1
        if proc.is_alive():
            proc.kill()
            proc.join()

    # Not vacuous: the writer wrote a lot, everywhere, while the reader went round.
    assert writes.value >= 10_000, f"only {writes.value} writes"
    assert busy_rounds >= 50, f"only {busy_rounds} of {rounds} reads found dirty frames"
    assert mem.pages.any(axis=1).all(), "some frame was never written"
    # Memory itself is whole: every page holds one counter in all its words.
    assert (mem.words == mem.words[:, :1]).all()

    assert not lost, "writes lost (episode, frames, copied counters, memory counters): " + \
        "; ".join(map(str, lost[:5]))
    assert np.array_equal(shadow, mem.pages)

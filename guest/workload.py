"""The self-verifying memory workload.

Each page the workload writes carries (frame, generation, checksum, magic) in its first
four words and a payload derived from (frame, generation); the generation table in
guest RAM says which generation each frame must hold (0: never written, all zeros).
A check regenerates what a frame must hold and compares the whole page, so a frame
the migration missed, tore or sent stale is caught, and reported with its frame and
the generation found.
"""

from __future__ import annotations

import numpy as np

from pvmig.hv.memory import PAGE_SIZE, PAGE_WORDS
from pvmig.pv import guestinfo
from pvmig.pv.content import PAGE_MAGIC, pattern  # noqa: F401 (the guest's names)

from .memapi import VcpuMemory


class MemoryWorkload:
    """Dirties pages at a rate with a hot set, and sweeps memory checking every frame."""

    def __init__(self, vm: VcpuMemory) -> None:
        self.vm = vm
        mem = vm.mem
        self.info = guestinfo.view(mem)
        i = self.info[0]
        self.gen_first = int(i["gen_first"])
        self.work_first = int(i["work_first"])
        self.work_frames = int(i["work_frames"])
        gen_words = mem.pages[self.gen_first:self.gen_first + int(i["gen_frames"])]
        self.gens = gen_words.reshape(-1).view(np.uint32)[:mem.nr_frames]
        self.hot_frames = max(1, int(self.work_frames * float(i["hot_fraction"])))

    # ---- writes

    def write(self, frames: np.ndarray) -> None:
        """Write the next generation of each frame (unique, ascending)."""
        gens = self.gens[frames] + np.uint32(1)
        self.vm.write_pages(frames, pattern(frames, gens))
        gen_table_frames = np.unique(self.gen_first + frames * 4 // PAGE_SIZE)
        with self.vm.writing(gen_table_frames):
            self.gens[frames] = gens
        self.count("pages_written", len(frames))

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n writes' frames: hot_share of them in the hot set, the rest anywhere."""
        hot = rng.random(n) < float(self.info[0]["hot_share"])
        idx = np.where(hot, rng.integers(0, self.hot_frames, n),
                       rng.integers(0, self.work_frames, n))
        return np.unique(idx + self.work_first)

    def fill(self, fraction: float, chunk: int = 4096) -> None:
        """Write generation 1 to the first `fraction` of the workload frames."""
        end = self.work_first + int(self.work_frames * fraction)
        for lo in range(self.work_first, end, chunk):
            self.write(np.arange(lo, min(lo + chunk, end), dtype=np.int64))

    # ---- checks

    def check(self, frames: np.ndarray) -> int:
        """Check frames against the generation table; return how many failed."""
        gens = self.gens[frames]
        found = self.vm.words[frames]
        bad = np.flatnonzero((found != pattern(frames, gens)).any(axis=1))
        self.count("checks_run", len(frames))
        self.count("checks_since_resume", len(frames))
        if len(bad):
            self._record_failures(frames[bad], gens[bad], found[bad, 1])
        return len(bad)

    def sweep_step(self, n: int) -> None:
        """Check the next n frames of the rolling sweep over all workload frames."""
        i = self.info[0]
        lo = self.work_first + int(i["sweep_cursor"])
        hi = min(lo + n, self.work_first + self.work_frames)
        self.check(np.arange(lo, hi, dtype=np.int64))
        done = hi >= self.work_first + self.work_frames
        with self.vm.writing(0):
            self.info["sweep_cursor"] = 0 if done else hi - self.work_first
        if done:
            self.count("sweeps", 1)
            self.count("sweeps_since_resume", 1)

    def _record_failures(self, frames, expected, found) -> None:
        with self.vm.writing(0):
            info = self.info
            info["checks_failed"] += len(frames)
            info["failed_since_resume"] += len(frames)
            n = int(info[0]["nr_failures"])
            for f, e, g in zip(frames, expected, found):
                if n >= guestinfo.MAX_FAILURES:
                    break
                info[0]["failures"][n] = (int(f), int(e), int(g))
                n += 1
            info["nr_failures"] = n

    def count(self, name: str, n: int) -> None:
        with self.vm.writing(0):
            self.info[name] += n

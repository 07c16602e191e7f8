"""Shared pytest fixtures.

Keep this file generic: each section below is owned by the tests that use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory

# --------------------------------------------------------------------------------------
# The fault suite: `pytest --faults` runs it whole (and nothing else); without the flag
# its quick subset runs with everything else.
# --------------------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--faults", action="store_true",
                     help="run the whole fault suite (tests marked faults), and only it")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--faults"):
        chosen = [i for i in items if i.get_closest_marker("faults")]
        config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
        items[:] = chosen
        return
    full = [i for i in items if i.get_closest_marker("full_faults")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [i for i in items if i not in full]


# --------------------------------------------------------------------------------------
# Unit tests: shared-memory files (guest RAM, log-dirty bitmap)
#
# The files are ordinary files under pytest's tmp_path: MAP_SHARED works the same on
# any filesystem, and pytest removes them with the rest of tmp_path.
# --------------------------------------------------------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    """A fresh directory for this test's shared-memory files."""
    d = tmp_path / "shm"
    d.mkdir()
    return d


@pytest.fixture
def make_memory(shm_dir: Path) -> Callable[..., GuestMemory]:
    """Factory: make_memory(nr_frames, name="ram") -> a new GuestMemory, closed after the test."""
    made: list[GuestMemory] = []

    def make(nr_frames: int, name: str = "ram") -> GuestMemory:
        mem = GuestMemory.create(shm_dir / name, nr_frames)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


@pytest.fixture
def make_log(shm_dir: Path) -> Callable[..., DirtyLog]:
    """Factory: make_log(nr_frames, name="log") -> a new DirtyLog, closed after the test."""
    made: list[DirtyLog] = []

    def make(nr_frames: int, name: str = "log") -> DirtyLog:
        log = DirtyLog.create(shm_dir / name, nr_frames)
        made.append(log)
        return log

    yield make
    for log in made:
        log.close()

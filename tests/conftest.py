"""Shared pytest fixtures.

Keep this file generic: each section below is owned by the tests that use it.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Callable

import pytest
from support import local_cluster

from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory
from pvmig.rpc.data_channel import Connection

# --------------------------------------------------------------------------------------
# Tiers, by directory: tests/unit (in-process, fast), tests/e2e (agents and guests as
# real processes), tests/faults (the fault suite: e2e, with faults injected). Each
# test gets its tier's markers here, not in its file. `make test` runs the unit tier and
# the e2e tests marked quick (-m "unit or quick"); `make test-all` runs everything
# (--all); `pytest --faults` runs the whole fault suite and only it. Without --all or
# --faults, the fault table's full set (full_faults) is left out.
# --------------------------------------------------------------------------------------

TIERS = {"unit": ("unit",), "e2e": ("e2e",), "faults": ("e2e", "faults")}


def pytest_addoption(parser):
    parser.addoption("--faults", action="store_true",
                     help="run the whole fault suite (tests/faults and tests marked faults), "
                     "and only it")
    parser.addoption("--all", action="store_true",
                     help="run every test, the fault table's full set included")


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).parent
    for item in items:
        tier = Path(item.fspath).relative_to(tests_dir).parts[0]
        for marker in TIERS.get(tier, ()):
            item.add_marker(marker)
    if config.getoption("--all"):
        return
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


@pytest.fixture
def pair():
    """Two ends of a data connection (a socket pair): (source's, destination's)."""
    a, b = socket.socketpair()
    yield Connection(a, "source"), Connection(b, "destination")
    a.close()
    b.close()


# --------------------------------------------------------------------------------------
# End-to-end tests: agents as processes (the one factory; module-scoped fixtures use
# support.local_cluster, which it wraps)
# --------------------------------------------------------------------------------------


@pytest.fixture
def make_cluster(tmp_path: Path):
    """Factory: make_cluster(names=("a", "b"), session_timeout_s=None, extra_args=None)
    -> started agents, stopped after the test. The first lives in tmp_path itself."""
    with contextlib.ExitStack() as stack:
        made = []

        def make(names=("a", "b"), **kwargs):
            base = tmp_path if not made else tmp_path / f"cluster{len(made)}"
            made.append(stack.enter_context(local_cluster(base, names, **kwargs)))
            return made[-1]
        yield make


@pytest.fixture
def cluster(make_cluster):
    """Two agents, a and b, with the default lease."""
    return make_cluster()

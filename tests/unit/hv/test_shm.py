"""Shared-memory files (shm.py): a file the file system cannot back is refused when it
is made, never a SIGBUS in whoever writes a page of it later."""

from __future__ import annotations

import errno

import pytest
from support import tmpfs

from pvmig.hv.shm import SharedFile


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with tmpfs(tmp_path / "tiny", "4m") as where:
        yield where


def test_a_file_larger_than_the_room_is_refused(tiny_tmpfs):
    with pytest.raises(OSError) as info:
        SharedFile.create(tiny_tmpfs / "ram", 8 << 20)
    assert info.value.errno == errno.ENOSPC and "no room for 8 MiB" in str(info.value)
    assert not list(tiny_tmpfs.iterdir())  # nothing left behind


def test_a_file_that_fits_is_whole(tiny_tmpfs):
    f = SharedFile.create(tiny_tmpfs / "ram", 2 << 20)
    try:
        f.bytes[:] = 7  # every page backed: no SIGBUS
        assert int(f.bytes.sum()) == 7 * (2 << 20)
    finally:
        f.close()
        f.unlink()

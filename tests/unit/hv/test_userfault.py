"""userfaultfd (pvmig/hv/userfault.py): a guest process blocked on frames that have not
arrived, served by another process; and the hazard of a second mapping.

Real processes, a real /dev/shm file: a child registers its mapping and hands the
descriptor over a socketpair (SCM_RIGHTS), as the guest does to its agent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pvmig.hv import userfault
from pvmig.hv.memory import PAGE_SIZE, GuestMemory

pytestmark = pytest.mark.timeout(60)
FRAMES = 64

# The child: maps the RAM sparse, registers, hands over (fd, base), then reads the
# frames it is told and prints each one's first word.
CHILD = textwrap.dedent("""
    import socket, sys
    import numpy as np
    from pvmig.hv import userfault
    from pvmig.hv.memory import GuestMemory
    sock = socket.socket(fileno=int(sys.argv[2]))
    mem = GuestMemory.open(sys.argv[1], populate=False)
    reg = userfault.register(mem.mapping, mem.ram_bytes)
    socket.send_fds(sock, [f"{reg.base}".encode().ljust(32)], [reg.fd])
    for line in sock.makefile():
        frames = [int(x) for x in line.split()]
        print(" ".join(str(int(mem.words[f, 0])) for f in frames), flush=True)
""")


@pytest.fixture
def guest():
    if os.geteuid() != 0:
        pytest.skip("userfaultfd on shared memory needs root here")
    path = Path("/dev/shm") / f"pvmig-uffd-test-{os.getpid()}"  # (tmpfs: a disk file cannot)
    mem = GuestMemory.create(path, FRAMES, populate=False)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True)
    theirs.close()
    data, fds, _, _ = socket.recv_fds(ours, 32, 1)
    uf = userfault.UserFault(fds[0], int(data.decode()), FRAMES)
    try:
        yield mem, uf, ours, proc
    finally:
        proc.kill()
        proc.wait()
        uf.close()
        ours.close()
        mem.close()
        mem.unlink()


def _ask(sock, frames) -> None:
    sock.sendall((" ".join(map(str, frames)) + "\n").encode())


def _page(value: int) -> np.ndarray:
    return np.full((1, PAGE_SIZE // 8), value, np.uint64).view(np.uint8)


def test_a_read_of_a_missing_frame_blocks_until_placed(guest):
    mem, uf, sock, proc = guest
    _ask(sock, [5])
    faults = np.empty(0, np.uint32)
    while not len(faults):
        faults = uf.faults(timeout_s=10)
    assert faults.tolist() == [5]
    assert not len(uf.place(5, _page(0xABC)))
    assert proc.stdout.readline().split() == [str(0xABC)]
    assert mem.words[5, 0] == 0xABC  # (placed in the file: the agent sees it too)


def test_runs_and_zero_pages_are_placed_and_a_page_goes_in_once(guest):
    mem, uf, sock, proc = guest
    rows = np.concatenate([_page(100 + i) for i in range(4)])
    assert not len(uf.place(10, rows))
    assert uf.place(11, _page(999)).tolist() == [11]  # there already: not over it
    assert not len(uf.place_zero(np.array([20, 21, 30], np.uint32)))
    _ask(sock, [10, 11, 12, 13, 20, 30])
    assert proc.stdout.readline().split() == ["100", "101", "102", "103", "0", "0"]


def test_a_second_mapping_takes_a_missing_frame(guest):
    """The hazard: dom0 reading a frame that has not arrived through its own mapping
    allocates a zero page; the guest then reads it without a fault, and the page that
    arrives later cannot go in."""
    mem, uf, sock, proc = guest
    assert mem.words[7, 0] == 0  # the agent's mapping: a read, no fault
    assert uf.place(7, _page(0x77)).tolist() == [7]
    _ask(sock, [7])
    assert proc.stdout.readline().split() == ["0"]

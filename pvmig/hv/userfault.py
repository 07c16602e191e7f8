"""userfaultfd: frames that have not arrived, for post-copy (Linux's, through ctypes).

The guest registers its RAM mapping in MISSING mode and hands the descriptor to its
agent (`register`, in the guest process); from then on a guest access to a frame whose
page is not in the RAM file blocks in the kernel, and the agent reads the fault
(`UserFault.faults`) and places the page (`UserFault.place`: UFFDIO_COPY, atomic, wakes
the faulting thread; zero pages with UFFDIO_ZEROPAGE).

The agent must be another process than the guest: the faulting Python thread holds its
GIL, so a handler thread in the guest could never run. And nothing may write or even
read a missing frame through another mapping of the file (the agent's own): shmem
allocates a zero page for it, the guest then sees that page without a fault, and the
later copy fails with EEXIST (`place` reports such frames as taken).

x86-64 only: the syscall number and the ioctl numbers below are that ABI's
(include/uapi/linux/userfaultfd.h).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
from dataclasses import dataclass

import numpy as np

from pvmig.hv.memory import PAGE_SIZE, runs

_SYS_USERFAULTFD = 323
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_UNREGISTER = 0x8010AA01
_UFFDIO_COPY = 0xC028AA03
_UFFDIO_ZEROPAGE = 0xC020AA04
_MODE_MISSING = 1
_EVENT_PAGEFAULT = 0x12
_MSG = struct.Struct("<BBHIQQQ")  # event, reserved..., flags, address, (feat)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


class Unsupported(OSError):
    """userfaultfd is not available here (no permission, an old kernel, a seccomp filter)."""


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _ZeroPage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """0, or the errno (the caller decides what it means)."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


def address_of(mapping: mmap.mmap) -> int:
    """Where a mapping starts in this process."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


@dataclass(frozen=True)
class Registration:
    """What the guest hands to its agent: the descriptor and where its RAM is mapped."""

    fd: int
    base: int
    size: int


def register(mapping: mmap.mmap, size: int) -> Registration:
    """In the guest: every page of its RAM mapping not in the file faults to the holder
    of the returned descriptor. Raises Unsupported where userfaultfd is not allowed."""
    # (non-blocking: poll() on a blocking userfaultfd answers POLLERR)
    fd = _libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        raise Unsupported(e, f"userfaultfd: {os.strerror(e)} (it needs root, or "
                             "CAP_SYS_PTRACE in a container, and Linux 4.11 for shared memory)")
    try:
        api = _Api(_UFFD_API, 0, 0)
        if (e := _ioctl(fd, _UFFDIO_API, api)) != 0:
            raise Unsupported(e, f"UFFDIO_API: {os.strerror(e)}")
        base = address_of(mapping)
        reg = _Register(base, size, _MODE_MISSING, 0)
        if (e := _ioctl(fd, _UFFDIO_REGISTER, reg)) != 0:
            raise Unsupported(e, f"UFFDIO_REGISTER of {size} bytes: {os.strerror(e)} (the "
                                 "RAM file must be on tmpfs, as /dev/shm is)")
    except BaseException:
        os.close(fd)
        raise
    return Registration(fd, base, size)


class UserFault:
    """The agent's side of one guest's registration: its faults, and page placement.

    `place` runs in several threads at once (the urgent lane's and the push's): each
    ioctl is atomic, and a page two of them race for goes in once (EEXIST for the
    other, which is told the frame was there)."""

    def __init__(self, fd: int, base: int, nr_frames: int) -> None:
        self.fd, self.base, self.nr_frames = fd, base, nr_frames
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.closed = False

    def faults(self, timeout_s: float, max_events: int = 64) -> np.ndarray | None:
        """Frames the guest is blocked on (possibly repeated), waiting at most timeout_s;
        None once the guest's memory is gone (it exited or was killed)."""
        events = self._poll.poll(int(timeout_s * 1000))
        if not events:
            return np.empty(0, np.uint32)
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return None
        try:
            raw = os.read(self.fd, _MSG.size * max_events)
        except BlockingIOError:
            return np.empty(0, np.uint32)
        except OSError as e:
            if e.errno in (errno.EBADF, errno.ENODEV):
                return None
            raise
        if not raw:
            return None
        msgs = np.frombuffer(raw, np.dtype([("event", "u1"), ("_r", "V7"), ("flags", "<u8"),
                                            ("address", "<u8"), ("_f", "V8")]))
        addresses = msgs["address"][msgs["event"] == _EVENT_PAGEFAULT]
        return ((addresses - np.uint64(self.base)) // np.uint64(PAGE_SIZE)).astype(np.uint32)

    def place(self, first: int, rows: np.ndarray) -> np.ndarray:
        """Copy whole pages (rows: n x 4096 u8, C-contiguous) into frames first.. as one
        run; return the frames that were already there (EEXIST), not placed."""
        n = len(rows)
        src = rows.ctypes.data
        taken: list[int] = []
        done = 0
        while done < n:
            arg = _Copy(self.base + (first + done) * PAGE_SIZE, src + done * PAGE_SIZE,
                        (n - done) * PAGE_SIZE, 0, 0)
            e = _ioctl(self.fd, _UFFDIO_COPY, arg)
            copied = max(int(arg.copy), 0) // PAGE_SIZE
            done += copied
            if e == 0:
                continue
            if e == errno.EEXIST or arg.copy == -errno.EEXIST:
                taken.append(first + done)
                done += 1
            elif e == errno.EAGAIN:
                continue  # (the guest's mm changed under the copy: try the rest again)
            else:
                raise OSError(e, f"UFFDIO_COPY of frame {first + done}: {os.strerror(e)}")
        return np.asarray(taken, np.uint32)

    def place_zero(self, frames: np.ndarray) -> np.ndarray:
        """Zero pages into frames (ascending), an ioctl a run; the frames already there,
        as place."""
        taken: list[int] = []
        for first, n in zip(*(a.tolist() for a in runs(frames))):
            done = 0
            while done < n:
                arg = _ZeroPage(self.base + (first + done) * PAGE_SIZE,
                                (n - done) * PAGE_SIZE, 0, 0)
                e = _ioctl(self.fd, _UFFDIO_ZEROPAGE, arg)
                done += max(int(arg.zeropage), 0) // PAGE_SIZE
                if e == 0 or e == errno.EAGAIN:
                    continue
                if e == errno.EEXIST:
                    taken.append(first + done)
                    done += 1
                elif e == errno.EINVAL:  # no UFFDIO_ZEROPAGE for this memory: copy zeros
                    zeros = np.zeros((n - done, PAGE_SIZE), np.uint8)
                    taken.extend(self.place(first + done, zeros).tolist())
                    done = n
                else:
                    raise OSError(e, f"UFFDIO_ZEROPAGE of frame {first + done}: "
                                     f"{os.strerror(e)}")
        return np.asarray(taken, np.uint32)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

"""Grant tables (v1): how a guest lets a backend reach one of its frames.

A grant table is the hypervisor's, not the guest's: its frames live in a shared-memory
file of their own, beside guest RAM, never inside it. The migration stream therefore
never carries it: on the destination the guest finds a fresh, empty table and its
frontends grant again as they reconnect (as in Xen; shared/XEN-ABI.md, "Grant table v1").

Two sides, two processes, one file:

- `GuestGrants` is the guest kernel's side (Linux's gnttab_*): it writes entries (flags,
  domid, frame) to grant a frame to a domain, and revokes them when the backend is done.
  Writing an entry is not a write to guest RAM and marks nothing dirty.
- `GrantTable` is the hypervisor's side, in the host agent: backends map, unmap and copy
  through it. It checks each entry, keeps the entry's in-use bits (GTF_reading,
  GTF_writing), and marks frames in the domain's log-dirty bitmap exactly as Xen does:

    mapping ...................................... marks nothing
    unmapping a writable mapping ................. marks the frame, at the unmap
    a write through a mapping that stays mapped .. never marked (persistent grants)
    grant copy into a guest frame ................ marks the frame, after the copy
    grant copy out of a guest frame .............. marks nothing
    policy backend_log (like vhost's dirty log) .. Mapping.written() marks at the write

  The first rows are the hazard pvmig exists to measure: a backend that writes through
  a mapping and unmaps after the final bitmap read leaves a frame the migration missed.

Two writers, one u16. The entry's flags hold the guest's bits (type, readonly) and the
hypervisor's in-use bits, and both processes store to them. Xen closes that race with
cmpxchg on both sides; Python has no compare-and-swap on shared memory, so here the
protocol keeps the two writers apart in time instead, and both sides rely on it:

- the hypervisor sets in-use bits only on an entry that is granted (it checks first),
  and clears them only on an entry it holds in use;
- the guest writes the flags of an entry only to grant it (while it is invalid, so the
  hypervisor leaves it alone) and to revoke it, and it revokes only after the backend has
  answered the request that used the grant (the backend has unmapped or finished its
  copy by then), and never while an in-use bit is set.

A refused operation raises `GrantError` (an InvalidArgument: it travels as one over
gRPC) with one line naming the ref and what is wrong, and changes nothing but the
refusal counter.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable

import numpy as np

from pvmig.errors import InvalidArgument, ResourceExhausted
from pvmig.hv.foreign_writes import MAPPED, TRACKED, ForeignWrites
from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import PAGE_SIZE, GuestMemory
from pvmig.hv.shm import SharedFile

# Entry flags (xen/include/public/grant_table.h). The type is in the low two bits.
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 0x4
GTF_reading = 0x8   # set by the hypervisor while the frame is mapped or being copied
GTF_writing = 0x10  # ... mapped writable or being copied into
GTF_in_use = GTF_reading | GTF_writing

GRANT_ENTRY = np.dtype([("flags", "<u2"), ("domid", "<u2"), ("frame", "<u4")])
ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY.itemsize  # 512
DEFAULT_NR_FRAMES = 4                                  # 2048 entries
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
NR_RESERVED_ENTRIES = 2  # refs 0 and 1: the guest's allocator never hands them out
DOMID_MAX = 0xFFFF
FRAME_MAX = 0xFFFFFFFF

_TYPE_NAMES = {GTF_invalid: "invalid", GTF_permit_access: "permit_access",
               GTF_accept_transfer: "accept_transfer", GTF_transitive: "transitive"}


class GrantMode(StrEnum):
    """The two ways a backend reaches a granted frame (GNTTABOP_map_grant_ref, _copy)."""

    MAP = "map"    # a mapping: the writes through it are logged only at the unmap
    COPY = "copy"  # a copy: logged at the copy


class GrantError(InvalidArgument):
    """A grant operation refused: a bad ref, a wrong domain, a read-only violation..."""


@dataclass(frozen=True)
class GrantStatistics:
    active: int      # mappings held now
    writable: int    # ... of which writable
    maps: int
    unmaps: int
    copies_in: int   # grant copies into guest frames
    copies_out: int  # grant copies out of guest frames
    refused: int     # operations refused with a GrantError


class _Table:
    """The entries of one grant-table file, as numpy views of its fields."""

    def __init__(self, shared: SharedFile) -> None:
        if shared.size == 0 or shared.size % PAGE_SIZE:
            raise ValueError(f"{shared.path}: size {shared.size} is not a whole number "
                             "of grant frames")
        self._shared = shared
        self.path = shared.path
        self.nr_frames = shared.size // PAGE_SIZE
        self.nr_entries = self.nr_frames * ENTRIES_PER_FRAME
        self.entries = shared.bytes.view(GRANT_ENTRY)
        self.flags = self.entries["flags"]
        self.domid = self.entries["domid"]
        self.frame = self.entries["frame"]

    def close(self) -> None:
        self.entries = self.flags = self.domid = self.frame = None  # type: ignore[assignment]
        self._shared.close()

    def unlink(self) -> None:
        self._shared.unlink()


def _create_file(path: str | os.PathLike, nr_frames: int) -> SharedFile:
    if nr_frames <= 0:
        raise ValueError(f"a grant table needs at least one frame, not {nr_frames}")
    return SharedFile.create(path, nr_frames * PAGE_SIZE)


class Mapping:
    """One grant mapping held by a backend: `page` is the guest frame, seen through it.

    After the unmap the numpy view still reaches the frame (a view cannot be revoked);
    a backend that writes through it then does what a buggy Xen backend cannot, and the
    write is, like every write through a mapping, never marked."""

    def __init__(self, table: "GrantTable", *, handle: int, ref: int, frame: int,
                 mapper: int, writable: bool, page: np.ndarray) -> None:
        self._table = table
        self.handle = handle
        self.ref = ref
        self.frame = frame
        self.mapper = mapper
        self.writable = writable
        self.page = page

    def written(self, offset: int = 0, nbytes: int = 0) -> None:
        """Tell the hypervisor the backend wrote through this mapping. Marks the frame
        dirty only under the policy backend_log (vhost's dirty log); otherwise nothing
        tracks a write through a grant map, as in Xen. Takes a ring's on_write
        arguments (offset, nbytes), which it does not need."""
        self._table._written(self)

    def __repr__(self) -> str:
        kind = "writable" if self.writable else "read-only"
        return (f"<Mapping handle {self.handle}: grant ref {self.ref} -> frame "
                f"{self.frame}, {kind}, by domain {self.mapper}>")


class GrantTable:
    """The hypervisor's side of one domain's grant table (it lives in the host agent).

    Thread-safe: backends may map, unmap and copy from several threads."""

    def __init__(self, shared: SharedFile, *, domid: int, memory: GuestMemory,
                 dirty: DirtyLog, backend_log: bool = False) -> None:
        self._table = _Table(shared)
        self.path = self._table.path
        self.domid = domid
        self.memory = memory
        self.dirty = dirty
        self.backend_log = backend_log
        # the verifier's journal of what dom0 wrote into the guest (foreign_writes.py)
        self.journal: ForeignWrites | None = None
        self._lock = threading.Lock()
        self._maptrack: dict[int, Mapping] = {}
        self._next_handle = 1
        self._pins: dict[int, int] = {}           # ref -> mappings held
        self._write_pins: dict[int, int] = {}     # ref -> writable mappings held
        self._maps = self._unmaps = self._copies_in = self._copies_out = self._refused = 0
        # Post-copy at a destination: called with a frame before any map or copy reaches
        # it (outside the lock: it may wait for the frame to arrive). None: no paging.
        self.before_access: Callable[[int], None] | None = None

    @classmethod
    def create(cls, path: str | os.PathLike, *, domid: int, memory: GuestMemory,
               dirty: DirtyLog, nr_frames: int = DEFAULT_NR_FRAMES,
               backend_log: bool = False) -> "GrantTable":
        """A fresh, empty table of `nr_frames` grant frames (512 entries each)."""
        return cls(_create_file(path, nr_frames), domid=domid, memory=memory, dirty=dirty,
                   backend_log=backend_log)

    @classmethod
    def open(cls, path: str | os.PathLike, *, domid: int, memory: GuestMemory,
             dirty: DirtyLog, backend_log: bool = False) -> "GrantTable":
        return cls(SharedFile.open(path), domid=domid, memory=memory, dirty=dirty,
                   backend_log=backend_log)

    @property
    def nr_frames(self) -> int:
        return self._table.nr_frames

    @property
    def nr_entries(self) -> int:
        return self._table.nr_entries

    @property
    def entries(self) -> np.ndarray:
        """The entries themselves (a structured view: flags, domid, frame)."""
        return self._table.entries

    # ---- map and unmap

    def map(self, ref: int, *, mapper: int, writable: bool) -> Mapping:
        """Map the frame granted by `ref` for domain `mapper`. Marks nothing."""
        self._reach(ref)
        with self._lock:
            flags, frame = self._check(ref, mapper, writable=writable,
                                       what="map it writable")
            bits = GTF_reading | (GTF_writing if writable else 0)
            self._table.flags[ref] = flags | bits
            self._pins[ref] = self._pins.get(ref, 0) + 1
            if writable:
                self._write_pins[ref] = self._write_pins.get(ref, 0) + 1
            page = self.memory.pages[frame]
            if not writable:
                page = page.view()
                page.setflags(write=False)
            handle = self._next_handle
            self._next_handle += 1
            mapping = Mapping(self, handle=handle, ref=ref, frame=frame, mapper=mapper,
                              writable=writable, page=page)
            self._maptrack[handle] = mapping
            self._maps += 1
            return mapping

    def unmap(self, handle: int) -> None:
        """Drop a mapping. Unmapping a writable one marks its frame (Xen's rule: the
        writes through a mapping are accounted for at the unmap)."""
        with self._lock:
            mapping = self._maptrack.get(handle)
            if mapping is None:
                self._refused += 1
                raise GrantError(f"grant handle {handle} of domain {self.domid} is not "
                                 "mapped")
            self._unmap(mapping)

    def unmap_all(self, mapper: int) -> int:
        """Unmap every mapping held by domain `mapper` (a backend quiescing or
        disconnecting); each writable one marks its frame. Returns how many."""
        with self._lock:
            held = [m for m in self._maptrack.values() if m.mapper == mapper]
            for mapping in held:
                self._unmap(mapping)
            return len(held)

    def mappings(self, mapper: int | None = None) -> list[Mapping]:
        """The mappings held now (by `mapper`, or by anyone), oldest first."""
        with self._lock:
            return [m for m in self._maptrack.values()
                    if mapper is None or m.mapper == mapper]

    # ---- copy

    def copy_to_guest(self, ref: int, offset: int, data: bytes | np.ndarray, *,
                      copier: int) -> None:
        """Grant copy into the granted frame at `offset`; marks the frame after the
        copy (a copy is tracked at the copy). Needs a writable grant for `copier`."""
        self._reach(ref)
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            flags, frame = self._check(ref, copier, writable=True, what="copy into it")
            self._check_span(ref, offset, len(src), "into")
            self._table.flags[ref] = flags | GTF_reading | GTF_writing
            try:
                self.memory.pages[frame, offset:offset + len(src)] = src
            finally:
                self._release_bits(ref)
            # Data first, mark after: see logdirty.py for why the order matters.
            self.dirty.mark(frame)
            if self.journal is not None:
                self.journal.write(frame, TRACKED)
            self._copies_in += 1

    def copy_from_guest(self, ref: int, offset: int, length: int, *,
                        copier: int) -> bytes:
        """Grant copy out of the granted frame (a read-only grant will do). Marks
        nothing."""
        self._reach(ref)
        with self._lock:
            flags, frame = self._check(ref, copier, writable=False, what="")
            self._check_span(ref, offset, length, "out of")
            self._table.flags[ref] = flags | GTF_reading
            try:
                data = self.memory.pages[frame, offset:offset + length].tobytes()
            finally:
                self._release_bits(ref)
            self._copies_out += 1
            return data

    # ---- the rest

    def statistics(self) -> GrantStatistics:
        with self._lock:
            return GrantStatistics(
                active=len(self._maptrack),
                writable=sum(m.writable for m in self._maptrack.values()),
                maps=self._maps, unmaps=self._unmaps, copies_in=self._copies_in,
                copies_out=self._copies_out, refused=self._refused)

    def close(self) -> None:
        self._table.close()

    def unlink(self) -> None:
        self._table.unlink()

    # ---- internals (called with the lock held)

    def _reach(self, ref: int) -> None:
        """The paging hook for the frame `ref` names (a bad ref is _check's to refuse)."""
        if self.before_access is not None and 0 <= ref < self._table.nr_entries:
            frame = int(self._table.frame[ref])
            if frame < self.memory.nr_frames:
                self.before_access(frame)

    def _check(self, ref: int, user: int, *, writable: bool, what: str) -> tuple[int, int]:
        """The entry's flags and frame, if domain `user` may use `ref` as asked."""
        def refuse(problem: str) -> GrantError:
            self._refused += 1
            return GrantError(f"grant ref {ref} of domain {self.domid} {problem}")

        if not 0 <= ref < self._table.nr_entries:
            raise refuse(f"is out of range ({self._table.nr_entries} entries)")
        # Flags first, then the rest: the guest writes domid and frame before the flags,
        # so an entry whose flags say granted has its domid and frame in place.
        flags = int(self._table.flags[ref])
        kind = flags & GTF_type_mask
        if kind == GTF_invalid:
            raise refuse(f"is not granted (flags {flags:#x})")
        if kind != GTF_permit_access:
            raise refuse(f"is a {_TYPE_NAMES[kind]} grant, not permit_access "
                         f"(flags {flags:#x})")
        granted_to = int(self._table.domid[ref])
        if granted_to != user:
            raise refuse(f"is for domain {granted_to}, not domain {user}")
        if writable and flags & GTF_readonly:
            raise refuse(f"is read-only: cannot {what}")
        frame = int(self._table.frame[ref])
        if frame >= self.memory.nr_frames:
            raise refuse(f"names frame {frame}, beyond the domain's "
                         f"{self.memory.nr_frames} frames")
        return flags, frame

    def _check_span(self, ref: int, offset: int, length: int, direction: str) -> None:
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            self._refused += 1
            raise GrantError(f"grant copy of {length} bytes at offset {offset} {direction} "
                             f"grant ref {ref} of domain {self.domid} does not fit in "
                             f"the page ({PAGE_SIZE} bytes)")

    def _unmap(self, mapping: Mapping) -> None:
        del self._maptrack[mapping.handle]
        ref = mapping.ref
        self._pins[ref] -= 1
        if not self._pins[ref]:
            del self._pins[ref]
        if mapping.writable:
            self._write_pins[ref] -= 1
            if not self._write_pins[ref]:
                del self._write_pins[ref]
        self._release_bits(ref)
        if mapping.writable:
            self.dirty.mark(mapping.frame)
        self._unmaps += 1

    def _release_bits(self, ref: int) -> None:
        """Clear the in-use bits no mapping holds any more: writing goes with the last
        writable mapping, reading with the last mapping (as Xen's unmap does)."""
        keep = (GTF_reading if ref in self._pins else 0) | \
               (GTF_writing if ref in self._write_pins else 0)
        flags = int(self._table.flags[ref])
        self._table.flags[ref] = (flags & ~GTF_in_use) | keep

    def _written(self, mapping: Mapping) -> None:
        with self._lock:
            if self._maptrack.get(mapping.handle) is not mapping:
                self._refused += 1
                raise GrantError(f"grant handle {mapping.handle} of domain {self.domid} "
                                 f"(grant ref {mapping.ref}) is not mapped any more")
            if not mapping.writable:
                self._refused += 1
                raise GrantError(f"grant handle {mapping.handle} of domain {self.domid} "
                                 f"maps grant ref {mapping.ref} read-only: nothing can "
                                 "have been written through it")
        if self.backend_log:
            self.dirty.mark(mapping.frame)
        if self.journal is not None:
            self.journal.write(mapping.frame, TRACKED if self.backend_log else MAPPED)


class GuestGrants:
    """The guest kernel's side of its grant table (gnttab_grant_foreign_access and
    gnttab_end_foreign_access_ref), in the guest process, over the same file.

    The free list is the guest's own, in process memory. Thread-safe."""

    def __init__(self, shared: SharedFile, *, domid: int) -> None:
        self._table = _Table(shared)
        self.path = self._table.path
        self.domid = domid
        self._lock = threading.Lock()
        self._free: deque[int] = deque()
        self._is_free: set[int] = set()
        self.reset()

    @classmethod
    def open(cls, path: str | os.PathLike, *, domid: int) -> "GuestGrants":
        return cls(SharedFile.open(path), domid=domid)

    @property
    def nr_entries(self) -> int:
        return self._table.nr_entries

    @property
    def nr_free(self) -> int:
        return len(self._free)

    def grant(self, frame: int, *, domid: int, readonly: bool) -> int:
        """Grant `frame` to domain `domid`; returns the ref (never 0 or 1, which are
        reserved for the console and xenstore)."""
        self._check_args(frame, domid)
        with self._lock:
            if not self._free:
                raise ResourceExhausted(
                    f"domain {self.domid} has no free grant ref ({self.nr_entries} "
                    f"entries, {NR_RESERVED_ENTRIES} reserved)")
            ref = self._free.popleft()
            self._is_free.discard(ref)
            self._write(ref, frame, domid, readonly)
            return ref

    def grant_ref(self, ref: int, frame: int, *, domid: int, readonly: bool) -> None:
        """Grant `frame` to domain `domid` through a chosen ref (the reserved ones
        included: that is how the console and xenstore rings are granted)."""
        self._check_ref(ref)
        self._check_args(frame, domid)
        with self._lock:
            flags = int(self._table.flags[ref])
            if flags & GTF_type_mask != GTF_invalid:
                raise GrantError(f"grant ref {ref} of domain {self.domid} is already "
                                 f"granted (flags {flags:#x}): revoke it first")
            if ref in self._is_free:
                self._is_free.discard(ref)
                self._free.remove(ref)
            self._write(ref, frame, domid, readonly)

    def revoke(self, ref: int) -> bool:
        """End foreign access (Linux's gnttab_end_foreign_access_ref): only while neither
        GTF_reading nor GTF_writing is set; then the entry is invalid and the ref free.
        Returns False, leaving the grant in place, while the hypervisor holds it in use.

        Call it only once the backend has answered the request that used the grant:
        without cmpxchg, that ordering is what keeps this store from racing the
        hypervisor's setting of the in-use bits (see the module docstring)."""
        self._check_ref(ref)
        with self._lock:
            flags = int(self._table.flags[ref])
            if flags & GTF_type_mask == GTF_invalid:
                raise GrantError(f"grant ref {ref} of domain {self.domid} is not granted "
                                 f"(flags {flags:#x}): nothing to revoke")
            if flags & GTF_in_use:
                return False
            self._table.flags[ref] = GTF_invalid
            if ref >= NR_RESERVED_ENTRIES:
                self._free.append(ref)
                self._is_free.add(ref)
            return True

    def in_use(self, ref: int) -> bool:
        """Whether the hypervisor holds the grant mapped or in a copy right now."""
        self._check_ref(ref)
        return bool(int(self._table.flags[ref]) & GTF_in_use)

    def reset(self) -> None:
        """Forget every grant: what a resumed guest does with the fresh table it finds on
        the new host. The free list is rebuilt from the table: every unreserved ref whose
        entry is invalid (all of them, on a fresh table; on an old one, entries still
        granted stay out of the list until revoked)."""
        with self._lock:
            kinds = self._table.flags[NR_RESERVED_ENTRIES:] & GTF_type_mask
            free = np.flatnonzero(kinds == GTF_invalid) + NR_RESERVED_ENTRIES
            self._free = deque(free.tolist())
            self._is_free = set(self._free)

    def close(self) -> None:
        self._table.close()

    # ---- internals

    def _write(self, ref: int, frame: int, domid: int, readonly: bool) -> None:
        # domid and frame FIRST, flags LAST: the hypervisor reads the flags to decide
        # whether the entry is granted, so they must not say so before the rest is in
        # place (Xen's guests put a wmb() here; x86 keeps these stores in order).
        self._table.domid[ref] = domid
        self._table.frame[ref] = frame
        self._table.flags[ref] = GTF_permit_access | (GTF_readonly if readonly else 0)

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self._table.nr_entries:
            raise GrantError(f"grant ref {ref} of domain {self.domid} is out of range "
                             f"({self._table.nr_entries} entries)")

    def _check_args(self, frame: int, domid: int) -> None:
        if not 0 <= frame <= FRAME_MAX:
            raise GrantError(f"domain {self.domid} cannot grant frame {frame}: "
                             "not a frame number")
        if not 0 <= domid <= DOMID_MAX:
            raise GrantError(f"domain {self.domid} cannot grant to domain {domid}: "
                             "not a domain id")

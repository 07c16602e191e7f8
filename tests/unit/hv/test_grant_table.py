"""Grant tables (pvmig/hv/grant_table.py): checks, in-use bits, and who marks frames dirty.

One test per row of DESIGN.md's dirty-marking table that concerns grants, then every
refusal (each with its message, and nothing changed), then the guest's side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pvmig import errors
from pvmig.hv.grant_table import (
    GrantError,
    GrantTable,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    GuestGrants,
)
from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import PAGE_SIZE, GuestMemory

pytestmark = pytest.mark.timeout(30)

GUEST, BACKEND, OTHER = 3, 0, 5
NR_FRAMES = 64


class Host:
    """One domain as its hypervisor holds it: RAM, log-dirty, grant table; plus the
    guest's side of the same table."""

    def __init__(self, d: Path, *, backend_log: bool = False, nr_frames: int = 4) -> None:
        self.mem = GuestMemory.create(d / "ram", NR_FRAMES)
        self.log = DirtyLog.create(d / "dirty", NR_FRAMES)
        self.gt = GrantTable.create(d / "gnttab", domid=GUEST, memory=self.mem,
                                    dirty=self.log, nr_frames=nr_frames,
                                    backend_log=backend_log)
        self.guest = GuestGrants.open(d / "gnttab", domid=GUEST)

    def flags(self, ref: int) -> int:
        return int(self.gt.entries["flags"][ref])

    def dirty(self) -> list[int]:
        return self.log.read_and_clear().tolist()

    def snapshot(self) -> tuple:
        """Everything a refused operation must leave alone."""
        return (self.gt.entries.copy().tobytes(), self.log.map.copy().tobytes(),
                self.mem.pages.copy().tobytes(), self.gt.statistics().active)

    def close(self) -> None:
        self.guest.close()
        self.gt.close()
        self.log.close()
        self.mem.close()


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


@pytest.fixture
def logged_host(tmp_path):
    h = Host(tmp_path, backend_log=True)
    yield h
    h.close()


# ---- the dirty-marking table, row by row


def test_grant_copy_marks_the_frame_at_the_copy_and_not_before(host):
    ref = host.guest.grant(7, domid=BACKEND, readonly=False)
    assert host.dirty() == []  # granting writes the table, not guest RAM

    # The mark comes after the data: record what the frame held when it was marked.
    seen_at_mark = []
    mark = host.log.mark
    host.log.mark = lambda frames: (seen_at_mark.append(bytes(host.mem.pages[7, 100:150])),
                                    mark(frames))
    host.gt.copy_to_guest(ref, 100, b"\xab" * 50, copier=BACKEND)
    host.log.mark = mark
    assert seen_at_mark == [b"\xab" * 50]
    assert host.dirty() == [7]
    assert bytes(host.mem.pages[7, 100:150]) == b"\xab" * 50
    assert not host.mem.pages[7, :100].any() and not host.mem.pages[7, 150:].any()
    assert host.flags(ref) == GTF_permit_access  # in use only during the copy

    # From a numpy array too, up to the last byte of the page.
    host.gt.copy_to_guest(ref, PAGE_SIZE - 4, np.arange(4, dtype=np.uint8), copier=BACKEND)
    assert host.dirty() == [7]
    assert host.mem.pages[7, -4:].tolist() == [0, 1, 2, 3]


def test_copy_out_of_a_guest_frame_marks_nothing(host):
    host.mem.pages[9, :4] = [1, 2, 3, 4]
    ref = host.guest.grant(9, domid=BACKEND, readonly=True)
    assert host.gt.copy_from_guest(ref, 0, 4, copier=BACKEND) == b"\x01\x02\x03\x04"
    assert host.dirty() == []
    assert host.flags(ref) == GTF_permit_access | GTF_readonly


def test_writable_map_marks_nothing_until_the_unmap_then_marks_at_the_unmap(host):
    ref = host.guest.grant(12, domid=BACKEND, readonly=False)
    m = host.gt.map(ref, mapper=BACKEND, writable=True)
    assert (m.ref, m.frame, m.writable) == (ref, 12, True)
    assert host.dirty() == []
    m.page[:8] = 0x5A           # the backend writes through the mapping...
    m.written()                 # ...and says so: without backend_log that marks nothing
    assert host.dirty() == []
    assert host.mem.pages[12, :8].tolist() == [0x5A] * 8  # the write reached guest RAM
    host.gt.unmap(m.handle)
    assert host.dirty() == [12]


def test_read_only_map_marks_nothing_ever(host):
    host.mem.pages[20, 0] = 42
    ref = host.guest.grant(20, domid=BACKEND, readonly=True)
    m = host.gt.map(ref, mapper=BACKEND, writable=False)
    assert m.page[0] == 42
    with pytest.raises(ValueError, match="read-only"):
        m.page[0] = 1
    assert host.dirty() == []
    host.gt.unmap(m.handle)
    assert host.dirty() == []
    assert host.mem.pages[20, 0] == 42


def test_write_through_a_mapping_that_stays_mapped_is_never_marked(host):
    """Persistent grants: the backend keeps the mapping; its writes are never logged."""
    ref = host.guest.grant(30, domid=BACKEND, readonly=False)
    m = host.gt.map(ref, mapper=BACKEND, writable=True)
    for round_ in range(5):  # rounds of a migration, each reading the bitmap
        m.page[round_] = round_ + 1
        m.written()
        assert host.dirty() == []
    assert host.mem.pages[30, :5].tolist() == [1, 2, 3, 4, 5]
    assert host.gt.statistics().active == 1


def test_backend_log_marks_each_write_at_the_write(logged_host):
    h = logged_host
    ref = h.guest.grant(40, domid=BACKEND, readonly=False)
    m = h.gt.map(ref, mapper=BACKEND, writable=True)
    assert h.dirty() == []  # mapping still marks nothing
    m.page[0] = 1
    m.written()
    assert h.dirty() == [40]
    m.page[1] = 2
    m.written()
    assert h.dirty() == [40]
    h.gt.unmap(m.handle)
    assert h.dirty() == [40]  # and the unmap marks as always


# ---- refusals: a clear message, and nothing changed


def refused(h: Host, match: str, op, *args, **kw) -> None:
    before = h.snapshot()
    refusals = h.gt.statistics().refused
    with pytest.raises(GrantError, match=match) as info:
        op(*args, **kw)
    assert isinstance(info.value, errors.InvalidArgument)
    assert "\n" not in str(info.value)
    assert h.snapshot() == before
    assert h.gt.statistics().refused == refusals + 1


def test_refusals_change_nothing(host):
    h = host
    h.mem.pages[:] = 0x11
    rw = h.guest.grant(5, domid=BACKEND, readonly=False)
    ro = h.guest.grant(6, domid=BACKEND, readonly=True)
    other = h.guest.grant(7, domid=OTHER, readonly=False)
    far = h.guest.grant(NR_FRAMES + 1, domid=BACKEND, readonly=False)
    held = h.gt.map(rw, mapper=BACKEND, writable=True)  # in-use bits must survive too
    h.dirty()

    refused(h, r"^grant ref 9999 of domain 3 is out of range \(2048 entries\)$",
            h.gt.map, 9999, mapper=BACKEND, writable=False)
    refused(h, r"grant ref -1 of domain 3 is out of range",
            h.gt.copy_from_guest, -1, 0, 1, copier=BACKEND)
    refused(h, r"^grant ref 100 of domain 3 is not granted \(flags 0x0\)$",
            h.gt.map, 100, mapper=BACKEND, writable=False)
    refused(h, rf"^grant ref {other} of domain 3 is for domain 5, not domain 0$",
            h.gt.map, other, mapper=BACKEND, writable=True)
    refused(h, rf"^grant ref {ro} of domain 3 is read-only: cannot map it writable$",
            h.gt.map, ro, mapper=BACKEND, writable=True)
    refused(h, rf"^grant ref {ro} of domain 3 is read-only: cannot copy into it$",
            h.gt.copy_to_guest, ro, 0, b"x", copier=BACKEND)
    refused(h, rf"grant ref {far} of domain 3 names frame 65, beyond the domain's 64",
            h.gt.map, far, mapper=BACKEND, writable=False)
    refused(h, rf"grant copy of 2 bytes at offset 4095 into grant ref {rw} of domain 3 "
               r"does not fit in the page \(4096 bytes\)",
            h.gt.copy_to_guest, rw, PAGE_SIZE - 1, b"xy", copier=BACKEND)
    refused(h, rf"grant copy of 1 bytes at offset -1 into grant ref {rw}",
            h.gt.copy_to_guest, rw, -1, b"x", copier=BACKEND)
    refused(h, rf"grant copy of 4097 bytes at offset 0 out of grant ref {ro}",
            h.gt.copy_from_guest, ro, 0, PAGE_SIZE + 1, copier=BACKEND)
    refused(h, r"^grant handle 999 of domain 3 is not mapped$", h.gt.unmap, 999)

    # A grant of another type is not permit_access.
    h.gt.entries["flags"][100] = 2  # accept_transfer
    refused(h, r"grant ref 100 of domain 3 is a accept_transfer grant, not permit_access",
            h.gt.map, 100, mapper=BACKEND, writable=False)

    assert h.flags(rw) == GTF_permit_access | GTF_reading | GTF_writing
    h.gt.unmap(held.handle)
    refused(h, rf"^grant handle {held.handle} of domain 3 is not mapped$",
            h.gt.unmap, held.handle)


def test_stale_or_read_only_mapping_cannot_report_a_write(logged_host):
    h = logged_host
    ro = h.gt.map(h.guest.grant(1, domid=BACKEND, readonly=True), mapper=BACKEND,
                  writable=False)
    refused(h, r"maps grant ref \d+ read-only: nothing can have been written", ro.written)
    rw = h.gt.map(h.guest.grant(2, domid=BACKEND, readonly=False), mapper=BACKEND,
                  writable=True)
    h.gt.unmap(rw.handle)
    h.dirty()
    refused(h, rf"grant handle {rw.handle} of domain 3 \(grant ref {rw.ref}\) is not "
               "mapped any more", rw.written)


def test_guest_never_allocates_the_reserved_refs(tmp_path):
    h = Host(tmp_path, nr_frames=1)
    try:
        refs = [h.guest.grant(i % NR_FRAMES, domid=BACKEND, readonly=True)
                for i in range(510)]
        assert sorted(refs) == list(range(2, 512))
        assert h.flags(0) == h.flags(1) == 0
        full = r"domain 3 has no free grant ref \(512 entries, 2 reserved\)"
        with pytest.raises(errors.ResourceExhausted, match=full):
            h.guest.grant(0, domid=BACKEND, readonly=True)
        # Freed refs come back; the reserved ones never do, even after a revoke.
        assert h.guest.revoke(300)
        assert h.guest.grant(1, domid=BACKEND, readonly=True) == 300
        h.guest.grant_ref(1, 10, domid=BACKEND, readonly=False)  # the xenstore ring
        assert h.gt.map(1, mapper=BACKEND, writable=True).frame == 10
        h.gt.unmap_all(BACKEND)
        assert h.guest.revoke(1)
        assert h.guest.nr_free == 0
        h.guest.reset()
        assert h.guest.nr_free == 0  # every unreserved ref is still granted
    finally:
        h.close()


def test_guest_side_refusals(host):
    g = host.guest
    with pytest.raises(GrantError, match=r"^grant ref 2048 of domain 3 is out of range"):
        g.revoke(2048)
    with pytest.raises(GrantError, match=r"grant ref 50 of domain 3 is not granted "
                                         r"\(flags 0x0\): nothing to revoke"):
        g.revoke(50)
    ref = g.grant(3, domid=BACKEND, readonly=False)
    with pytest.raises(GrantError, match=rf"grant ref {ref} of domain 3 is already granted "
                                         r"\(flags 0x1\): revoke it first"):
        g.grant_ref(ref, 4, domid=BACKEND, readonly=False)
    with pytest.raises(GrantError, match="cannot grant to domain 70000: not a domain id"):
        g.grant(3, domid=70000, readonly=False)
    with pytest.raises(GrantError, match="cannot grant frame -1: not a frame number"):
        g.grant(-1, domid=BACKEND, readonly=False)
    assert int(host.gt.entries["frame"][ref]) == 3


# ---- in-use bits and revocation


def test_in_use_bits_with_two_mappings_of_one_ref(host):
    ref = host.guest.grant(8, domid=BACKEND, readonly=False)
    base = GTF_permit_access
    ro = host.gt.map(ref, mapper=BACKEND, writable=False)
    assert host.flags(ref) == base | GTF_reading
    rw = host.gt.map(ref, mapper=BACKEND, writable=True)
    assert host.flags(ref) == base | GTF_reading | GTF_writing
    assert host.guest.in_use(ref)

    host.gt.unmap(rw.handle)  # the last writable one: writing goes, reading stays
    assert host.flags(ref) == base | GTF_reading
    assert host.dirty() == [8]
    host.gt.unmap(ro.handle)
    assert host.flags(ref) == base
    assert not host.guest.in_use(ref)
    assert host.dirty() == []

    # Two writable mappings: the bits go with the last one, each unmap marks.
    a = host.gt.map(ref, mapper=BACKEND, writable=True)
    b = host.gt.map(ref, mapper=BACKEND, writable=True)
    host.gt.unmap(a.handle)
    assert host.flags(ref) == base | GTF_reading | GTF_writing
    assert host.dirty() == [8]
    host.gt.unmap(b.handle)
    assert host.flags(ref) == base
    assert host.dirty() == [8]

    # A copy in while a read-only mapping is held leaves the mapping's bit alone.
    m = host.gt.map(ref, mapper=BACKEND, writable=False)
    host.gt.copy_to_guest(ref, 0, b"z", copier=BACKEND)
    assert host.flags(ref) == base | GTF_reading
    host.gt.unmap(m.handle)
    assert host.flags(ref) == base

    s = host.gt.statistics()
    assert (s.active, s.writable, s.maps, s.unmaps, s.copies_in, s.copies_out,
            s.refused) == (0, 0, 5, 5, 1, 0, 0)


def test_revoke_refused_while_mapped_and_allowed_after_the_unmap(host):
    ref = host.guest.grant(15, domid=BACKEND, readonly=False)
    m = host.gt.map(ref, mapper=BACKEND, writable=True)
    assert host.guest.revoke(ref) is False
    assert host.flags(ref) == GTF_permit_access | GTF_reading | GTF_writing  # still granted
    host.gt.unmap(m.handle)
    assert host.guest.revoke(ref) is True
    assert host.flags(ref) == 0
    with pytest.raises(GrantError, match=rf"grant ref {ref} of domain 3 is not granted"):
        host.gt.map(ref, mapper=BACKEND, writable=False)


def test_unmap_all_drops_one_mappers_mappings_and_marks_the_writable_ones(host):
    refs = [host.guest.grant(f, domid=BACKEND, readonly=False) for f in (1, 2, 3)]
    other = host.guest.grant(4, domid=OTHER, readonly=False)
    host.gt.map(refs[0], mapper=BACKEND, writable=True)
    host.gt.map(refs[1], mapper=BACKEND, writable=False)
    host.gt.map(refs[2], mapper=BACKEND, writable=True)
    kept = host.gt.map(other, mapper=OTHER, writable=True)
    assert host.gt.unmap_all(BACKEND) == 3
    assert host.dirty() == [1, 3]
    assert host.gt.mappings() == [kept]
    assert [host.guest.in_use(r) for r in refs] == [False] * 3
    assert host.gt.unmap_all(BACKEND) == 0


# ---- the table is not guest RAM


def test_the_table_is_a_separate_file_from_guest_ram(tmp_path):
    h = Host(tmp_path)
    try:
        assert h.gt.path != h.mem.path
        assert h.gt.path.stat().st_size == 4 * PAGE_SIZE and h.gt.nr_entries == 2048
        ram = h.mem.pages.copy()
        ref = h.guest.grant(2, domid=BACKEND, readonly=False)
        m = h.gt.map(ref, mapper=BACKEND, writable=True)
        h.gt.copy_from_guest(ref, 0, 16, copier=BACKEND)
        h.gt.unmap(m.handle)
        assert h.guest.revoke(ref)
        h.guest.grant_ref(0, 5, domid=BACKEND, readonly=True)
        assert np.array_equal(h.mem.pages, ram)  # grant operations never touch RAM
        h.dirty()

        # A fresh table on the "new host": empty, and the resumed guest starts over.
        gt2 = GrantTable.create(tmp_path / "gnttab2", domid=GUEST, memory=h.mem,
                                dirty=h.log, nr_frames=2)
        g2 = GuestGrants.open(tmp_path / "gnttab2", domid=GUEST)
        try:
            assert not gt2.entries["flags"].any() and gt2.nr_entries == 1024
            assert g2.nr_free == 1022
            with pytest.raises(GrantError, match="not granted"):
                gt2.map(2, mapper=BACKEND, writable=False)
            assert g2.grant(2, domid=BACKEND, readonly=False) == 2
        finally:
            g2.close()
            gt2.close()
    finally:
        h.close()


def test_create_refuses_an_existing_file_and_bad_sizes(tmp_path, host):
    with pytest.raises(FileExistsError):
        GrantTable.create(tmp_path / "gnttab", domid=GUEST, memory=host.mem, dirty=host.log)
    with pytest.raises(ValueError, match="at least one frame"):
        GrantTable.create(tmp_path / "x", domid=GUEST, memory=host.mem, dirty=host.log,
                          nr_frames=0)
    assert not (tmp_path / "x").exists()

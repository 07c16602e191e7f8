"""Xen's shared I/O rings (xen/include/public/io/ring.h) over a numpy view of one page.

A split driver talks through one 4096-byte page: a 64-byte header of four free-running
u32 indices (req_prod, req_event, rsp_prod, rsp_event), then a power-of-two array of
slots, each a union of a request and a response. The frontend produces requests and
consumes responses; the backend does the opposite. Every index is a u32 that wraps at
2**32 and is masked by (slots - 1) to find a slot, so all index arithmetic here is done
modulo 2**32 (`_M`), exactly as C does it with RING_IDX.

Why numpy views rather than struct packing: the page *is* guest RAM (a row of
GuestMemory.pages, or a grant mapping of one), shared with other processes. A structured
dtype over the page reads and writes the exact Xen layout in place, so the other end, a
migration's frame copy and the verifier all see the same bytes a real guest would have.

Order is the protocol. A producer writes the slots, then publishes its index; a consumer
reads the index, then the slots. Xen puts xen_wmb()/xen_rmb() between the two. Here the
stores are plain numpy stores executed in program order by one thread, and x86 (TSO)
makes stores visible to other processes in program order and never reorders loads with
loads, so no barrier instruction is needed across our processes; what matters is that the
code keeps Xen's order, and every place where it does says so.

Log-dirty is not this module's business. Each ring object takes an `on_write(offset,
nbytes)` callback, called after every store it makes into the page (a slot, an index, a
private field): a frontend passes its memory API's "mark this frame dirty"; a backend
writing through a grant mapping passes the mapping's policy-aware hook, or nothing (a
grant map is logged only at unmap). The ring never marks anything itself.

Where the frontend's private state lives: Xen keeps req_prod_pvt and rsp_cons in the
kernel's front_ring struct, which is guest RAM and migrates with the guest. pvmig's
guest is a fresh process after a migration and must re-derive that state from RAM, so
FrontRing keeps its two private indices in the first 8 bytes of the header's 44-byte
padding (@20 req_prod_pvt, @24 rsp_cons), which Xen zeroes at init and never uses. A
fresh FrontRing over a page therefore *is* FRONT_RING_ATTACH of the state the page
holds (all zeros after SharedRing.init, i.e. FRONT_RING_INIT). Rejected: keeping them
elsewhere in guest RAM (every caller would have to carry a second location around), or
guessing rsp_cons = rsp_prod on resume (loses responses published but not consumed).
The backend's private state lives in dom0 and does not migrate: a fresh BackRing takes
rsp_prod_pvt = req_cons = rsp_prod, i.e. it serves again every request that has no
response on the ring (the requests before it were overwritten by their responses).

Garbage from the other end is a RingError (an InvalidArgument), never a hang or a crash:
a request producer too far ahead (RING_REQUEST_PROD_OVERFLOW) or gone backwards, a
response producer ahead of the requests outstanding, a front's private state that does
not fit its page. Misuse by the caller (taking from an empty ring, putting onto a full
one) is a FailedPrecondition / ResourceExhausted. What a slot's fields mean is the
caller's business; `validate_blkif_request` helps a backend answer a garbage blkif
request with an error response instead of acting on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from pvmig.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

PAGE_SIZE = 4096
_M = 0xFFFF_FFFF  # RING_IDX is a u32: every index difference is taken modulo 2**32

# ---- the shared page's header (struct __name##_sring)

REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12
PVT = 16  # 4 private bytes (netif smartpoll_active, ...): zeroed, otherwise untouched
PAD = 20  # 44 bytes of padding
HEADER_SIZE = 64
# pvmig's use of the padding: the frontend's private indices (see the docstring)
FRONT_REQ_PROD_PVT = 20
FRONT_RSP_CONS = 24

# u32 word numbers of the above, for the header's u32 view
_W_REQ_PROD, _W_REQ_EVENT, _W_RSP_PROD, _W_RSP_EVENT = 0, 1, 2, 3
_W_FRONT_REQ_PROD_PVT, _W_FRONT_RSP_CONS = FRONT_REQ_PROD_PVT // 4, FRONT_RSP_CONS // 4

OnWrite = Callable[[int, int], None]  # on_write(offset in the page, number of bytes)


def _struct(fields: list[tuple[str, Any, int]], itemsize: int) -> np.dtype:
    """A little-endian C struct: (name, format, offset) per field and the total size."""
    names, formats, offsets = zip(*fields)
    return np.dtype({"names": list(names), "formats": list(formats),
                     "offsets": list(offsets), "itemsize": itemsize})


# ---- blkif (xen/include/public/io/blkif.h)

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6
BLKIF_OP_NAMES = {BLKIF_OP_READ: "read", BLKIF_OP_WRITE: "write",
                  BLKIF_OP_WRITE_BARRIER: "write-barrier",
                  BLKIF_OP_FLUSH_DISKCACHE: "flush-diskcache", BLKIF_OP_DISCARD: "discard",
                  BLKIF_OP_INDIRECT: "indirect"}

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
SECTOR_SIZE = 512  # blkif counts in 512-byte sectors whatever the disk's own size
SECTORS_PER_FRAME = PAGE_SIZE // SECTOR_SIZE

BLKIF_SEGMENT = _struct([("gref", "<u4", 0), ("first_sect", "u1", 4),
                         ("last_sect", "u1", 5)], 8)
BLKIF_REQUEST = _struct([("operation", "u1", 0), ("nr_segments", "u1", 1),
                         ("handle", "<u2", 2), ("id", "<u8", 8),
                         ("sector_number", "<u8", 16),
                         ("seg", (BLKIF_SEGMENT, BLKIF_MAX_SEGMENTS_PER_REQUEST), 24)], 112)
# struct blkif_request_discard: the same slot read another way (flag @1, nr_sectors @24)
BLKIF_REQUEST_DISCARD = _struct([("operation", "u1", 0), ("flag", "u1", 1),
                                 ("handle", "<u2", 2), ("id", "<u8", 8),
                                 ("sector_number", "<u8", 16),
                                 ("nr_sectors", "<u8", 24)], 112)
BLKIF_RESPONSE = _struct([("id", "<u8", 0), ("operation", "u1", 8),
                          ("status", "<i2", 10)], 16)

# ---- netif (xen/include/public/io/netif.h)

NETTXF_csum_blank = 1
NETTXF_data_validated = 2
NETTXF_more_data = 4
NETTXF_extra_info = 8

NETRXF_data_validated = 1
NETRXF_csum_blank = 2
NETRXF_more_data = 4
NETRXF_extra_info = 8

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # no response: the slot of an extra-info request

NETIF_TX_REQUEST = _struct([("gref", "<u4", 0), ("offset", "<u2", 4), ("flags", "<u2", 6),
                            ("id", "<u2", 8), ("size", "<u2", 10)], 12)
NETIF_TX_RESPONSE = _struct([("id", "<u2", 0), ("status", "<i2", 2)], 4)
NETIF_RX_REQUEST = _struct([("id", "<u2", 0), ("gref", "<u4", 4)], 8)
NETIF_RX_RESPONSE = _struct([("id", "<u2", 0), ("offset", "<u2", 2), ("flags", "<u2", 4),
                             ("status", "<i2", 6)], 8)


# ---- layouts


@dataclass(frozen=True)
class RingLayout:
    """One kind of ring: its request and response structs and how many slots a page holds."""

    name: str
    request: np.dtype
    response: np.dtype
    slot_size: int
    slots: int

    @classmethod
    def of(cls, name: str, request: np.dtype, response: np.dtype) -> "RingLayout":
        """__RING_SIZE: the largest power of two of union slots that fit after the header."""
        slot_size = max(request.itemsize, response.itemsize)
        fit = (PAGE_SIZE - HEADER_SIZE) // slot_size
        return cls(name, request, response, slot_size, 1 << (fit.bit_length() - 1))

    def __post_init__(self) -> None:
        s = self.slots
        if s < 1 or s & (s - 1):
            raise ValueError(f"{self.name}: {s} slots is not a power of two")
        if self.slot_size < max(self.request.itemsize, self.response.itemsize):
            raise ValueError(f"{self.name}: a {self.slot_size}-byte slot cannot hold "
                             "its request and response")
        if HEADER_SIZE + s * self.slot_size > PAGE_SIZE:
            raise ValueError(f"{self.name}: {s} slots of {self.slot_size} bytes "
                             "overflow the page")

    @property
    def slot_dtype(self) -> np.dtype:
        """The union of request and response (union __name##_sring_entry)."""
        return np.dtype({"names": ["req", "rsp"], "formats": [self.request, self.response],
                         "offsets": [0, 0], "itemsize": self.slot_size})


BLKIF = RingLayout.of("blkif", BLKIF_REQUEST, BLKIF_RESPONSE)
NETIF_TX = RingLayout.of("netif-tx", NETIF_TX_REQUEST, NETIF_TX_RESPONSE)
NETIF_RX = RingLayout.of("netif-rx", NETIF_RX_REQUEST, NETIF_RX_RESPONSE)


class RingError(InvalidArgument):
    """The other end broke the ring protocol (an index or state that cannot be)."""


# ---- the page itself


def _check_page(page: np.ndarray) -> np.ndarray:
    if (not isinstance(page, np.ndarray) or page.dtype != np.uint8
            or page.shape != (PAGE_SIZE,) or not page.flags.c_contiguous):
        what = (f"{page.dtype} array of shape {page.shape}" if isinstance(page, np.ndarray)
                else type(page).__name__)
        raise InvalidArgument(f"a ring needs one contiguous page of {PAGE_SIZE} uint8, "
                              f"not a {what}")
    return page


class SharedRing:
    """Raw access to a ring page's shared header: no private state, no callbacks.

    For setting up a ring (`init`), and for tests and tools that inspect or forge the
    indices. The ends' protocol is FrontRing's and BackRing's."""

    def __init__(self, page: np.ndarray) -> None:
        self.page = _check_page(page)
        self._words = page[:HEADER_SIZE].view("<u4")

    @classmethod
    def init(cls, page: np.ndarray, *, on_write: OnWrite | None = None) -> "SharedRing":
        """SHARED_RING_INIT, done by the frontend: producers 0, event indices 1, private
        bytes, padding and slots zeroed."""
        ring = cls(page)
        page[HEADER_SIZE:] = 0
        page[PVT:HEADER_SIZE] = 0
        ring._words[_W_REQ_PROD] = ring._words[_W_RSP_PROD] = 0
        ring._words[_W_REQ_EVENT] = ring._words[_W_RSP_EVENT] = 1
        if on_write is not None:
            on_write(0, PAGE_SIZE)
        return ring

    def _get(self, word: int) -> int:
        return int(self._words[word])

    def _set(self, word: int, value: int) -> None:
        self._words[word] = value & _M

    req_prod = property(lambda s: s._get(_W_REQ_PROD), lambda s, v: s._set(_W_REQ_PROD, v))
    req_event = property(lambda s: s._get(_W_REQ_EVENT), lambda s, v: s._set(_W_REQ_EVENT, v))
    rsp_prod = property(lambda s: s._get(_W_RSP_PROD), lambda s, v: s._set(_W_RSP_PROD, v))
    rsp_event = property(lambda s: s._get(_W_RSP_EVENT), lambda s, v: s._set(_W_RSP_EVENT, v))
    front_req_prod_pvt = property(lambda s: s._get(_W_FRONT_REQ_PROD_PVT),
                                  lambda s, v: s._set(_W_FRONT_REQ_PROD_PVT, v))
    front_rsp_cons = property(lambda s: s._get(_W_FRONT_RSP_CONS),
                              lambda s, v: s._set(_W_FRONT_RSP_CONS, v))

    def indices(self) -> dict[str, int]:
        return {"req_prod": self.req_prod, "req_event": self.req_event,
                "rsp_prod": self.rsp_prod, "rsp_event": self.rsp_event,
                "front_req_prod_pvt": self.front_req_prod_pvt,
                "front_rsp_cons": self.front_rsp_cons}


def _record(dtype: np.dtype, value: Any, what: str) -> np.ndarray:
    """`value` (a dict of fields, or a record of `dtype`) as a 0-d array of `dtype`.

    Fields a dict leaves out are zero, as in a C struct built with an initializer."""
    if isinstance(value, (np.void, np.ndarray)):
        if value.dtype != dtype or (isinstance(value, np.ndarray) and value.size != 1):
            raise InvalidArgument(f"{what} must be a record of the {what} dtype, "
                                  f"not {value.dtype}")
        return np.asarray(value).reshape(())
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a dict or a numpy record, "
                              f"not {type(value).__name__}")
    rec = np.zeros((), dtype)
    for name, v in value.items():
        if name not in dtype.names:
            raise InvalidArgument(f"{what} has no field {name!r} "
                                  f"(fields: {', '.join(dtype.names)})")
        try:
            sub = dtype.fields[name][0]
            if sub.subdtype is not None and sub.subdtype[0].names:  # an array of structs
                items = list(v)
                if len(items) > sub.shape[0]:
                    raise InvalidArgument(f"{what}.{name} holds at most {sub.shape[0]} "
                                          f"entries, not {len(items)}")
                for i, item in enumerate(items):
                    if isinstance(item, Mapping):
                        for k, x in item.items():
                            rec[name][k][i] = x
                    else:
                        rec[name][i] = tuple(item)
            else:
                rec[name] = v
        except (OverflowError, ValueError, TypeError, KeyError, IndexError) as e:
            raise InvalidArgument(f"{what} field {name!r}: {e}") from None
    return rec


class _End:
    """What both ends share: the page's views and the on_write hook."""

    def __init__(self, page: np.ndarray, layout: RingLayout, on_write: OnWrite | None):
        self.layout = layout
        self.slots = layout.slots
        self._mask = layout.slots - 1
        self._on_write = on_write
        self._bind(page)

    def _bind(self, page: np.ndarray) -> None:
        self.page = _check_page(page)
        self._words = page[:HEADER_SIZE].view("<u4")
        entries = page[HEADER_SIZE:HEADER_SIZE + self.slots * self.layout.slot_size]
        entries = entries.view(self.layout.slot_dtype)
        self._req = entries["req"]  # (slots,) views with a stride of one slot
        self._rsp = entries["rsp"]

    def _read(self, word: int) -> int:
        return int(self._words[word])

    def _store_index(self, word: int, value: int) -> None:
        self._words[word] = value
        if self._on_write is not None:
            self._on_write(word * 4, 4)

    def _slot_offset(self, idx: int) -> int:
        return HEADER_SIZE + (idx & self._mask) * self.layout.slot_size

    def _written(self, offset: int, nbytes: int) -> None:
        if self._on_write is not None:
            self._on_write(offset, nbytes)


class FrontRing(_End):
    """The frontend's end: produces requests, consumes responses.

    Private state: req_prod_pvt (requests put, published or not) and rsp_cons
    (responses taken); both are kept in the page's padding too, so that a fresh
    FrontRing over the same page, in this process or a resumed one, carries on where
    the last left off (see the module docstring)."""

    def __init__(self, page: np.ndarray, layout: RingLayout, *,
                 on_write: OnWrite | None = None) -> None:
        super().__init__(page, layout, on_write)
        self.attach()

    @property
    def req_prod_pvt(self) -> int:
        return self._req_prod_pvt

    @property
    def rsp_cons(self) -> int:
        return self._rsp_cons

    def attach(self, page: np.ndarray | None = None) -> "FrontRing":
        """FRONT_RING_ATTACH to `page` (default: the current one) at the state it holds.

        Re-derives the private indices from the page and checks they fit the shared
        ones: a frontend resuming from RAM that finds an impossible ring stops here with
        a RingError instead of replaying garbage."""
        w = self._words if page is None else _check_page(page)[:HEADER_SIZE].view("<u4")
        req_prod_pvt, rsp_cons = int(w[_W_FRONT_REQ_PROD_PVT]), int(w[_W_FRONT_RSP_CONS])
        req_prod, rsp_prod = int(w[_W_REQ_PROD]), int(w[_W_RSP_PROD])
        outstanding = (req_prod_pvt - rsp_cons) & _M
        published = (req_prod - rsp_cons) & _M
        answered = (rsp_prod - rsp_cons) & _M
        if not answered <= published <= outstanding <= self.slots:
            raise RingError(
                f"{self.layout.name} ring page does not hold a frontend's state: "
                f"rsp_cons {rsp_cons}, rsp_prod {rsp_prod}, req_prod {req_prod}, "
                f"req_prod_pvt {req_prod_pvt} are not in that order within "
                f"{self.slots} slots")
        if page is not None:
            self._bind(page)
        self._req_prod_pvt, self._rsp_cons = req_prod_pvt, rsp_cons
        return self

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.slots - ((self._req_prod_pvt - self._rsp_cons) & _M)

    def full(self) -> bool:
        return self.free_requests() == 0

    def put_request(self, req: Mapping[str, Any] | np.void) -> None:
        """Write a request into the next slot (not yet visible: see push_requests)."""
        if self.full():
            raise ResourceExhausted(f"{self.layout.name} ring is full: {self.slots} "
                                    "requests outstanding")
        rec = _record(self.layout.request, req, f"{self.layout.name} request")
        idx = self._req_prod_pvt
        self._req[idx & self._mask] = rec
        self._written(self._slot_offset(idx), self.layout.request.itemsize)
        self._req_prod_pvt = (idx + 1) & _M
        self._store_index(_W_FRONT_REQ_PROD_PVT, self._req_prod_pvt)

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish the requests put so far.

        Returns whether the backend must be notified: only if its req_event lies in
        (old req_prod, new req_prod], i.e. it asked to hear about one of these."""
        old = self._read(_W_REQ_PROD)
        new = self._req_prod_pvt
        # ORDER: the slots were stored by put_request before this point; only now does
        # req_prod move (Xen: xen_wmb() here), so a backend that sees the new index sees
        # the slots. Then req_event is read after the store (Xen: xen_mb()).
        self._store_index(_W_REQ_PROD, new)
        event = self._read(_W_REQ_EVENT)
        return ((new - event) & _M) < ((new - old) & _M)

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES, checked against the requests outstanding."""
        rsp_prod = self._read(_W_RSP_PROD)
        n = (rsp_prod - self._rsp_cons) & _M
        outstanding = (self._req_prod_pvt - self._rsp_cons) & _M
        if n > outstanding:  # RING_RESPONSE_PROD_OVERFLOW, and tighter
            raise RingError(
                f"{self.layout.name} ring: the backend published rsp_prod {rsp_prod}, "
                f"{n} responses past rsp_cons {self._rsp_cons}, but only {outstanding} "
                "requests are outstanding")
        return n

    def get_response(self) -> np.void:
        """Take the next response: a copy, which the backend can no longer change."""
        # ORDER: rsp_prod is read (in unconsumed_responses) before the slot (Xen: rmb).
        if not self.unconsumed_responses():
            raise FailedPrecondition(f"{self.layout.name} ring has no unconsumed response")
        idx = self._rsp_cons & self._mask
        rsp = self._rsp[idx:idx + 1].copy()[0]
        self._rsp_cons = (self._rsp_cons + 1) & _M
        self._store_index(_W_FRONT_RSP_CONS, self._rsp_cons)
        return rsp

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: before sleeping, ask to be notified of the
        next response, then look again, so that one pushed in between is not missed."""
        if self.unconsumed_responses():
            return True
        self._store_index(_W_RSP_EVENT, (self._rsp_cons + 1) & _M)
        # ORDER: rsp_event is stored before rsp_prod is read again (Xen: xen_mb()).
        return self.unconsumed_responses() > 0

    def __repr__(self) -> str:
        return (f"<FrontRing {self.layout.name} req_prod_pvt={self._req_prod_pvt} "
                f"rsp_cons={self._rsp_cons} free={self.free_requests()}>")


class BackRing(_End):
    """The backend's end: consumes requests, produces responses.

    Private state: req_cons (requests taken) and rsp_prod_pvt (responses put). It
    lives in the backend only (dom0 memory, not migrated); a fresh BackRing over a page
    starts both at the page's rsp_prod (BACK_RING_ATTACH at rsp_prod), so it serves
    every request that has no response yet."""

    def __init__(self, page: np.ndarray, layout: RingLayout, *,
                 on_write: OnWrite | None = None) -> None:
        super().__init__(page, layout, on_write)
        self.attach()

    @property
    def req_cons(self) -> int:
        return self._req_cons

    @property
    def rsp_prod_pvt(self) -> int:
        return self._rsp_prod_pvt

    def attach(self, page: np.ndarray | None = None, *,
               req_cons: int | None = None) -> "BackRing":
        """BACK_RING_ATTACH to `page` (default: the current one) at its rsp_prod.

        `req_cons`, if given, skips requests between rsp_prod and it as already taken
        (by this backend, which will answer them itself)."""
        if page is not None:
            self._bind(page)
        self._rsp_prod_pvt = self._read(_W_RSP_PROD)
        self._req_cons = self._rsp_prod_pvt
        if req_cons is not None:
            if ((req_cons - self._rsp_prod_pvt) & _M) > self.slots:
                raise InvalidArgument(f"req_cons {req_cons} is more than {self.slots} "
                                      f"past rsp_prod {self._rsp_prod_pvt}")
            self._req_cons = req_cons & _M
        return self

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS, refusing a req_prod that cannot be."""
        req_prod = self._read(_W_REQ_PROD)
        pending = (req_prod - self._rsp_prod_pvt) & _M
        taken = (self._req_cons - self._rsp_prod_pvt) & _M
        if pending > self.slots:  # RING_REQUEST_PROD_OVERFLOW
            raise RingError(
                f"{self.layout.name} ring: the frontend published req_prod {req_prod}, "
                f"{pending} requests past the {self._rsp_prod_pvt} answered, but a ring "
                f"holds {self.slots}: broken frontend")
        if pending < taken:
            raise RingError(
                f"{self.layout.name} ring: the frontend moved req_prod back to {req_prod}, "
                f"behind the {self._req_cons} requests already taken: broken frontend")
        # Xen's min(req_prod - req_cons, RING_SIZE - (req_cons - rsp_prod_pvt)): with
        # the two checks above the first term is always the smaller.
        return min((req_prod - self._req_cons) & _M, self.slots - taken)

    def get_request(self) -> np.void:
        """Take the next request: a copy, made before anything looks at it, so that a
        frontend scribbling on the slot afterwards changes nothing (RING_COPY_REQUEST)."""
        # ORDER: req_prod is read (in unconsumed_requests) before the slot (Xen: rmb).
        if not self.unconsumed_requests():
            raise FailedPrecondition(f"{self.layout.name} ring has no unconsumed request")
        idx = self._req_cons & self._mask
        req = self._req[idx:idx + 1].copy()[0]
        self._req_cons = (self._req_cons + 1) & _M
        return req

    def put_response(self, rsp: Mapping[str, Any] | np.void) -> None:
        """Write a response into the next slot (not yet visible: see push_responses).

        A response takes the slot of a request already taken, never of one the backend
        has not read yet."""
        if self._rsp_prod_pvt == self._req_cons:
            raise FailedPrecondition(f"{self.layout.name} ring: every request taken has "
                                     "its response already")
        rec = _record(self.layout.response, rsp, f"{self.layout.name} response")
        idx = self._rsp_prod_pvt
        self._rsp[idx & self._mask] = rec
        self._written(self._slot_offset(idx), self.layout.response.itemsize)
        self._rsp_prod_pvt = (idx + 1) & _M

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish the responses put so far;
        returns whether the frontend must be notified (its rsp_event was passed)."""
        old = self._read(_W_RSP_PROD)
        new = self._rsp_prod_pvt
        # ORDER: the response slots were stored by put_response before this point; only
        # now does rsp_prod move (Xen: xen_wmb()); rsp_event is read after (xen_mb()).
        self._store_index(_W_RSP_PROD, new)
        event = self._read(_W_RSP_EVENT)
        return ((new - event) & _M) < ((new - old) & _M)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: before sleeping, ask to be notified of the
        next request, then look again, so that one pushed in between is not missed."""
        if self.unconsumed_requests():
            return True
        self._store_index(_W_REQ_EVENT, (self._req_cons + 1) & _M)
        # ORDER: req_event is stored before req_prod is read again (Xen: xen_mb()).
        return self.unconsumed_requests() > 0

    def __repr__(self) -> str:
        return (f"<BackRing {self.layout.name} req_cons={self._req_cons} "
                f"rsp_prod_pvt={self._rsp_prod_pvt}>")


def validate_blkif_request(req: np.void, *, nr_sectors: int,
                           allow_indirect: bool = False) -> str | None:
    """What is wrong with a blkif request, for a backend to answer it with an error; None
    if it may be served. `nr_sectors`: the disk's size in 512-byte sectors.

    Checks the operation, the segment count (1..11; 0 only for a flush or barrier),
    each segment's sectors within its 4 KiB frame, and that the request stays on the
    disk. A discard is checked as struct blkif_request_discard. Indirect requests are
    refused unless `allow_indirect` (feature-max-indirect-segments not advertised); their
    segments live in other pages, which this function cannot see."""
    if not isinstance(req, np.void) or req.dtype != BLKIF_REQUEST:
        return f"not a blkif request record (dtype {getattr(req, 'dtype', type(req))})"
    op = int(req["operation"])
    if op not in BLKIF_OP_NAMES:
        return f"unknown operation {op}"
    name = BLKIF_OP_NAMES[op]
    sector = int(req["sector_number"])
    if op == BLKIF_OP_INDIRECT:
        return None if allow_indirect else "indirect requests are not supported"
    if op == BLKIF_OP_DISCARD:
        count = int(np.frombuffer(req.tobytes(), BLKIF_REQUEST_DISCARD)[0]["nr_sectors"])
        if sector + count > nr_sectors:
            return (f"discard of sectors {sector}..{sector + count - 1} is beyond the "
                    f"disk's {nr_sectors} sectors")
        return None
    nseg = int(req["nr_segments"])
    if nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        return f"{name} with {nseg} segments (at most {BLKIF_MAX_SEGMENTS_PER_REQUEST})"
    if nseg == 0:
        if op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            return None
        return f"{name} with no segments"
    segs = req["seg"][:nseg]
    first = segs["first_sect"].astype(np.int64)
    last = segs["last_sect"].astype(np.int64)
    for i in range(nseg):
        if first[i] > last[i]:
            return f"{name} segment {i}: first_sect {first[i]} > last_sect {last[i]}"
        if last[i] >= SECTORS_PER_FRAME:
            return (f"{name} segment {i}: last_sect {last[i]} is past the frame's "
                    f"{SECTORS_PER_FRAME} sectors")
    count = int((last - first + 1).sum())
    if sector + count > nr_sectors:
        return (f"{name} of sectors {sector}..{sector + count - 1} is beyond the disk's "
                f"{nr_sectors} sectors")
    return None

"""Shared rings (pvmig/pv/ring.py): Xen's io/ring.h over one page."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import time

import numpy as np
import pytest

from pvmig.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from pvmig.hv.memory import PAGE_SIZE
from pvmig.pv.ring import (
    BLKIF,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_REQUEST,
    BLKIF_REQUEST_DISCARD,
    BLKIF_RESPONSE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SEGMENT,
    FRONT_REQ_PROD_PVT,
    FRONT_RSP_CONS,
    HEADER_SIZE,
    NETIF_RX,
    NETIF_RX_REQUEST,
    NETIF_RX_RESPONSE,
    NETIF_TX,
    NETIF_TX_REQUEST,
    NETIF_TX_RESPONSE,
    REQ_EVENT,
    REQ_PROD,
    RSP_EVENT,
    RSP_PROD,
    BackRing,
    FrontRing,
    RingError,
    RingLayout,
    SharedRing,
    validate_blkif_request,
)

pytestmark = pytest.mark.timeout(60)

M = 2**32
LAYOUTS = [BLKIF, NETIF_TX, NETIF_RX]


def new_page() -> np.ndarray:
    page = np.zeros(PAGE_SIZE, np.uint8)
    SharedRing.init(page)
    return page


def request(layout: RingLayout, i: int) -> dict:
    """Request number i, recognisable from its fields."""
    if layout is BLKIF:
        return dict(operation=BLKIF_OP_WRITE if i % 2 else BLKIF_OP_READ, nr_segments=1,
                    handle=7, id=i, sector_number=8 * i, seg=[(i % M, 0, 7)])
    if layout is NETIF_TX:
        return dict(gref=i % M, offset=i % 4000, flags=i % 16, id=i % 2**16,
                    size=60 + i % 1400)
    return dict(id=i % 2**16, gref=i % M)


def response(layout: RingLayout, req: np.void) -> dict:
    if layout is BLKIF:
        return dict(id=req["id"], operation=req["operation"], status=BLKIF_RSP_OKAY)
    if layout is NETIF_TX:
        return dict(id=req["id"], status=0)
    return dict(id=req["id"], offset=0, flags=0, status=int(req["gref"]) % 1500 + 1)


def check_request(layout: RingLayout, req: np.void, i: int) -> None:
    want = request(layout, i)
    for name, value in want.items():
        if name == "seg":
            assert req["seg"][0].tolist() == value[0], (i, req)
        else:
            assert int(req[name]) == value, (i, name, req)


def check_response(layout: RingLayout, rsp: np.void, i: int) -> None:
    assert int(rsp["id"]) == request(layout, i)["id"], (i, rsp)
    if layout is NETIF_RX:
        assert int(rsp["status"]) == i % M % 1500 + 1


def write_header(page: np.ndarray, **values: int) -> None:
    sr = SharedRing(page)
    for name, value in values.items():
        setattr(sr, name, value % M)


# ---- layouts


OFFSETS = [
    (BLKIF_REQUEST, 112, dict(operation=0, nr_segments=1, handle=2, id=8, sector_number=16,
                              seg=24)),
    (BLKIF_SEGMENT, 8, dict(gref=0, first_sect=4, last_sect=5)),
    (BLKIF_REQUEST_DISCARD, 112, dict(operation=0, flag=1, handle=2, id=8,
                                      sector_number=16, nr_sectors=24)),
    (BLKIF_RESPONSE, 16, dict(id=0, operation=8, status=10)),
    (NETIF_TX_REQUEST, 12, dict(gref=0, offset=4, flags=6, id=8, size=10)),
    (NETIF_TX_RESPONSE, 4, dict(id=0, status=2)),
    (NETIF_RX_REQUEST, 8, dict(id=0, gref=4)),
    (NETIF_RX_RESPONSE, 8, dict(id=0, offset=2, flags=4, status=6)),
]


@pytest.mark.parametrize("dtype, size, offsets", OFFSETS)
def test_structs_have_xen_sizes_and_offsets(dtype, size, offsets):
    assert dtype.itemsize == size
    assert {name: dtype.fields[name][1] for name in dtype.names} == offsets
    for name in dtype.names:  # every integer little-endian, whatever the host
        assert dtype.fields[name][0].base.str[0] in "<|"


def test_blkif_segments_are_an_array_of_eleven():
    sub, shape = BLKIF_REQUEST.fields["seg"][0].subdtype
    assert sub == BLKIF_SEGMENT and shape == (11,)
    assert 24 + 11 * 8 == 112


class _Seg(ctypes.Structure):
    _fields_ = [("gref", ctypes.c_uint32), ("first_sect", ctypes.c_uint8),
                ("last_sect", ctypes.c_uint8)]


class _BlkReq(ctypes.Structure):
    _fields_ = [("operation", ctypes.c_uint8), ("nr_segments", ctypes.c_uint8),
                ("handle", ctypes.c_uint16), ("id", ctypes.c_uint64),
                ("sector_number", ctypes.c_uint64), ("seg", _Seg * 11)]


class _BlkRsp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("operation", ctypes.c_uint8),
                ("status", ctypes.c_int16)]


class _TxReq(ctypes.Structure):
    _fields_ = [("gref", ctypes.c_uint32), ("offset", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("id", ctypes.c_uint16), ("size", ctypes.c_uint16)]


class _TxRsp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("status", ctypes.c_int16)]


class _RxReq(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("gref", ctypes.c_uint32)]


class _RxRsp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("offset", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("status", ctypes.c_int16)]


@pytest.mark.parametrize("dtype, cstruct", [
    (BLKIF_SEGMENT, _Seg), (BLKIF_REQUEST, _BlkReq), (BLKIF_RESPONSE, _BlkRsp),
    (NETIF_TX_REQUEST, _TxReq), (NETIF_TX_RESPONSE, _TxRsp),
    (NETIF_RX_REQUEST, _RxReq), (NETIF_RX_RESPONSE, _RxRsp)])
def test_structs_match_the_c_compilers_layout(dtype, cstruct):
    """The headers' structs laid out by the platform's C ABI (ctypes), field by field."""
    assert ctypes.sizeof(cstruct) == dtype.itemsize
    assert [(n, getattr(cstruct, n).offset) for n, *_ in cstruct._fields_] == \
        [(n, dtype.fields[n][1]) for n in dtype.names]


@pytest.mark.parametrize("layout, slot_size, slots", [
    (BLKIF, 112, 32), (NETIF_TX, 12, 256), (NETIF_RX, 8, 256)])
def test_slot_counts(layout, slot_size, slots):
    assert (layout.slot_size, layout.slots) == (slot_size, slots)
    assert layout.slot_dtype.itemsize == slot_size
    fit = 4032 // slot_size
    assert slots <= fit < 2 * slots
    assert HEADER_SIZE + slots * slot_size <= PAGE_SIZE


def test_a_layout_that_cannot_be_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        RingLayout("x", BLKIF_REQUEST, BLKIF_RESPONSE, 112, 33)
    with pytest.raises(ValueError, match="overflow the page"):
        RingLayout("x", BLKIF_REQUEST, BLKIF_RESPONSE, 112, 64)
    with pytest.raises(ValueError, match="cannot hold"):
        RingLayout("x", BLKIF_REQUEST, BLKIF_RESPONSE, 16, 32)


def test_init_sets_producers_to_0_and_events_to_1_and_clears_the_rest():
    page = np.full(PAGE_SIZE, 0xA5, np.uint8)
    writes = []
    sr = SharedRing.init(page, on_write=lambda off, n: writes.append((off, n)))
    assert page[:16].view("<u4").tolist() == [0, 1, 0, 1]
    assert (sr.req_prod, sr.req_event, sr.rsp_prod, sr.rsp_event) == (0, 1, 0, 1)
    assert not page[16:].any()  # private bytes, padding and every slot
    assert writes == [(0, PAGE_SIZE)]
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    assert (front.req_prod_pvt, front.rsp_cons, front.free_requests()) == (0, 0, 32)
    assert (back.req_cons, back.rsp_prod_pvt, back.unconsumed_requests()) == (0, 0, 0)


def test_a_ring_needs_one_contiguous_byte_page():
    for bad in (np.zeros(4095, np.uint8), np.zeros(1024, np.uint32),
                np.zeros(8192, np.uint8)[::2], bytearray(4096)):
        with pytest.raises(InvalidArgument, match="one contiguous page"):
            FrontRing(bad, BLKIF)


# ---- producer / consumer


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_requests_and_responses_cross_one_page_once_and_in_order(layout):
    page = new_page()
    front, back = FrontRing(page, layout), BackRing(page, layout)
    rng = np.random.default_rng(7)
    n, sent, served, got = 3000, 0, 0, 0
    while got < n:
        for _ in range(int(rng.integers(0, front.free_requests() + 1))):
            if sent < n:
                front.put_request(request(layout, sent))
                sent += 1
        front.push_requests()
        for _ in range(int(rng.integers(0, back.unconsumed_requests() + 1))):
            req = back.get_request()
            check_request(layout, req, served)
            back.put_response(response(layout, req))
            served += 1
        back.push_responses()
        while front.unconsumed_responses():
            check_response(layout, front.get_response(), got)
            got += 1
        assert front.free_requests() == layout.slots - (sent - got)
    assert (sent, served, got) == (n, n, n)
    assert not front.final_check_for_responses() and not back.final_check_for_requests()


_PROCESS = r"""
import sys, time
import numpy as np
from pvmig.hv.memory import GuestMemory
from pvmig.pv.ring import BLKIF, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, BackRing, FrontRing

path, frame, role, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
mem = GuestMemory.open(path)
page = mem.pages[frame]
deadline = time.monotonic() + 30
rng = np.random.default_rng(3)

def idle():
    if time.monotonic() > deadline:
        sys.exit(f"{role}: timed out")
    time.sleep(0.0001)

if role == "front":
    ring = FrontRing(page, BLKIF)
    sent = got = 0
    while got < n:
        for _ in range(int(rng.integers(0, min(ring.free_requests(), n - sent) + 1))):
            ring.put_request(dict(operation=BLKIF_OP_WRITE, nr_segments=1, id=sent,
                                  sector_number=8 * sent, seg=[(sent, 0, 7)]))
            sent += 1
        ring.push_requests()
        took = 0
        while ring.unconsumed_responses():
            rsp = ring.get_response()
            if rsp["id"] != got or rsp["status"] != BLKIF_RSP_OKAY:
                sys.exit(f"front: got {rsp} where the response to {got} was due")
            got += 1
            took += 1
        if not took and not ring.final_check_for_responses():
            idle()
else:
    ring = BackRing(page, BLKIF)
    done = 0
    while done < n:
        if not ring.final_check_for_requests():
            idle()
            continue
        while ring.unconsumed_requests():
            req = ring.get_request()
            if (req["id"] != done or req["sector_number"] != 8 * done
                    or req["seg"][0]["gref"] != done):
                sys.exit(f"back: got {req} where request {done} was due")
            ring.put_response(dict(id=req["id"], operation=req["operation"],
                                   status=BLKIF_RSP_OKAY))
            done += 1
        ring.push_responses()
    if ring.unconsumed_requests():
        sys.exit("back: requests beyond the last one")
    got = done
print(got)
"""


def test_a_frontend_and_a_backend_process_exchange_through_guest_memory(make_memory):
    mem = make_memory(4)
    SharedRing.init(mem.pages[2])
    n = 4000
    procs = {role: subprocess.Popen([sys.executable, "-c", _PROCESS, str(mem.path), "2",
                                     role, str(n)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for role in ("back", "front")}
    try:
        deadline = time.monotonic() + 50
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.returncode for p in procs.values()):
                break  # one failed: do not wait for the other to time out
            time.sleep(0.02)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for role, proc in procs.items():
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, f"{role}: {err}"
        assert out.split() == [str(n)]
    sr = SharedRing(mem.pages[2])
    assert (sr.req_prod, sr.rsp_prod, sr.front_req_prod_pvt, sr.front_rsp_cons) == (n,) * 4
    assert not mem.pages[[0, 1, 3]].any()  # nothing outside the ring's page


def test_indices_wrap_at_2_32():
    page = new_page()
    start = M - 5
    write_header(page, req_prod=start, rsp_prod=start, req_event=start + 1,
                 rsp_event=start + 1, front_req_prod_pvt=start, front_rsp_cons=start)
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    assert (front.req_prod_pvt, front.rsp_cons, front.free_requests()) == (start, start, 32)
    assert (back.req_cons, back.rsp_prod_pvt) == (start, start)
    rng = np.random.default_rng(11)
    n, sent, served, got = 400, 0, 0, 0
    while got < n:
        for _ in range(int(rng.integers(0, min(front.free_requests(), n - sent) + 1))):
            front.put_request(request(BLKIF, sent))
            sent += 1
            assert front.free_requests() == 32 - (sent - got)
        front.push_requests()
        assert back.unconsumed_requests() == sent - served
        for _ in range(int(rng.integers(0, back.unconsumed_requests() + 1))):
            req = back.get_request()
            check_request(BLKIF, req, served)
            back.put_response(response(BLKIF, req))
            served += 1
        back.push_responses()
        for _ in range(int(rng.integers(0, front.unconsumed_responses() + 1))):
            check_response(BLKIF, front.get_response(), got)
            got += 1
            assert front.free_requests() == 32 - (sent - got)
    end = (start + n) % M
    assert end < start  # wrapped
    sr = SharedRing(page)
    assert (sr.req_prod, sr.rsp_prod, front.req_prod_pvt, front.rsp_cons) == (end,) * 4
    assert (back.req_cons, back.rsp_prod_pvt) == (end, end)


def test_put_request_accepts_records_and_refuses_nonsense():
    page = new_page()
    front, back = FrontRing(page, NETIF_TX), BackRing(page, NETIF_TX)
    rec = np.zeros((), NETIF_TX_REQUEST)
    rec["id"], rec["size"] = 9, 1500
    front.put_request(rec[()])
    front.put_request(dict(id=10, size=60))
    front.push_requests()
    assert [int(back.get_request()["id"]) for _ in range(2)] == [9, 10]
    for bad, match in [(dict(idx=1), "no field 'idx'"), (dict(id=2**16), "id"),
                       (dict(size=-1), "size"), (np.zeros((), BLKIF_REQUEST)[()], "dtype"),
                       ([1, 2], "dict or a numpy record")]:
        with pytest.raises(InvalidArgument, match=match):
            front.put_request(bad)
    assert front.req_prod_pvt == 2  # a refused request takes no slot
    seg = [dict(gref=5, last_sect=7)] * 12
    with pytest.raises(InvalidArgument, match="at most 11"):
        FrontRing(new_page(), BLKIF).put_request(dict(nr_segments=12, seg=seg))


def test_misuse_of_an_end_is_refused_without_touching_the_page():
    page = new_page()
    front, back = FrontRing(page, NETIF_RX), BackRing(page, NETIF_RX)
    with pytest.raises(FailedPrecondition, match="no unconsumed response"):
        front.get_response()
    with pytest.raises(FailedPrecondition, match="no unconsumed request"):
        back.get_request()
    with pytest.raises(FailedPrecondition, match="has its response already"):
        back.put_response(dict(id=1))
    for i in range(256):
        front.put_request(request(NETIF_RX, i))
    assert front.full()
    before = page.copy()
    with pytest.raises(ResourceExhausted, match="full"):
        front.put_request(request(NETIF_RX, 256))
    assert np.array_equal(page, before)


def test_get_request_returns_a_copy_the_frontend_cannot_change():
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    front.put_request(request(BLKIF, 5))
    front.push_requests()
    req = back.get_request()
    page[HEADER_SIZE:HEADER_SIZE + 112] = 0xFF  # the frontend scribbles on the slot
    check_request(BLKIF, req, 5)
    back.put_response(response(BLKIF, req))
    back.push_responses()
    rsp = front.get_response()
    page[HEADER_SIZE:HEADER_SIZE + 16] = 0xEE
    assert int(rsp["id"]) == 5 and int(rsp["status"]) == BLKIF_RSP_OKAY


# ---- notifications


def xen_notify(old: int, new: int, event: int) -> bool:
    """ring.h's RING_PUSH_*_AND_CHECK_NOTIFY: (RING_IDX)(new - event) < (RING_IDX)(new - old)."""
    return (new - event) % M < (new - old) % M


def _random_case(rng) -> tuple[int, int, int]:
    """(old producer index, how many to push, the other end's event index)."""
    old = int(rng.choice([rng.integers(0, M), M - rng.integers(1, 40), rng.integers(0, 40)]))
    k = int(rng.integers(0, 33))
    if rng.random() < 0.8:
        event = (old + int(rng.integers(-40, 41))) % M
    else:
        event = int(rng.integers(0, M))
    return old, k, event


def test_push_requests_notifies_exactly_when_ring_h_would():
    rng = np.random.default_rng(2014)
    page = np.zeros(PAGE_SIZE, np.uint8)
    outcomes = set()
    for _ in range(2000):
        old, k, event = _random_case(rng)
        SharedRing.init(page)
        write_header(page, req_prod=old, rsp_prod=old, front_req_prod_pvt=old,
                     front_rsp_cons=old, req_event=event)
        front = FrontRing(page, BLKIF)
        for i in range(k):
            front.put_request(request(BLKIF, i))
        notify = front.push_requests()
        assert notify == xen_notify(old, (old + k) % M, event), (old, k, event)
        outcomes.add((notify, (old + k) % M < old))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}


def test_push_responses_notifies_exactly_when_ring_h_would():
    rng = np.random.default_rng(2015)
    page = np.zeros(PAGE_SIZE, np.uint8)
    outcomes = set()
    for _ in range(2000):
        old, k, event = _random_case(rng)
        SharedRing.init(page)
        write_header(page, req_prod=old + k, rsp_prod=old, front_req_prod_pvt=old + k,
                     front_rsp_cons=old, rsp_event=event)
        back = BackRing(page, BLKIF)
        for _ in range(k):
            back.put_response(response(BLKIF, back.get_request()))
        notify = back.push_responses()
        assert notify == xen_notify(old, (old + k) % M, event), (old, k, event)
        outcomes.add((notify, (old + k) % M < old))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}


def test_notifications_are_batched_until_the_consumer_asks_again():
    page = new_page()
    front, back = FrontRing(page, NETIF_TX), BackRing(page, NETIF_TX)
    for i in range(3):
        front.put_request(request(NETIF_TX, i))
    assert front.push_requests() is True  # req_event 1 lies in (0, 3]: one notification
    front.put_request(request(NETIF_TX, 3))
    assert front.push_requests() is False  # the backend has not asked again
    assert front.push_requests() is False  # nothing new: never a notification
    while back.unconsumed_requests():
        back.put_response(response(NETIF_TX, back.get_request()))
    assert back.final_check_for_requests() is False  # asks for the next one: req_event 5
    assert SharedRing(page).req_event == 5
    front.put_request(request(NETIF_TX, 4))
    front.put_request(request(NETIF_TX, 5))
    assert front.push_requests() is True


# ---- the final check


@pytest.mark.parametrize("when", ["before", "after-first-check", "after-event-store",
                                  "after-final-check"])
def test_final_check_for_responses_never_loses_a_wakeup(when):
    """The backend pushes a response at every point of the frontend's final check: either
    the check finds it or the push says to notify (ring.h's no-lost-wakeup promise)."""
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    for i in range(2):
        front.put_request(request(BLKIF, i))
    front.push_requests()
    back.put_response(response(BLKIF, back.get_request()))
    back.push_responses()
    front.get_response()  # drained: the frontend is about to sleep
    assert front.unconsumed_responses() == 0
    back.put_response(response(BLKIF, back.get_request()))  # answered, not yet pushed
    notified = []

    def push():
        notified.append(back.push_responses())

    if when == "before":
        push()
    elif when == "after-first-check":
        first = front.unconsumed_responses
        calls = []

        def wrapped():
            n = first()
            if not calls:
                calls.append(n)
                push()
            return n
        front.unconsumed_responses = wrapped
    elif when == "after-event-store":
        front._on_write = lambda off, n: push() if off == RSP_EVENT else None
    found = front.final_check_for_responses()
    if when == "after-final-check":
        push()
    assert len(notified) == 1
    assert found or notified[0]
    if when == "before":  # the race the final check exists for: no notification came
        assert found and notified == [False]
    if when == "after-final-check":
        assert not found and notified == [True]


def test_final_check_for_requests_finds_a_request_pushed_after_the_drain():
    page = new_page()
    front, back = FrontRing(page, NETIF_RX), BackRing(page, NETIF_RX)
    front.put_request(request(NETIF_RX, 0))
    assert front.push_requests() is True
    back.put_response(response(NETIF_RX, back.get_request()))
    assert back.unconsumed_requests() == 0  # drained; req_event is still 1
    front.put_request(request(NETIF_RX, 1))
    assert front.push_requests() is False  # so no notification for this one...
    assert back.final_check_for_requests() is True  # ...and the final check finds it
    back.put_response(response(NETIF_RX, back.get_request()))
    assert back.final_check_for_requests() is False  # re-armed: req_event = 3
    front.put_request(request(NETIF_RX, 2))
    assert front.push_requests() is True
    assert back.final_check_for_requests() is True


# ---- on_write: what the caller's log-dirty sees


def _recorder(page: np.ndarray, events: list):
    sr = SharedRing(page)
    names = {REQ_PROD: "req_prod", REQ_EVENT: "req_event", RSP_PROD: "rsp_prod",
             RSP_EVENT: "rsp_event", FRONT_REQ_PROD_PVT: "front_req_prod_pvt",
             FRONT_RSP_CONS: "front_rsp_cons"}

    def on_write(off: int, n: int) -> None:
        what = names.get(off) or f"slot {(off - HEADER_SIZE) // BLKIF.slot_size}"
        events.append((what, n, sr.req_prod, sr.rsp_prod, bytes(page[off:off + n])))
    return on_write


def test_on_write_follows_each_store_and_the_slot_comes_before_the_index():
    page = new_page()
    events: list = []
    front = FrontRing(page, BLKIF, on_write=_recorder(page, events))
    back = BackRing(page, BLKIF, on_write=_recorder(page, events))
    front.put_request(request(BLKIF, 1))
    front.put_request(request(BLKIF, 2))
    front.push_requests()
    assert [(e[0], e[1]) for e in events] == [
        ("slot 0", 112), ("front_req_prod_pvt", 4), ("slot 1", 112),
        ("front_req_prod_pvt", 4), ("req_prod", 4)]
    slot0, _, slot1, _, push = events
    # at each slot's callback the slot holds the request and req_prod has not moved
    assert slot0[2] == 0 and slot0[4] == page[64:176].tobytes()
    assert slot1[2] == 0 and np.frombuffer(slot1[4], BLKIF_REQUEST)[0]["id"] == 2
    # at the index's callback the index has moved
    assert push[2] == 2 and push[4] == (2).to_bytes(4, "little")

    events.clear()
    for _ in range(2):
        back.put_response(response(BLKIF, back.get_request()))  # get_request stores nothing
    back.push_responses()
    assert [(e[0], e[1], e[3]) for e in events] == [
        ("slot 0", 16, 0), ("slot 1", 16, 0), ("rsp_prod", 4, 2)]

    events.clear()
    front.get_response()
    assert front.final_check_for_responses() is True
    front.get_response()
    assert front.final_check_for_responses() is False
    assert back.final_check_for_requests() is False
    assert [e[0] for e in events] == ["front_rsp_cons", "front_rsp_cons", "rsp_event",
                                      "req_event"]


def test_without_on_write_nothing_is_called_and_the_ring_still_works():
    page = new_page()
    front, back = FrontRing(page, NETIF_TX), BackRing(page, NETIF_TX)
    front.put_request(request(NETIF_TX, 0))
    front.push_requests()
    back.put_response(response(NETIF_TX, back.get_request()))
    back.push_responses()
    check_response(NETIF_TX, front.get_response(), 0)


# ---- a broken other end


def test_a_frontend_publishing_more_than_a_ring_is_refused_and_nothing_moves():
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    for i in range(4):
        front.put_request(request(BLKIF, i))
    front.push_requests()
    back.put_response(response(BLKIF, back.get_request()))
    back.push_responses()
    for bad in (1 + 33, 0xDEADBEEF, M - 1):
        SharedRing(page).req_prod = bad
        before = page.copy()
        for call in (back.unconsumed_requests, back.get_request, back.final_check_for_requests):
            with pytest.raises(RingError, match="broken frontend"):
                call()
        assert np.array_equal(page, before)
        assert (back.req_cons, back.rsp_prod_pvt) == (1, 1)
    SharedRing(page).req_prod = 33  # exactly a ring's worth past the answered: allowed
    assert back.unconsumed_requests() == 32


def test_a_frontend_moving_req_prod_backwards_is_refused():
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    for i in range(4):
        front.put_request(request(BLKIF, i))
    front.push_requests()
    back.get_request()
    back.get_request()
    SharedRing(page).req_prod = 1
    with pytest.raises(RingError, match="moved req_prod back to 1"):
        back.unconsumed_requests()


def test_a_garbage_request_is_answered_with_an_error_and_the_ring_goes_on():
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    rng = np.random.default_rng(5)
    garbage = rng.integers(0, 256, 112, dtype=np.uint8)
    garbage[0], garbage[1] = BLKIF_OP_WRITE, 200  # a write with 200 segments
    page[HEADER_SIZE:HEADER_SIZE + 112] = garbage  # written straight into slot 0
    SharedRing(page).req_prod = 1
    SharedRing(page).front_req_prod_pvt = 1
    front.attach()
    front.put_request(request(BLKIF, 1))
    front.push_requests()
    slots_after = page[HEADER_SIZE + 2 * 112:].copy()
    for expect_error in (True, False):
        req = back.get_request()
        problem = validate_blkif_request(req, nr_sectors=1 << 20)
        assert (problem is not None) == expect_error
        if problem:
            assert problem == "write with 200 segments (at most 11)"
        back.put_response(dict(id=req["id"], operation=req["operation"],
                               status=BLKIF_RSP_ERROR if problem else BLKIF_RSP_OKAY))
    back.push_responses()
    first, second = front.get_response(), front.get_response()
    assert int(first["status"]) == BLKIF_RSP_ERROR
    assert int(first["id"]) == int(np.frombuffer(garbage[8:16].tobytes(), "<u8")[0])
    assert int(second["id"]) == 1 and int(second["status"]) == BLKIF_RSP_OKAY
    assert np.array_equal(page[HEADER_SIZE + 2 * 112:], slots_after)  # nothing else moved
    assert SharedRing(page).indices() == dict(req_prod=2, req_event=1, rsp_prod=2,
                                              rsp_event=1, front_req_prod_pvt=2,
                                              front_rsp_cons=2)


def test_a_backend_publishing_more_responses_than_requests_is_refused():
    page = new_page()
    front = FrontRing(page, NETIF_TX)
    front.put_request(request(NETIF_TX, 0))
    front.push_requests()
    SharedRing(page).rsp_prod = 2
    with pytest.raises(RingError, match="rsp_prod 2, 2 responses past rsp_cons 0, but "
                                        "only 1 requests are outstanding"):
        front.get_response()
    SharedRing(page).rsp_prod = 0xFFFF0000
    with pytest.raises(RingError, match="only 1 requests"):
        front.final_check_for_responses()


def _blk(**fields) -> np.void:
    rec = np.zeros((), BLKIF_REQUEST)
    base = dict(operation=BLKIF_OP_READ, nr_segments=1, id=3, sector_number=0)
    for name, value in {**base, **fields}.items():
        if name == "seg":
            for i, s in enumerate(value):
                rec["seg"][i] = s
        else:
            rec[name] = value
    if "seg" not in fields:
        rec["seg"][: rec["nr_segments"]] = (1, 0, 7)
    return rec[()]


def _discard(sector: int, count: int) -> np.void:
    rec = np.zeros((), BLKIF_REQUEST_DISCARD)
    rec["operation"], rec["sector_number"], rec["nr_sectors"] = BLKIF_OP_DISCARD, sector, count
    return np.frombuffer(rec.tobytes(), BLKIF_REQUEST)[0]


@pytest.mark.parametrize("req, problem", [
    (_blk(), None),
    (_blk(operation=BLKIF_OP_WRITE, nr_segments=11, sector_number=1000 - 88), None),
    (_blk(operation=BLKIF_OP_WRITE, nr_segments=2, seg=[(1, 3, 3), (2, 0, 0)],
          sector_number=998), None),
    (_blk(operation=BLKIF_OP_FLUSH_DISKCACHE, nr_segments=0), None),
    (_blk(operation=BLKIF_OP_WRITE_BARRIER, nr_segments=0), None),
    (_discard(900, 100), None),
    (_blk(operation=4), "unknown operation 4"),
    (_blk(operation=255), "unknown operation 255"),
    (_blk(operation=BLKIF_OP_INDIRECT), "indirect requests are not supported"),
    (_blk(nr_segments=0), "read with no segments"),
    (_blk(operation=BLKIF_OP_WRITE, nr_segments=12), "write with 12 segments (at most 11)"),
    (_blk(nr_segments=2, seg=[(1, 0, 7), (2, 5, 2)]),
     "read segment 1: first_sect 5 > last_sect 2"),
    (_blk(seg=[(1, 0, 8)]), "read segment 0: last_sect 8 is past the frame's 8 sectors"),
    (_blk(sector_number=1000 - 7), "read of sectors 993..1000 is beyond the disk's 1000 "
                                   "sectors"),
    (_blk(sector_number=2**64 - 1), "beyond the disk's 1000 sectors"),
    (_discard(901, 100), "discard of sectors 901..1000 is beyond"),
    (np.zeros((), NETIF_TX_REQUEST)[()], "not a blkif request"),
])
def test_validate_blkif_request(req, problem):
    got = validate_blkif_request(req, nr_sectors=1000)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_validate_accepts_indirect_when_the_backend_offers_it():
    assert validate_blkif_request(_blk(operation=BLKIF_OP_INDIRECT), nr_sectors=8,
                                  allow_indirect=True) is None


# ---- attach: state re-derived from the page


def test_a_fresh_frontend_carries_on_from_the_page():
    page = new_page()
    front, back = FrontRing(page, BLKIF), BackRing(page, BLKIF)
    for i in range(4):
        front.put_request(request(BLKIF, i))
    front.push_requests()
    front.put_request(request(BLKIF, 4))  # put, not pushed
    for _ in range(2):
        back.put_response(response(BLKIF, back.get_request()))
    back.push_responses()
    check_response(BLKIF, front.get_response(), 0)

    resumed = FrontRing(page, BLKIF)  # as a fresh process over the same RAM would
    assert (resumed.req_prod_pvt, resumed.rsp_cons) == (front.req_prod_pvt, front.rsp_cons)
    assert (resumed.req_prod_pvt, resumed.rsp_cons) == (5, 1)
    assert resumed.free_requests() == front.free_requests() == 28
    assert resumed.unconsumed_responses() == 1
    assert resumed.push_requests() is False  # request 4, put before the move, goes out
    while back.unconsumed_requests():
        back.put_response(response(BLKIF, back.get_request()))
    back.push_responses()
    assert [int(resumed.get_response()["id"]) for _ in range(4)] == [1, 2, 3, 4]


def test_attach_to_a_copy_of_the_page_and_a_fresh_backend_serves_the_unanswered():
    page = new_page()
    front, back = FrontRing(page, NETIF_RX), BackRing(page, NETIF_RX)
    for i in range(6):
        front.put_request(request(NETIF_RX, i))
    front.push_requests()
    taken = [back.get_request() for _ in range(4)]  # the old backend takes 4,
    for req in taken[:2]:
        back.put_response(response(NETIF_RX, req))
    back.push_responses()  # publishes 2 answers,
    back.put_response(response(NETIF_RX, taken[2]))  # and has a third one unpublished
    moved = page.copy()  # when the migration copies the page

    assert front.attach(moved) is front and front.page is moved
    fresh = BackRing(moved, NETIF_RX)  # the destination's backend
    assert (fresh.req_cons, fresh.rsp_prod_pvt, fresh.unconsumed_requests()) == (2, 2, 4)
    again = [fresh.get_request() for _ in range(4)]
    assert [int(r["id"]) for r in again] == [2, 3, 4, 5]
    # Xen's union: the unpublished response already overwrote request 2's slot, so its
    # gref reads back as the response's flags and status (status 3 << 16)
    assert int(again[0]["gref"]) == 3 << 16
    assert [int(r["gref"]) for r in again[1:]] == [3, 4, 5]
    for req in again:
        fresh.put_response(response(NETIF_RX, req))
    fresh.push_responses()
    assert [int(front.get_response()["id"]) for _ in range(6)] == list(range(6))
    assert SharedRing(page).indices()["rsp_prod"] == 2  # the source's page is untouched


def test_attach_refuses_a_page_that_cannot_hold_a_frontends_state():
    page = new_page()
    front = FrontRing(page, BLKIF)
    for i in range(3):
        front.put_request(request(BLKIF, i))
    front.push_requests()
    valid = page.copy()
    write_header(valid, rsp_prod=3)  # three answered of three published
    assert FrontRing(valid, BLKIF).unconsumed_responses() == 3
    for fields in (dict(front_rsp_cons=2),       # consumed past what was answered
                   dict(rsp_prod=4),             # answered past what was published
                   dict(front_req_prod_pvt=1),   # published more than it put
                   dict(front_req_prod_pvt=40),  # more outstanding than slots
                   dict(front_rsp_cons=M - 40)):  # a wild rsp_cons
        other = page.copy()
        write_header(other, **fields)
        with pytest.raises(RingError, match="does not hold a frontend's state"):
            FrontRing(other, BLKIF)
        with pytest.raises(RingError, match="does not hold a frontend's state"):
            front.attach(other)
        assert front.page is page and front.req_prod_pvt == 3  # all or nothing


def test_back_attach_with_an_explicit_req_cons():
    page = new_page()
    front = FrontRing(page, NETIF_TX)
    for i in range(5):
        front.put_request(request(NETIF_TX, i))
    front.push_requests()
    back = BackRing(page, NETIF_TX).attach(req_cons=2)
    assert back.unconsumed_requests() == 3
    check_request(NETIF_TX, back.get_request(), 2)
    with pytest.raises(InvalidArgument, match="more than 256 past rsp_prod 0"):
        back.attach(req_cons=257)

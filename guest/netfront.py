"""netfront and the guest's network service: Linux's xen-netfront reduced, in rx-copy
mode, with one packet per slot.

The guest posts every rx buffer (granted writable) on the rx ring; netback copies each
arriving packet into one. The service answers each request with a response of the
same sequence number, sent on the tx ring from a tx buffer granted read-only. Its
counters and its window of sequence numbers seen live in guest RAM.

On a move nothing in flight survives: the rings are initialised anew, the buffers
granted again, and whatever was in flight is dropped, as Linux's netfront does; the
peer's retransmissions recover it.
"""

from __future__ import annotations

import numpy as np

from pvmig.hv.evtchn import GuestEvents
from pvmig.hv.grant_table import GuestGrants
from pvmig.pv import netproto
from pvmig.pv.devlayout import NET_MAGIC, NET_SEEN_BITS, NET_SLOTS, NetArea
from pvmig.pv.ring import NETIF_RX, NETIF_TX, FrontRing, SharedRing

from .memapi import VcpuMemory

DOM0 = 0


def format_net_area(vm: VcpuMemory, area: NetArea) -> None:
    with vm.writing(area.state):
        counters = area.counters(vm.mem)
        counters[0] = np.zeros((), counters.dtype)
        area.seen(vm.mem)[:] = 0
        counters["magic"] = NET_MAGIC


class NetFront:
    def __init__(self, vm: VcpuMemory, area: NetArea, grants: GuestGrants,
                 events: GuestEvents) -> None:
        self.vm = vm
        self.area = area
        self.grants = grants
        self.events = events
        self.counters = area.counters(vm.mem)
        self.seen = area.seen(vm.mem)
        self.tx: FrontRing | None = None
        self.rx: FrontRing | None = None
        self.port = 0
        self._rx_refs: dict[int, int] = {}
        self._tx_refs: dict[int, int] = {}  # tx slot -> gref, until its response
        self.frozen = True

    # ---- xenbus callbacks

    def setup(self) -> dict:
        refs = {}
        for name, frame, layout in (("tx", self.area.tx_ring, NETIF_TX),
                                    ("rx", self.area.rx_ring, NETIF_RX)):
            page = self.vm.mem.pages[frame]
            mark = (lambda f: lambda *_: self.vm.log.mark(f))(frame)
            SharedRing.init(page, on_write=mark)
            setattr(self, name, FrontRing(page, layout, on_write=mark))
            refs[f"{name}-ring-ref"] = self.grants.grant(frame, domid=DOM0, readonly=False)
        self.port = self.events.alloc_unbound(DOM0)
        self._tx_refs = {}
        return {**refs, "request-rx-copy": 1}

    def connected(self) -> None:
        self._rx_refs = {}
        for slot in range(NET_SLOTS):
            self._rx_refs[slot] = self.grants.grant(self.area.rx_buffers + slot, domid=DOM0,
                                                    readonly=False)
            self.rx.put_request({"id": slot, "gref": self._rx_refs[slot]})
        self.frozen = False
        self._push(self.rx)

    def suspend(self) -> None:
        self.frozen = True
        with self.vm.writing(self.area.state):
            self.counters["inflight_at_suspend"] += int(self.counters[0]["tx_inflight"])

    def resume_in_place(self) -> None:
        if self.tx is not None:
            self.frozen = False

    def forget_connection(self) -> None:
        """After a move: in-flight packets are gone with the old host's rings."""
        dropped = int(self.counters[0]["tx_inflight"])
        self.tx = self.rx = None
        self._rx_refs, self._tx_refs = {}, {}
        self.frozen = True
        with self.vm.writing(self.area.state):
            self.counters["resumes"] += 1
            self.counters["dropped_at_resume"] += dropped
            self.counters["tx_inflight"] = 0

    # ---- running

    def poll(self) -> None:
        if self.rx is None or self.frozen:
            return
        while True:
            while self.rx.unconsumed_responses():
                rsp = self.rx.get_response()
                slot, size = int(rsp["id"]), int(rsp["status"])
                if 0 <= slot < NET_SLOTS:
                    if size > 0:
                        frame = self.vm.mem.pages[self.area.rx_buffers + slot]
                        self._serve(frame[int(rsp["offset"]):int(rsp["offset"]) + size].tobytes())
                    else:
                        self._count("rx_errors")
                    self.rx.put_request({"id": slot, "gref": self._rx_refs[slot]})
            if not self.rx.final_check_for_responses():
                break
        self._push(self.rx)
        while self.tx.unconsumed_responses() or self.tx.final_check_for_responses():
            rsp = self.tx.get_response()
            gref = self._tx_refs.pop(int(rsp["id"]), None)
            if gref is not None:
                self.grants.revoke(gref)
                with self.vm.writing(self.area.state):
                    self.counters["tx_inflight"] -= 1
            if int(rsp["status"]) < 0:
                self._count("tx_errors")

    def _serve(self, packet: bytes) -> None:
        msg = netproto.decode(packet)
        if msg is None or msg[0] != netproto.REQUEST:
            return
        seq = msg[1]
        with self.vm.writing(self.area.state):
            c = self.counters
            c["requests"] += 1
            high = int(c[0]["highest_seq"])
            if seq > high:  # the window moves: forget what the new numbers reuse
                if high and seq - high - 1 > int(c[0]["longest_gap"]):
                    c["longest_gap"] = seq - high - 1
                if seq - high >= NET_SEEN_BITS:
                    self.seen[:] = 0
                else:
                    for s in range(high + 1, seq):
                        self._set_seen(s, False)
                c["highest_seq"] = seq
            elif seq + NET_SEEN_BITS > high and self._is_seen(seq):
                c["duplicates"] += 1
            self._set_seen(seq, True)
        self._reply(netproto.encode(netproto.RESPONSE, seq))

    def _is_seen(self, seq: int) -> bool:
        bit = seq % NET_SEEN_BITS
        return bool(self.seen[bit // 8] & (1 << (bit % 8)))

    def _set_seen(self, seq: int, on: bool) -> None:
        bit = seq % NET_SEEN_BITS
        if on:
            self.seen[bit // 8] |= np.uint8(1 << (bit % 8))
        else:
            self.seen[bit // 8] &= np.uint8(~(1 << (bit % 8)) & 0xFF)

    def _reply(self, data: bytes) -> None:
        free = [s for s in range(NET_SLOTS) if s not in self._tx_refs]
        if self.tx.full() or not free:
            self._count("tx_full")
            return
        slot = free[0]
        buffer = self.area.tx_buffers + slot
        page = np.zeros(4096, dtype=np.uint8)
        page[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.vm.write_pages(np.array([buffer]), page.view(np.uint64)[None, :])
        gref = self.grants.grant(buffer, domid=DOM0, readonly=True)
        self._tx_refs[slot] = gref
        self.tx.put_request({"gref": gref, "offset": 0, "flags": 0, "id": slot,
                             "size": len(data)})
        with self.vm.writing(self.area.state):
            self.counters["responses"] += 1
            self.counters["tx_inflight"] += 1
        self._push(self.tx)

    def _push(self, ring: FrontRing) -> None:
        if ring.push_requests():
            self.events.notify(self.port)

    def _count(self, name: str) -> None:
        with self.vm.writing(self.area.state):
            self.counters[name] += 1

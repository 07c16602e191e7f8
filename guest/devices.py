"""The guest's side of its PV world: xenstore, xenbus, blkfront and its workload.

At boot and after every move the guest allocates an event channel for xenstore, tells
its toolstack (the hypercall channel's "xenstore" request), starts a fresh ring in its
magic page, and watches control/shutdown. Frontends then walk the xenbus handshake
with the backends waiting on this host. After a move the grant table and the event
channels are new and empty (they are the hypervisor's): the frontends grant and bind
again, and blkfront replays its shadow.
"""

from __future__ import annotations

import select

import numpy as np

from pvmig.hv.evtchn import GuestEvents
from pvmig.hv.grant_table import GuestGrants
from pvmig.hv.hypercall import GuestChannel, HypervisorGone
from pvmig.pv import guestinfo
from pvmig.pv.devlayout import BlkArea, NetArea
from pvmig.pv.recovery import Recovery
from pvmig.pv.xenbus import ClientStore, FrontendDevice, Negotiated, RingSetup
from pvmig.pv.xenstore import XsClient, XsRing

from .blkfront import BlkFront, BlockWorkload
from .memapi import VcpuMemory
from .netfront import NetFront

DOM0 = 0


class GuestDevices:
    def __init__(self, vm: VcpuMemory, chan: GuestChannel, *, gnttab: str, evtchn: str,
                 evfd: int, domid: int, rng: np.random.Generator) -> None:
        self.vm = vm
        self.chan = chan
        self.grants = GuestGrants.open(gnttab, domid=domid)
        self.events = GuestEvents.open(evtchn, fd=evfd)
        self.rng = rng
        self.suspend_requested = False
        self.xs: XsClient | None = None
        self.store: ClientStore | None = None
        self.front: BlkFront | None = None
        self.work: BlockWorkload | None = None
        self.frontdev: FrontendDevice | None = None
        self.net: NetFront | None = None
        self.netdev: FrontendDevice | None = None
        info = guestinfo.view(vm.mem)[0]
        self.net_devid = int(info["net_devid"])
        if int(info["net_first"]):
            self.net = NetFront(vm, NetArea.at(int(info["net_first"])), self.grants, self.events)
        self.blk_devid = int(info["blk_devid"])
        if int(info["blk_blocks"]):
            area = BlkArea.at(int(info["dev_first"]), int(info["blk_blocks"]))
            self.front = BlkFront(vm, area, self.grants, self.events, devid=self.blk_devid)
            self.work = BlockWorkload(self.front, rng, float(info["blk_io_rate"]))
            self.persistent = bool(info["blk_persistent"])

    # ---- bring-up: at boot, and on the new host after a move

    def connect(self, *, moved: bool, recovery: Recovery = Recovery.REPLAY) -> None:
        self._connect_xenstore()
        self.store.watch("control/shutdown", self._on_shutdown)
        if self.net is not None:
            if moved:
                self.net.forget_connection()
            self.netdev = FrontendDevice(
                self.store, f"device/vif/{self.net_devid}", persistent=False,
                max_ring_page_order=0,
                allocate=self._net_allocate,
                connect=lambda neg: self.net.connected(), disconnect=lambda: None)
            self.netdev.resume() if moved else self.netdev.start()
        if self.front is None:
            return
        if moved and recovery is Recovery.NAIVE:
            self.front.trust_old_ring(self.work.complete)
        if moved:
            self.front.forget_connection()
        self.frontdev = FrontendDevice(
            self.store, f"device/vbd/{self.blk_devid}", persistent=self.persistent,
            max_ring_page_order=0, allocate=self._allocate, connect=self._connected,
            disconnect=lambda: None)
        if moved:
            self.frontdev.resume()
        else:
            self.frontdev.start()

    def _connect_xenstore(self) -> None:
        page = self.vm.mem.pages[guestinfo.XENSTORE_FRAME]
        with self.vm.writing(guestinfo.XENSTORE_FRAME):
            page[:] = 0  # a fresh ring with this host's xenstored
        port = self.events.alloc_unbound(DOM0)
        self.chan.send({"op": "xenstore", "port": port, "rid": port})
        reply = self.chan.recv()
        if reply is None or reply.get("op") != "xenstore-ok":
            raise RuntimeError(f"the toolstack refused xenstore: {reply}")
        self.xs_port = port
        mark = lambda *_: self.vm.log.mark(guestinfo.XENSTORE_FRAME)  # noqa: E731
        self.xs = XsClient(XsRing(page, on_write=mark), lambda: self.events.notify(port),
                           wait=self._wait, timeout=30.0)
        self.store = ClientStore(self.xs)

    def _net_allocate(self, neg: Negotiated) -> RingSetup:
        keys = self.net.setup()
        return RingSetup((), self.net.port, keys)

    def _allocate(self, neg: Negotiated) -> RingSetup:
        ring_ref, port = self.front.setup()
        return RingSetup((ring_ref,), port)

    def _connected(self, neg: Negotiated) -> None:
        self.front.connected(persistent=neg.persistent)

    def _on_shutdown(self, path: str, token: str) -> None:
        if self.xs.read("control/shutdown") == b"suspend":
            self.suspend_requested = True

    def _wait(self, seconds: float) -> None:
        # The agent's end is watched too: when it dies, xenstored dies with it and no
        # answer will come (the guest preserves itself at once instead of timing out).
        poller = select.poll()
        poller.register(self.events, select.POLLIN)
        poller.register(self.chan, select.POLLRDHUP)  # its end closing, not its messages
        poller.poll(seconds * 1000)
        if self.chan.closed():
            raise HypervisorGone("the agent's channel closed")
        self.events.drain()

    # ---- running

    def fileno(self) -> int:
        return self.events.fileno()

    def service(self) -> None:
        """Whatever the event channels announced: xenstore, watches, responses. Every
        ring is re-checked each time, so a lost notification costs nothing."""
        self.events.drain()
        if self.store is not None:
            self.store.dispatch()
        if self.front is not None:
            self.front.poll(self.work.complete)
        if self.net is not None:
            self.net.poll()

    def step(self, dt: float, owed: float) -> float:
        """Issue the block requests the I/O rate owes; return what is still owed."""
        if self.work is None:
            return 0.0
        owed += self.work.rate * dt
        n = int(owed)
        if n:
            self.work.issue(n)
        return owed - n

    # ---- suspend

    def suspend(self) -> None:
        """Acknowledge (clear control/shutdown), quiesce our side: no new requests, no
        xenstore request in flight. What is in flight stays in the shadow."""
        self.suspend_requested = False
        self.store.write("control/shutdown", "")
        if self.front is not None:
            self.front.suspend()
        if self.net is not None:
            self.net.suspend()
        self.xs.suspend()

    def quiesce_alone(self) -> None:
        """The hypervisor went (its agent crashed): stop issuing, and tell nobody (there
        is no xenstored to tell). What is in flight stays in the shadow, replayed when
        a new agent resumes this domain."""
        self.suspend_requested = False
        if self.front is not None:
            self.front.suspend()
        if self.net is not None:
            self.net.suspend()

    def resume_in_place(self) -> None:
        """A cancelled suspend: the same host, the same connections."""
        self.xs.resume()
        if self.front is not None and self.front.ring is not None:
            self.front.frozen = False
        if self.net is not None:
            self.net.resume_in_place()


def vbd_config(config: dict) -> dict | None:
    """The guest's block device from its boot config (one, for now), or None."""
    vbds = [d for d in config.get("devices") or [] if d.get("kind", "vbd") == "vbd"]
    return vbds[0] if vbds else None


def vif_config(config: dict) -> dict | None:
    """The guest's network device from its boot config (one, for now), or None."""
    vifs = [d for d in config.get("devices") or [] if d.get("kind") == "vif"]
    return vifs[0] if vifs else None


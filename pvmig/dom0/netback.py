"""netback: the network backend in dom0 (the host agent), bridging to a UDP socket.

The guest's "wire" is a UDP socket on this host: what arrives there goes into the
guest's rx buffers by grant copy (tracked by log-dirty, as Linux's netback does), and
what the guest transmits is copied out of its tx buffers (read-only grants: tx never
dirties guest memory) and sent to the peer it came from. Peers are learnt from what
arrives, as a bridge learns addresses; after a move the destination's netback sends
them an ANNOUNCE (the gratuitous-ARP step) so that they follow the guest.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass, field

from pvmig import errors
from pvmig.hv.evtchn import BackendEvents, BackendPort
from pvmig.hv.grant_table import GrantTable
from pvmig.pv import netproto
from pvmig.pv.ring import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_ERROR,
    NETIF_RSP_OKAY,
    NETIF_RX,
    NETIF_TX,
    BackRing,
    RingError,
)

log = logging.getLogger(__name__)
DOM0 = 0
RX_QUEUE = 256
MAX_PEERS = 16


@dataclass
class NetStats:
    rx_packets: int = 0   # delivered into the guest
    rx_dropped: int = 0   # no rx buffer posted, or not connected
    tx_packets: int = 0
    tx_errors: int = 0


@dataclass
class NetBack:
    domid: int
    devid: int
    grants: GrantTable
    events: BackendEvents
    bind: str = "0.0.0.0"
    public: str = ""   # the host part of address(): what peers dial (default: bind)
    port: int = 0
    peers: list = field(default_factory=list)  # (host, port) learnt, or carried over a move
    stats: NetStats = field(default_factory=NetStats)
    sock: socket.socket | None = None
    _tx: BackRing | None = None
    _rx: BackRing | None = None
    _maps: list = field(default_factory=list)
    _port: BackendPort | None = None
    _pending: deque = field(default_factory=lambda: deque(maxlen=RX_QUEUE))
    closed: str = "not connected"
    connection: dict | None = None  # to reconnect after a quiesce
    reply_to: tuple | None = None   # who sent the last request: the guest's answers go there
    on_broken: object = None
    on_peer: object = None  # a peer learnt: what a crash of the agent must not forget

    @property
    def name(self) -> str:
        return f"vif {self.domid}/{self.devid}"

    def open(self) -> None:
        """The host side of the wire: bound at once, so the address is known early."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.bind, self.port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(self.sock, self._receive)

    def address(self) -> str:
        return f"{self.public or self.bind}:{self.port}"

    # ---- xenbus

    def connect(self, *, tx_ref: int, rx_ref: int, port: int) -> None:
        self.connection = {"tx_ref": tx_ref, "rx_ref": rx_ref, "port": port}
        tx = self.grants.map(tx_ref, mapper=DOM0, writable=True)
        rx = self.grants.map(rx_ref, mapper=DOM0, writable=True)
        self._maps = [tx, rx]
        self._tx = BackRing(tx.page, NETIF_TX, on_write=tx.written)
        self._rx = BackRing(rx.page, NETIF_RX, on_write=rx.written)
        self._port = self.events.bind_interdomain(port)
        self.events.on_event(self._port, lambda _p: self._service())
        self.closed = ""

    def disconnect(self, reason: str = "disconnected") -> None:
        self.closed = reason
        for m in self._maps:
            self.grants.unmap(m.handle)
        self._maps = []
        self._tx = self._rx = None
        self.events.release(self._port)
        self._port = None

    def announce(self) -> None:
        """Tell every known peer the guest is here now (the gratuitous ARP)."""
        for peer in self.peers:
            try:
                self.sock.sendto(netproto.encode(netproto.ANNOUNCE, 0), tuple(peer))
            except OSError as e:
                log.warning("%s: cannot announce to %s: %s", self.name, peer, e)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        if not self.closed:
            self.disconnect("closed")

    # ---- the wire

    def _receive(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(netproto.MAX_PACKET + 64)
            except BlockingIOError:
                break
            if netproto.decode(data) is None:
                continue  # not the guest's service: a bridge learns nothing from noise
            self.reply_to = addr
            if list(addr) not in self.peers:
                self.peers.append(list(addr))
                del self.peers[:-MAX_PEERS]
                if self.on_peer is not None:
                    self.on_peer()
            if self.closed:
                self.stats.rx_dropped += 1
                continue
            self._pending.append((data, addr))
        self._service()

    def _service(self) -> None:
        if self.closed:
            return
        try:
            self._deliver()
            self._transmit()
        except (RingError, errors.PvmigError) as e:
            log.error("%s: closing the device: %s", self.name, e)
            self.disconnect(f"broken ring: {e}")
            if self.on_broken is not None:
                self.on_broken(f"broken ring: {e}")

    def _deliver(self) -> None:
        """Packets into posted rx buffers, by grant copy (marked dirty at the copy)."""
        rx, notify = self._rx, False
        while self._pending and (rx.unconsumed_requests() or rx.final_check_for_requests()):
            data, _addr = self._pending.popleft()
            req = rx.get_request()
            try:
                self.grants.copy_to_guest(int(req["gref"]), 0, data, copier=DOM0)
                status = len(data)
                self.stats.rx_packets += 1
            except errors.PvmigError as e:
                log.warning("%s: rx buffer refused: %s", self.name, e)
                status = NETIF_RSP_ERROR
            rx.put_response({"id": int(req["id"]), "offset": 0, "flags": 0, "status": status})
            notify |= rx.push_responses()
        if notify:
            self.events.notify(self._port)

    def _transmit(self) -> None:
        tx, notify = self._tx, False
        while True:
            while tx.unconsumed_requests():
                req = tx.get_request()
                status = self._send(req)
                tx.put_response({"id": int(req["id"]), "status": status})
                notify |= tx.push_responses()
            if not tx.final_check_for_requests():
                break
        if notify:
            self.events.notify(self._port)

    def _send(self, req) -> int:
        size, offset = int(req["size"]), int(req["offset"])
        if size > netproto.MAX_PACKET or offset + size > 4096:
            self.stats.tx_errors += 1
            log.warning("%s: tx request %d refused: %d bytes at %d", self.name,
                        int(req["id"]), size, offset)
            return NETIF_RSP_ERROR
        try:
            data = self.grants.copy_from_guest(int(req["gref"]), offset, size, copier=DOM0)
        except errors.PvmigError as e:
            self.stats.tx_errors += 1
            log.warning("%s: tx request %d refused: %s", self.name, int(req["id"]), e)
            return NETIF_RSP_ERROR
        target = self.reply_to or (tuple(self.peers[-1]) if self.peers else None)
        if target is None:
            return NETIF_RSP_DROPPED
        try:
            self.sock.sendto(data, tuple(target))
        except OSError as e:
            self.stats.tx_errors += 1
            log.warning("%s: tx to %s failed: %s", self.name, target, e)
            return NETIF_RSP_ERROR
        self.stats.tx_packets += 1
        return NETIF_RSP_OKAY

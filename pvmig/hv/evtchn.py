"""Event channels: notifications between a guest process and the backends in its agent.

An interdomain event channel joins a guest's port to a backend in dom0, where pvmig's
backends live (the host agent). As in Xen, the channels are the hypervisor's and do not
survive a migration: the migration stream has no event-channel record, the destination
creates a fresh, empty table, and each frontend allocates a new port when it reconnects
through xenbus, then re-checks its ring, so that a notification lost at suspend costs
nothing (shared/XEN-ABI.md, "Event channels").

Per domain, the agent creates:

- a port table in a shared-memory file (pvmig.hv.shm), written by both processes: a header
  (magic, domid, number of ports), then per port its state (FREE, UNBOUND,
  INTERDOMAIN), the remote domain it is for, the guest's mask, and a pending flag per
  direction. Port 0 is never used, as in Xen.
- a socketpair(AF_UNIX, SOCK_SEQPACKET): the agent keeps one end (asyncio), the guest
  process gets the other as an fd number (blocking, for its select() loop). Each
  datagram is one little-endian u16 port: "look at your pending flags".

Who writes what. The guest allocates (FREE -> UNBOUND) and closes (-> FREE) its ports
and sets its masks; the backend binds (UNBOUND -> INTERDOMAIN) and unbinds (-> UNBOUND,
as Xen leaves the other end of a closed channel). The two never change one port's state
at the same time: xenbus orders them (the backend binds the port the frontend published,
and the frontend closes it only once the backend is gone).

Pending: a toggle pair, not a byte. Sending sets the receiver's pending flag first and
writes a datagram only if the flag was not already set (coalescing: a thousand notifies
before the receiver looks cost one datagram); the receiver clears the flag BEFORE it
handles the port, then handles it, so that a notify that comes after the clear sets the
flag again and sends a datagram, and one that came before it is seen by the handling.
Xen makes "set it and learn whether it was set" one atomic test_and_set_bit. Python has
no atomic read-modify-write on shared memory, and a plain read-then-write loses: the
sender reads "set", the receiver clears, the sender writes "set" again and sends
nothing, and the flag stays set with no datagram on its way, so every later notify is
coalesced into one that is never delivered. So the flag is two bytes with one writer
each: the sender toggles `to_x` only while `to_x == x_ack` (not pending), the receiver
copies `to_x` into `x_ack` to clear it; pending means they differ. Neither byte is ever
written by two processes, so no update is lost. Between a store to one and a load of the
other, each side puts a full memory barrier (`_full_barrier`), as Xen's locked
instructions are: x86 may otherwise let the load pass the store.

Why a lost datagram costs nothing: receivers read every queued datagram, then scan the
pending flags of all ports (numpy, microseconds). A datagram is only a wakeup; the flags
are the truth. That also makes a full socket buffer harmless: a send that would block is
skipped, since the receiver already has datagrams waiting and will scan every port.

Masks are the guest's (Xen's evtchn_mask): a notify to a masked port sets it pending and
sends nothing; unmask() reports a pending event, as Xen re-raises the upcall.

Binding follows Xen's evtchn_bind_interdomain, which "conservatively always" sets the
*local* port pending: the binder's, here the backend's. Notifies the guest sent while
its port was still unbound were dropped (as Xen drops them), so the backend's handler
runs once after the bind and finds whatever the frontend already queued.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pvmig.errors import InvalidArgument, ResourceExhausted
from pvmig.hv.shm import SharedFile

log = logging.getLogger(__name__)

FREE, UNBOUND, INTERDOMAIN = 0, 1, 2
DOM0 = 0  # where the backends live
DEFAULT_NR_PORTS = 1024
MAX_NR_PORTS = 0xFFFF  # ports travel as u16
DOMID_MAX = 0xFFFF

_MAGIC = 0x31435645  # "EVC1"
HEADER = np.dtype([("magic", "<u4"), ("domid", "<u2"), ("nr_ports", "<u2")])
PORT = np.dtype([
    ("state", "u1"),
    ("mask_guest", "u1"),    # written by the guest
    ("remote_domid", "<u2"),
    ("to_guest", "u1"),      # written by the backend: toggled to raise
    ("guest_ack", "u1"),     # written by the guest: set equal to clear
    ("to_backend", "u1"),    # written by the guest
    ("backend_ack", "u1"),   # written by the backend
])
_WIRE = struct.Struct("<H")
_STATE_NAMES = {FREE: "free", UNBOUND: "unbound", INTERDOMAIN: "interdomain"}

_BARRIER = threading.Lock()


def _full_barrier() -> None:
    """A full memory barrier: CPython's lock acquire and release are atomic
    read-modify-writes (sem_trywait, sem_post), which x86 executes as locked
    instructions: no load after them passes a store before them."""
    _BARRIER.acquire()
    _BARRIER.release()


class EventChannelError(InvalidArgument):
    """An event-channel operation refused: a bad port, one not bound, not this domain's."""


@dataclass(frozen=True)
class BackendPort:
    """A backend's handle on an interdomain channel: the guest's domain and port."""

    domid: int
    port: int

    def __int__(self) -> int:
        return self.port

    def __str__(self) -> str:
        return f"port {self.port} of domain {self.domid}"


@dataclass(frozen=True)
class EventStatistics:
    sent: int       # datagrams sent
    coalesced: int  # notifies merged into an event already pending (no datagram)
    masked: int     # notifies left pending on a masked port (no datagram)
    dropped: int    # notifies to a port with no other end (Xen drops them silently)
    received: int   # datagrams read
    delivered: int  # events handed over (drain() results, handler calls)


class _Counters:
    def __init__(self) -> None:
        self.sent = self.coalesced = self.masked = self.dropped = 0
        self.received = self.delivered = 0

    def freeze(self) -> EventStatistics:
        return EventStatistics(self.sent, self.coalesced, self.masked, self.dropped,
                               self.received, self.delivered)


class EventChannels:
    """One domain's port table (the shared file), and at creation its socketpair.

    The agent: `chans = EventChannels.create(path, domid=3)`, start the guest with
    `pass_fds=[chans.guest_fd]`, then `chans.close_guest_end()` and
    `BackendEvents(chans)`. The guest: `GuestEvents.open(path, fd=N)`."""

    def __init__(self, shared: SharedFile, *, backend_sock: socket.socket | None = None,
                 guest_sock: socket.socket | None = None) -> None:
        if shared.size < HEADER.itemsize:
            raise ValueError(f"{shared.path}: too small for an event-channel table")
        header = shared.bytes[:HEADER.itemsize].view(HEADER)[0]
        if int(header["magic"]) != _MAGIC:
            raise ValueError(f"{shared.path}: not an event-channel table")
        self._shared = shared
        self.path = shared.path
        self.domid = int(header["domid"])
        self.nr_ports = int(header["nr_ports"])
        if shared.size != HEADER.itemsize + self.nr_ports * PORT.itemsize:
            raise ValueError(f"{shared.path}: size {shared.size} does not fit "
                             f"{self.nr_ports} ports")
        self.ports = shared.bytes[HEADER.itemsize:].view(PORT)
        self.state = self.ports["state"]
        self.mask_guest = self.ports["mask_guest"]
        self.remote_domid = self.ports["remote_domid"]
        self.to_guest = self.ports["to_guest"]
        self.guest_ack = self.ports["guest_ack"]
        self.to_backend = self.ports["to_backend"]
        self.backend_ack = self.ports["backend_ack"]
        self.backend_sock = backend_sock
        self.guest_sock = guest_sock

    @classmethod
    def create(cls, path: str | os.PathLike, *, domid: int,
               nr_ports: int = DEFAULT_NR_PORTS) -> "EventChannels":
        """A fresh table (every port FREE) and the domain's socketpair."""
        if not 2 <= nr_ports <= MAX_NR_PORTS:
            raise ValueError(f"an event-channel table has 2 to {MAX_NR_PORTS} ports, "
                             f"not {nr_ports}")
        if not 0 <= domid <= DOMID_MAX:
            raise ValueError(f"{domid} is not a domain id")
        shared = SharedFile.create(path, HEADER.itemsize + nr_ports * PORT.itemsize)
        header = shared.bytes[:HEADER.itemsize].view(HEADER)
        header["domid"] = domid
        header["nr_ports"] = nr_ports
        header["magic"] = _MAGIC
        backend, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(shared, backend_sock=backend, guest_sock=guest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "EventChannels":
        """The table alone (the guest's side gets its socket as an fd)."""
        return cls(SharedFile.open(path))

    @property
    def guest_fd(self) -> int:
        """The guest's end of the socketpair, to pass to the guest process."""
        if self.guest_sock is None:
            raise EventChannelError(f"the event-channel socket of domain {self.domid} "
                                    "has been handed over already")
        return self.guest_sock.fileno()

    def close_guest_end(self) -> None:
        """Drop the agent's copy of the guest's end, once the guest process has it."""
        if self.guest_sock is not None:
            self.guest_sock.close()
            self.guest_sock = None

    def pending_guest(self, port: int) -> bool:
        return bool(self.to_guest[port] != self.guest_ack[port])

    def pending_backend(self, port: int) -> bool:
        return bool(self.to_backend[port] != self.backend_ack[port])

    def describe(self, port: int) -> str:
        return _STATE_NAMES.get(int(self.state[port]), f"state {int(self.state[port])}")

    def check_port(self, port: int) -> None:
        if not 0 < port < self.nr_ports:
            what = ("is never used" if port == 0
                    else f"is out of range ({self.nr_ports} ports)")
            raise EventChannelError(f"event channel port {port} of domain {self.domid} "
                                    f"{what}")

    def close(self) -> None:
        for sock in (self.backend_sock, self.guest_sock):
            if sock is not None:
                sock.close()
        self.backend_sock = self.guest_sock = None
        # Drop the views before the mapping can close (see SharedFile.close).
        for name in ("ports", "state", "mask_guest", "remote_domid", "to_guest",
                     "guest_ack", "to_backend", "backend_ack"):
            setattr(self, name, None)
        self._shared.close()

    def unlink(self) -> None:
        self._shared.unlink()


def _recv_all(sock: socket.socket, counters: _Counters) -> bool:
    """Read every queued datagram without blocking; False when the peer has gone."""
    while True:
        try:
            msg = sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        if not msg:
            return False
        counters.received += 1


def _send(sock: socket.socket, port: int, counters: _Counters) -> bool:
    """Send the wakeup for `port`; False when the peer has gone."""
    try:
        sock.send(_WIRE.pack(port), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        # The buffer is full of datagrams the receiver has not read yet: it will wake,
        # read them all and scan every port's flags, this one's included.
        counters.coalesced += 1
        return True
    except OSError as e:
        if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED):
            counters.dropped += 1
            return False
        raise
    counters.sent += 1
    return True


class GuestEvents:
    """The guest kernel's event channels: blocking socket, for a select() loop.

    Thread-safe. The guest's pending flags are cleared by drain(), before it returns a
    port: handle each port it returns after the call (and re-check the ring when done,
    as a frontend's final check does), never assume an event from before the drain."""

    def __init__(self, channels: EventChannels, sock: socket.socket) -> None:
        self.channels = channels
        self.domid = channels.domid
        self._sock = sock
        sock.setblocking(True)
        self._lock = threading.Lock()
        self._counters = _Counters()
        self.connected = True

    @classmethod
    def open(cls, path: str | os.PathLike, *, fd: int) -> "GuestEvents":
        return cls(EventChannels.open(path), socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self._sock.fileno()

    def alloc_unbound(self, remote_domid: int = DOM0) -> int:
        """A new port for `remote_domid` to bind (EVTCHNOP_alloc_unbound)."""
        if not 0 <= remote_domid <= DOMID_MAX:
            raise EventChannelError(f"domain {self.domid} cannot open an event channel "
                                    f"to domain {remote_domid}: not a domain id")
        ch = self.channels
        with self._lock:
            free = np.flatnonzero(ch.state[1:] == FREE)
            if not len(free):
                raise ResourceExhausted(f"domain {self.domid} has no free event channel "
                                        f"({ch.nr_ports} ports)")
            port = int(free[0]) + 1
            ch.mask_guest[port] = 0
            ch.guest_ack[port] = ch.to_guest[port]  # nothing pending from a past life
            ch.remote_domid[port] = remote_domid
            # State last: the backend reads it to decide whether the port can be bound.
            ch.state[port] = UNBOUND
            return port

    def close(self, port: int) -> None:
        """Close a port (EVTCHNOP_close): the backend's end of it goes dead."""
        ch = self.channels
        ch.check_port(port)
        with self._lock:
            if ch.state[port] == FREE:
                raise EventChannelError(f"event channel port {port} of domain "
                                        f"{self.domid} is not allocated")
            ch.state[port] = FREE
            ch.remote_domid[port] = 0
            ch.mask_guest[port] = 0
            ch.guest_ack[port] = ch.to_guest[port]

    def notify(self, port: int) -> None:
        """Notify the backend (EVTCHNOP_send). Write what it must see (the ring) first.
        A port not bound yet drops the notify, as Xen does; the bind makes up for it."""
        ch = self.channels
        ch.check_port(port)
        state = int(ch.state[port])
        if state == FREE:
            raise EventChannelError(f"event channel port {port} of domain {self.domid} "
                                    "is not allocated: cannot notify it")
        with self._lock:
            if state != INTERDOMAIN or not self.connected:
                self._counters.dropped += 1
                return
            # The caller's ring stores, then our load of the ack (see the docstring).
            _full_barrier()
            if ch.to_backend[port] != ch.backend_ack[port]:
                self._counters.coalesced += 1  # pending: the backend will handle it
                return
            ch.to_backend[port] ^= 1
            self.connected = _send(self._sock, port, self._counters)

    def drain(self) -> list[int]:
        """Read the queued datagrams without blocking, then return every unmasked port
        with an event pending, each once, clearing its flag before returning it.
        Masked ports stay pending."""
        ch = self.channels
        with self._lock:
            if self.connected:
                self.connected = _recv_all(self._sock, self._counters)
            ready = np.flatnonzero((ch.to_guest != ch.guest_ack) & (ch.mask_guest == 0)
                                   & (ch.state != FREE))
            # Clear BEFORE the caller handles: a notify after this sends a new datagram.
            ch.guest_ack[ready] = ch.to_guest[ready]
            # The clears, then the caller's loads of the rings.
            _full_barrier()
            self._counters.delivered += len(ready)
            return ready.tolist()

    def mask(self, port: int) -> None:
        self.channels.check_port(port)
        self.channels.mask_guest[port] = 1

    def unmask(self, port: int) -> bool:
        """Unmask; True when an event is pending on the port: handle it now (drain()
        returns it), as Xen re-raises the upcall for a pending port on unmask."""
        ch = self.channels
        ch.check_port(port)
        ch.mask_guest[port] = 0
        # The unmask, then the load of the flag; a backend notify does the mirror (flag,
        # then mask), so one of the two always sees the other.
        _full_barrier()
        return bool(ch.state[port] != FREE and ch.to_guest[port] != ch.guest_ack[port])

    def pending(self, port: int) -> bool:
        self.channels.check_port(port)
        return self.channels.pending_guest(port)

    def reset(self) -> None:
        """Forget every port: what a resumed guest does (on the new host its table is
        fresh; on an old one, every port is closed and its events dropped)."""
        ch = self.channels
        with self._lock:
            if self.connected:
                self.connected = _recv_all(self._sock, self._counters)
            ch.state[1:] = FREE
            ch.remote_domid[1:] = 0
            ch.mask_guest[1:] = 0
            ch.guest_ack[:] = ch.to_guest

    def statistics(self) -> EventStatistics:
        with self._lock:
            return self._counters.freeze()

    def disconnect(self) -> None:
        """Close the socket and the table (the guest process is going away)."""
        self._sock.close()
        self.channels.close()


Handler = Callable[[BackendPort], object]


class BackendEvents:
    """The backends' end of one domain's channels, in the agent's asyncio loop.

    Handlers run in the loop, one call per event, with the port's flag already cleared:
    they must not block (start a task for long work) and should re-check their ring
    when done. A pending event with no handler waits for one."""

    def __init__(self, channels: EventChannels) -> None:
        if channels.backend_sock is None:
            raise EventChannelError(f"the backends' event-channel socket of domain "
                                    f"{channels.domid} is already taken")
        self.channels = channels
        self.domid = channels.domid
        self._sock = channels.backend_sock
        channels.backend_sock = None
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._bound: dict[int, BackendPort] = {}
        self._handlers: dict[int, Handler] = {}
        self._local_pending: set[int] = set()  # set by binding: dom0's own flag
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.connected = True

    # ---- binding

    def bind_interdomain(self, remote_port: int) -> BackendPort:
        """Bind the guest's unbound port (EVTCHNOP_bind_interdomain). As in Xen, the
        bound port starts pending: the handler runs once, for whatever the frontend
        notified while nobody was bound."""
        ch = self.channels
        ch.check_port(remote_port)
        with self._lock:
            state = int(ch.state[remote_port])
            if state != UNBOUND:
                why = "already bound" if state == INTERDOMAIN else \
                    f"not allocated ({ch.describe(remote_port)})"
                raise EventChannelError(f"event channel port {remote_port} of domain "
                                        f"{self.domid} is {why}: cannot bind it")
            remote = int(ch.remote_domid[remote_port])
            if remote != DOM0:
                raise EventChannelError(f"event channel port {remote_port} of domain "
                                        f"{self.domid} is for domain {remote}, not "
                                        f"domain {DOM0}")
            ch.state[remote_port] = INTERDOMAIN
            handle = BackendPort(self.domid, remote_port)
            # A port the guest closed and allocated again replaces the dead binding.
            self._bound[remote_port] = handle
            self._handlers.pop(remote_port, None)
            self._local_pending.add(remote_port)
        self._schedule()
        return handle

    def unbind(self, port: BackendPort | int) -> None:
        """Close the backend's end: the guest's port goes back to UNBOUND (as Xen leaves
        the other end of a closed channel) and its later notifies are dropped."""
        p = self._check(port, "unbind")
        with self._lock:
            del self._bound[p]
            self._handlers.pop(p, None)
            self._local_pending.discard(p)
            if self.channels.state[p] == INTERDOMAIN:
                self.channels.state[p] = UNBOUND

    def release(self, port: BackendPort | None) -> None:
        """Unbind a backend's port when it lets go of a connection, if it is still
        bound (a guest that closed its end, or a quiesce, may have ended it already)."""
        if port is None:
            return
        try:
            self.unbind(port)
        except EventChannelError:
            pass

    def on_event(self, port: BackendPort | int, callback: Handler) -> None:
        """Call `callback(handle)` in the loop for each event on `port`."""
        p = self._check(port, "handle events of")
        with self._lock:
            self._handlers[p] = callback
        self._schedule()  # it may be pending already

    # ---- notify

    def notify(self, port: BackendPort | int) -> None:
        """Notify the guest. Write what it must see (the ring) first. Coalesces with an
        event still pending; a masked port is left pending without a datagram; a port
        the guest has closed drops the notify (as Xen does)."""
        p = self._check(port, "notify")
        ch = self.channels
        with self._lock:
            if ch.state[p] != INTERDOMAIN or not self.connected:
                self._counters.dropped += 1
                return
            _full_barrier()  # the caller's ring stores, then our load of the ack
            if ch.to_guest[p] != ch.guest_ack[p]:
                self._counters.coalesced += 1
                return
            ch.to_guest[p] ^= 1
            _full_barrier()  # the flag, then the load of the mask (unmask: the mirror)
            if ch.mask_guest[p]:
                self._counters.masked += 1
                return
            self.connected = _send(self._sock, p, self._counters)

    # ---- lifecycle

    def start(self) -> None:
        """Listen in the running loop; handles what is pending already."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            return
        self._loop = loop
        if self.connected:
            loop.add_reader(self._sock, self._readable)
        self._schedule()

    def stop(self) -> None:
        """Stop listening (a backend quiescing): events stay pending until start()."""
        if self._loop is not None:
            self._loop.remove_reader(self._sock)
            self._loop = None

    def close(self) -> None:
        """Stop, unbind every port, close the socket."""
        self.stop()
        for p in list(self._bound):
            self.unbind(p)
        self._sock.close()

    def statistics(self) -> EventStatistics:
        with self._lock:
            return self._counters.freeze()

    # ---- internals

    def _check(self, port: BackendPort | int, action: str) -> int:
        if isinstance(port, BackendPort):
            if port.domid != self.domid:
                raise EventChannelError(f"cannot {action} {port}: these are the backends "
                                        f"of domain {self.domid}")
            p = port.port
        else:
            p = int(port)
        self.channels.check_port(p)
        if p not in self._bound:
            raise EventChannelError(f"cannot {action} event channel port {p} of domain "
                                    f"{self.domid}: not bound by its backends "
                                    f"({self.channels.describe(p)})")
        return p

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None or self._scheduled:
            return
        self._scheduled = True
        loop.call_soon_threadsafe(self._dispatch)

    def _readable(self) -> None:
        self.connected = _recv_all(self._sock, self._counters)
        if not self.connected and self._loop is not None:
            # A closed peer stays readable forever: stop watching it.
            log.warning("domain %d closed its event-channel socket", self.domid)
            self._loop.remove_reader(self._sock)
        self._dispatch()

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._loop is None:
            return
        ch = self.channels
        with self._lock:
            pending = set(np.flatnonzero(ch.to_backend != ch.backend_ack).tolist())
            pending |= self._local_pending
            ready = sorted(p for p in pending
                           if p in self._handlers and ch.state[p] == INTERDOMAIN)
            for p in ready:
                # Clear BEFORE handling: a notify after this sends a new datagram.
                ch.backend_ack[p] = ch.to_backend[p]
                self._local_pending.discard(p)
            _full_barrier()  # the clears, then the handlers' loads of the rings
            calls = [(self._handlers[p], self._bound[p]) for p in ready]
            self._counters.delivered += len(calls)
        for handler, handle in calls:
            try:
                handler(handle)
            except Exception:
                log.exception("event handler for %s failed", handle)

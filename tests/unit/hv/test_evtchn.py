"""Event channels (pvmig/hv/evtchn.py) between a real guest process and asyncio backends.

The guest side runs in a child process that gets its socket end as an fd (pass_fds, as
the agent starts guests) and obeys one JSON command per line; the backend side runs in
the test's asyncio loop. Refusals and the wire format are checked in-process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest
from support import ROOT

from pvmig import errors
from pvmig.hv.evtchn import (
    FREE,
    INTERDOMAIN,
    UNBOUND,
    BackendEvents,
    BackendPort,
    EventChannelError,
    EventChannels,
    GuestEvents,
)

pytestmark = pytest.mark.timeout(20)

DOMID = 3
STEP = 5.0  # the most any one exchange may take

GUEST_PROGRAM = r"""
import json, select, sys, time
from pvmig.hv.evtchn import GuestEvents

ev = GuestEvents.open(sys.argv[1], fd=int(sys.argv[2]))

def wait(timeout):
    ready, _, _ = select.select([ev], [], [], timeout)
    return ev.drain() if ready else []

def notify_many(port, n):
    for _ in range(n):
        ev.notify(port)

ops = {"alloc": ev.alloc_unbound, "close": ev.close, "notify": ev.notify,
       "notify_many": notify_many, "drain": ev.drain, "wait": wait, "mask": ev.mask,
       "unmask": ev.unmask, "pending": ev.pending, "reset": ev.reset, "sleep": time.sleep,
       "stats": lambda: vars(ev.statistics())}
print(json.dumps({"ok": "ready"}), flush=True)
for line in sys.stdin:
    op, *args = json.loads(line)
    try:
        reply = {"ok": ops[op](*args)}
    except Exception as e:
        reply = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
"""


class Guest:
    """The guest process: `await guest("op", *args)` runs one GuestEvents call there."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, chans: EventChannels) -> "Guest":
        fd = chans.guest_fd
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", GUEST_PROGRAM, str(chans.path), str(fd),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            pass_fds=[fd], cwd=ROOT)
        chans.close_guest_end()  # the guest has its copy
        guest = cls(proc)
        assert await guest.reply() == "ready"
        return guest

    async def reply(self):
        line = await asyncio.wait_for(self.proc.stdout.readline(), STEP)
        out = json.loads(line)
        if "error" in out:
            raise AssertionError(f"guest: {out['error']}")
        return out["ok"]

    async def __call__(self, op: str, *args):
        self.proc.stdin.write(json.dumps([op, *args]).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.reply()

    async def stop(self) -> None:
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), STEP)


class Recorder:
    """A backend handler that records the ports it was called for."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._changed = asyncio.Event()

    def __call__(self, handle: BackendPort) -> None:
        assert handle.domid == DOMID
        self.calls.append(handle.port)
        self._changed.set()

    async def wait_for(self, n: int) -> list[int]:
        """The calls once there are n of them; then a moment more, to catch extras."""
        async def enough() -> None:
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(enough(), STEP)
        await asyncio.sleep(0.05)
        return self.calls


def run(tmp_path: Path, scenario) -> None:
    """Run scenario(chans, backend, guest) with a live guest process and backend."""
    async def main() -> None:
        chans = EventChannels.create(tmp_path / "evtchn", domid=DOMID)
        backend = BackendEvents(chans)
        guest = await Guest.start(chans)
        try:
            await scenario(chans, backend, guest)
        finally:
            backend.close()
            await guest.stop()
            chans.close()
    asyncio.run(main())


async def connect(backend: BackendEvents, guest: Guest) -> tuple[int, BackendPort, Recorder]:
    """The xenbus dance, minus xenstore: the frontend allocates, the backend binds."""
    port = await guest("alloc", 0)
    handle = backend.bind_interdomain(port)
    rec = Recorder()
    backend.on_event(handle, rec)
    return port, handle, rec


# ---- across processes


def test_notifications_in_both_directions(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        assert handle == BackendPort(DOMID, port) and int(handle) == port
        assert chans.state[port] == INTERDOMAIN
        backend.start()
        assert await rec.wait_for(1) == [port]  # the bind's own event (Xen's rule)

        await guest("notify", port)  # guest -> backend
        assert await rec.wait_for(2) == [port, port]

        backend.notify(handle)       # backend -> guest
        assert await guest("wait", STEP) == [port]
        assert await guest("wait", 0.1) == []  # once, and nothing spurious

        # A second channel: each event lands on its own port.
        port2, handle2, rec2 = await connect(backend, guest)
        assert await rec2.wait_for(1) == [port2]
        await guest("notify", port2)
        assert await rec2.wait_for(2) == [port2, port2]
        assert rec.calls == [port, port]
        backend.notify(handle2)
        backend.notify(handle)
        got = await guest("wait", STEP)
        if len(got) < 2:
            got += await guest("wait", STEP)
        assert sorted(got) == [port, port2]

        stats = await guest("stats")
        assert (stats["sent"], stats["delivered"]) == (2, 3)
        b = backend.statistics()
        assert (b.sent, b.received, b.delivered) == (3, 2, 4)
    run(tmp_path, scenario)


def test_binding_sets_the_binders_port_pending_once(tmp_path):
    """Xen's evtchn_bind_interdomain sets the *local* (binding backend's) port pending:
    notifies the frontend sent to its still-unbound port were dropped, and the bind
    makes up for them with one event."""
    async def scenario(chans, backend, guest):
        backend.start()
        port = await guest("alloc", 0)
        assert chans.state[port] == UNBOUND
        await guest("notify_many", port, 3)  # nobody bound: dropped, as in Xen
        stats = await guest("stats")
        assert (stats["dropped"], stats["sent"]) == (3, 0)
        assert not chans.pending_backend(port)

        handle = backend.bind_interdomain(port)
        rec = Recorder()
        await asyncio.sleep(0.05)   # pending, but no handler yet: it waits for one
        backend.on_event(handle, rec)
        assert await rec.wait_for(1) == [port]
        assert await guest("drain") == []  # the guest's end is not made pending
        assert not chans.pending_guest(port)
    run(tmp_path, scenario)


def test_many_notifies_to_the_backend_coalesce_and_none_is_lost(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        # The backend is not listening yet: a hundred notifies, one datagram.
        await guest("notify_many", port, 100)
        stats = await guest("stats")
        assert (stats["sent"], stats["coalesced"]) == (1, 99)
        assert chans.pending_backend(port)

        backend.start()  # sees the port once (the bind's event merges into it too)
        assert await rec.wait_for(1) == [port]
        assert not chans.pending_backend(port)
        await guest("notify", port)  # after the handler: a new event, not coalesced
        assert await rec.wait_for(2) == [port, port]
        assert (await guest("stats"))["sent"] == 2
        assert backend.statistics().received == 2
    run(tmp_path, scenario)


def test_many_notifies_to_the_guest_coalesce_and_none_is_lost(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        for _ in range(100):
            backend.notify(handle)
        b = backend.statistics()
        assert (b.sent, b.coalesced) == (1, 99)
        assert await guest("wait", STEP) == [port]
        assert await guest("drain") == []
        backend.notify(handle)  # after the drain: delivered again
        assert await guest("wait", STEP) == [port]
        assert (await guest("stats"))["received"] == 2
    run(tmp_path, scenario)


def test_a_masked_port_stays_pending_and_unmask_redelivers(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        await guest("mask", port)
        backend.notify(handle)
        backend.notify(handle)
        b = backend.statistics()
        assert (b.sent, b.masked, b.coalesced) == (0, 1, 1)  # no datagram at all
        assert await guest("wait", 0.2) == []
        assert await guest("pending", port) is True
        assert await guest("unmask", port) is True   # "handle it now"
        assert await guest("drain") == [port]
        assert await guest("unmask", port) is False  # nothing left

        # A datagram that arrives after the guest masked: read, but the port waits.
        backend.notify(handle)
        await guest("mask", port)
        assert await guest("wait", STEP) == []
        assert await guest("pending", port) is True
        assert await guest("unmask", port) is True
        assert await guest("drain") == [port]
    run(tmp_path, scenario)


def test_pending_survives_a_receiver_that_is_not_listening(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        backend.start()
        await rec.wait_for(1)

        # The guest is busy (not in select) while the backend notifies.
        busy = asyncio.create_task(guest("sleep", 0.3))
        await asyncio.sleep(0.1)
        backend.notify(handle)
        await busy
        assert chans.pending_guest(port)
        assert await guest("drain") == [port]

        # The backend stops listening (a backend quiescing) while the guest notifies.
        backend.stop()
        await guest("notify", port)
        await asyncio.sleep(0.2)
        assert rec.calls == [port] and chans.pending_backend(port)
        backend.start()
        assert await rec.wait_for(2) == [port, port]
    run(tmp_path, scenario)


def test_unbind_and_close_drop_later_notifies(tmp_path):
    async def scenario(chans, backend, guest):
        port, handle, rec = await connect(backend, guest)
        backend.start()
        await rec.wait_for(1)

        backend.unbind(handle)  # the guest's end goes back to unbound, as in Xen
        assert chans.state[port] == UNBOUND
        await guest("notify", port)
        assert (await guest("stats"))["dropped"] == 1
        with pytest.raises(EventChannelError, match="not bound by its backends"):
            backend.notify(handle)

        # A new backend binds the same port (a reconnect): pending once again.
        handle = backend.bind_interdomain(port)
        backend.on_event(handle, rec)
        assert await rec.wait_for(2) == [port, port]

        await guest("close", port)  # the guest goes away: the backend's notifies drop
        assert chans.state[port] == FREE
        backend.notify(handle)
        assert backend.statistics().dropped == 1
        assert await guest("wait", 0.1) == []
    run(tmp_path, scenario)


# ---- in-process: refusals, the wire, a fresh table


@pytest.fixture
def local(tmp_path):
    """Both sides in this process, over a real socketpair."""
    chans = EventChannels.create(tmp_path / "evtchn", domid=DOMID, nr_ports=64)
    backend = BackendEvents(chans)
    guest = GuestEvents(EventChannels.open(tmp_path / "evtchn"), chans.guest_sock)
    chans.guest_sock = None  # the guest owns it now
    yield chans, backend, guest
    backend.close()
    guest.disconnect()
    chans.close()


def test_refusals_name_the_port_and_change_nothing(local):
    chans, backend, guest = local
    bound = guest.alloc_unbound(0)
    handle = backend.bind_interdomain(bound)
    unbound = guest.alloc_unbound(0)
    for_domu = guest.alloc_unbound(5)

    def refused(match: str, op, *args) -> None:
        before = chans.ports.tobytes()
        with pytest.raises(EventChannelError, match=match) as info:
            op(*args)
        assert isinstance(info.value, errors.InvalidArgument)
        assert "\n" not in str(info.value)
        assert chans.ports.tobytes() == before

    refused(r"^event channel port 64 of domain 3 is out of range \(64 ports\)$",
            backend.bind_interdomain, 64)
    refused(r"^event channel port 0 of domain 3 is never used$", backend.bind_interdomain, 0)
    refused(r"^event channel port 40 of domain 3 is not allocated \(free\): cannot bind it$",
            backend.bind_interdomain, 40)
    refused(rf"^event channel port {bound} of domain 3 is already bound: cannot bind it$",
            backend.bind_interdomain, bound)
    refused(rf"^event channel port {for_domu} of domain 3 is for domain 5, not domain 0$",
            backend.bind_interdomain, for_domu)
    refused(rf"^cannot notify event channel port {unbound} of domain 3: not bound by its "
            r"backends \(unbound\)$", backend.notify, unbound)
    refused(r"^cannot notify port 7 of domain 4: these are the backends of domain 3$",
            backend.notify, BackendPort(4, 7))
    refused(r"^cannot handle events of event channel port 9 of domain 3: not bound",
            backend.on_event, 9, print)
    refused(r"^event channel port 1000 of domain 3 is out of range",
            backend.unbind, BackendPort(DOMID, 1000))
    refused(r"^event channel port 40 of domain 3 is not allocated: cannot notify it$",
            guest.notify, 40)
    refused(r"^event channel port 40 of domain 3 is not allocated$", guest.close, 40)
    refused(r"^event channel port 0 of domain 3 is never used$", guest.mask, 0)
    refused(r"^event channel port 99 of domain 3 is out of range", guest.unmask, 99)
    refused(r"cannot open an event channel to domain 65536: not a domain id",
            guest.alloc_unbound, 65536)
    with pytest.raises(EventChannelError, match="already taken"):
        BackendEvents(chans)
    assert chans.state[bound] == INTERDOMAIN and handle.port == bound

    # Every port in use: a clear resource error, and nothing changed.
    for _ in range(64 - 4):
        guest.alloc_unbound(0)
    before = chans.ports.tobytes()
    with pytest.raises(errors.ResourceExhausted,
                       match=r"domain 3 has no free event channel \(64 ports\)"):
        guest.alloc_unbound(0)
    assert chans.ports.tobytes() == before


def test_the_wire_is_one_little_endian_u16_port_per_datagram(local, tmp_path):
    chans, backend, guest = local
    port = guest.alloc_unbound(0)
    handle = backend.bind_interdomain(port)
    backend.notify(handle)
    raw = socket.socket(fileno=guest.fileno())  # read it off the guest's end directly
    try:
        assert raw.type == socket.SOCK_SEQPACKET
        assert raw.recv(16) == port.to_bytes(2, "little")
    finally:
        raw.detach()
    assert guest.drain() == [port]  # the flag is the truth: the datagram is only a wakeup


def test_a_moved_guest_finds_a_fresh_table(local, tmp_path):
    chans, backend, guest = local
    port = guest.alloc_unbound(0)
    backend.bind_interdomain(port)
    guest.mask(port)
    # The destination's table: no port survives the move.
    fresh = EventChannels.create(tmp_path / "evtchn-dest", domid=DOMID)
    try:
        assert fresh.nr_ports == 1024 and fresh.domid == DOMID
        assert not fresh.ports.tobytes().strip(b"\0")
    finally:
        fresh.close()
    # reset() on the old table: every port closed, nothing pending, nothing masked.
    guest.reset()
    assert (chans.state == FREE).all() and not chans.mask_guest.any()
    assert guest.alloc_unbound(0) == 1
    with pytest.raises(ValueError, match="not an event-channel table"):
        (tmp_path / "junk").write_bytes(b"\0" * 64)
        EventChannels.open(tmp_path / "junk")

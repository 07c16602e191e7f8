"""xenbus (pvmig/pv/xenbus.py): the blkif handshake between a backend on dom0's direct
xenstore connection and a frontend on a guest XsClient over a real ring page."""

from __future__ import annotations

import numpy as np
import pytest

from pvmig.dom0.toolstack import create_device
from pvmig.dom0.xenstored import RingServer, Xenstored
from pvmig.pv.xenbus import (
    BackendDevice,
    ClientStore,
    FrontendDevice,
    FrontendInfo,
    Negotiated,
    RingSetup,
    XenbusError,
    XenbusState,
    backend_path,
    frontend_path,
)
from pvmig.pv.xenstore import XsClient, XsRing

pytestmark = pytest.mark.timeout(30)

S = XenbusState
DOMID, DEVID = 3, 768
FE = frontend_path(DOMID, "vbd", DEVID)
BE = backend_path(DOMID, "vbd", DEVID)


class Host:
    """A host's xenstored with dom0's connection, and a guest's xenstore client."""

    def __init__(self, xs: Xenstored | None = None, domid: int = DOMID,
                 page: np.ndarray | None = None) -> None:
        self.xs = xs or Xenstored()
        if not self.xs.is_introduced(domid):
            self.xs.introduce(domid, mfn=100, evtchn=1)
        self.dom0 = self.xs.connect(0)
        self.domid = domid
        self.page = np.zeros(4096, np.uint8) if page is None else page
        self.server = RingServer(self.xs.connect(domid), XsRing(self.page), lambda: None)
        self.guest_ring()

    def guest_ring(self) -> None:
        """A guest-side client over the page (a fresh one, as a resumed guest makes)."""
        client = XsClient(XsRing(self.page), lambda: None, wait=lambda t: self.server.pump(),
                          timeout=5)
        self.store = ClientStore(client)

    def run(self, until=lambda: False, rounds: int = 50) -> None:
        """Pump the ring and dispatch the guest's watch events until `until()`."""
        for _ in range(rounds):
            self.server.pump()
            self.store.dispatch()
            if until():
                return
        if until() is not True:
            raise AssertionError("did not settle")

    def read(self, path: str) -> str:
        return self.dom0.read(path).decode()


class Backend:
    """A blkback stand-in: records what its callbacks are given."""

    def __init__(self, host: Host, *, persistent: bool = True, max_order: int = 2) -> None:
        self.trace: list[object] = []
        self.dev = BackendDevice(
            host.dom0, BE,
            features={"feature-persistent": int(persistent), "max-ring-page-order": max_order},
            connect=self._connect, disconnect=lambda: self.trace.append("disconnect"))

    def _connect(self, info: FrontendInfo) -> dict[str, int]:
        self.trace.append(info)
        return {"sectors": 2048, "sector-size": 512}


class Frontend:
    """A blkfront stand-in: hands out ring refs and channels, records its callbacks."""

    def __init__(self, host: Host, *, persistent: bool = True, max_order: int = 0,
                 path: str = "device/vbd/768") -> None:
        self.trace: list[object] = []
        self.next_ref = 8
        self.next_port = 10
        self.dev = FrontendDevice(host.store, path, persistent=persistent,
                                  max_ring_page_order=max_order, allocate=self._allocate,
                                  connect=lambda n: self.trace.append(("connect", n)),
                                  disconnect=lambda: self.trace.append("disconnect"))

    def _allocate(self, neg: Negotiated) -> RingSetup:
        refs = tuple(range(self.next_ref, self.next_ref + (1 << neg.ring_page_order)))
        self.next_ref += len(refs)
        self.next_port += 1
        self.trace.append(("allocate", neg))
        return RingSetup(refs, self.next_port)


def connected(*devs) -> bool:
    return all(d.state == S.Connected for d in devs)


def start_pair(host: Host, be_kw: dict = {}, fe_kw: dict = {}) -> tuple[Backend, Frontend]:
    assert create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID) == (FE, BE)
    back, front = Backend(host, **be_kw), Frontend(host, **fe_kw)
    back.dev.start()
    front.dev.start()
    host.run(lambda: connected(back.dev, front.dev))
    return back, front


def test_the_states_are_xenbus_hs():
    assert [(s.name, int(s)) for s in XenbusState] == [
        ("Unknown", 0), ("Initialising", 1), ("InitWait", 2), ("Initialised", 3),
        ("Connected", 4), ("Closing", 5), ("Closed", 6), ("Reconfiguring", 7),
        ("Reconfigured", 8)]


def test_create_device_writes_both_directories_pointing_at_each_other():
    host = Host()
    create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID,
                  backend_keys={"params": "/disk.img"})
    assert host.read(f"{FE}/backend") == BE and host.read(f"{FE}/backend-id") == "0"
    assert host.read(f"{BE}/frontend") == FE and host.read(f"{BE}/frontend-id") == "3"
    assert host.read(f"{FE}/state") == host.read(f"{BE}/state") == "1"
    assert host.read(f"{BE}/params") == "/disk.img"
    assert host.dom0.get_perms(FE) == [(3, "n"), (0, "r")]
    assert host.dom0.get_perms(f"{BE}/state") == [(0, "n"), (3, "r")]
    guest = host.xs.connect(DOMID)
    assert guest.read(f"{BE}/state") == b"1"       # the guest reads its backend
    guest.write(f"{FE}/ring-ref", "8")             # and writes its own directory
    with pytest.raises(Exception, match="EACCES"):
        guest.write(f"{BE}/state", "4")            # but not the backend's


def test_the_handshake_reaches_connected_on_both_ends():
    host = Host()
    back, front = start_pair(host, fe_kw={"max_order": 1})
    neg = Negotiated(persistent=True, ring_page_order=1)
    assert front.trace == [("allocate", neg), ("connect", neg)]
    info = back.trace[0]
    assert isinstance(info, FrontendInfo) and back.trace == [info]
    assert (info.ring_refs, info.event_channel, info.protocol, info.persistent,
            info.ring_page_order) == ((8, 9), 11, "x86_64-abi", True, 1)
    # what each end published
    assert host.read(f"{BE}/state") == "4" and host.read(f"{FE}/state") == "4"
    assert host.read(f"{BE}/feature-persistent") == "1"
    assert host.read(f"{BE}/max-ring-page-order") == "2"
    assert host.read(f"{BE}/sectors") == "2048"  # published by connect, before Connected
    assert [host.read(f"{FE}/{k}") for k in ("ring-ref0", "ring-ref1", "ring-page-order",
                                             "event-channel", "protocol",
                                             "feature-persistent")] == \
        ["8", "9", "1", "11", "x86_64-abi", "1"]
    assert front.dev.negotiated == neg and back.dev.info == info


@pytest.mark.parametrize("fe,be,expect", [(True, True, True), (True, False, False),
                                          (False, True, False), (False, False, False)])
def test_persistent_grants_are_negotiated(fe, be, expect):
    host = Host()
    back, front = start_pair(host, be_kw={"persistent": be}, fe_kw={"persistent": fe})
    assert front.dev.negotiated.persistent is expect
    assert back.dev.info.persistent is expect
    assert host.read(f"{FE}/feature-persistent") == ("1" if expect else "0")


@pytest.mark.parametrize("fe_max,be_max,order", [(0, 4, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0)])
def test_the_ring_order_is_the_smaller_offer(fe_max, be_max, order):
    host = Host()
    back, front = start_pair(host, be_kw={"max_order": be_max}, fe_kw={"max_order": fe_max})
    assert front.dev.negotiated.ring_page_order == order
    assert len(back.dev.info.ring_refs) == 1 << order
    if order == 0:
        assert host.read(f"{FE}/ring-ref") == "8"


def test_reconnect_after_a_resume_in_place():
    host = Host()
    back, front = start_pair(host)
    front.trace.clear()
    back.trace.clear()
    old = (host.read(f"{FE}/ring-ref"), host.read(f"{FE}/event-channel"))
    front.dev.resume()
    assert front.dev.state in (S.Initialising, S.Initialised)
    host.run(lambda: connected(back.dev, front.dev))
    new = (host.read(f"{FE}/ring-ref"), host.read(f"{FE}/event-channel"))
    assert new != old and new == ("9", "12")
    assert front.trace[0] == "disconnect" and back.trace[0] == "disconnect"
    assert back.trace[1].ring_refs == (9,) and back.trace[1].event_channel == 12
    assert back.dev.connects == 2 and front.dev.connects == 2


def test_a_resumed_guest_on_another_host_reconnects_to_a_new_backend():
    """The migration: the guest's entries move with the device state, the destination
    re-creates the device, starts a fresh backend, and a fresh guest process resumes
    with a new XsClient and a new FrontendDevice (from Unknown)."""
    src = Host()
    back, front = start_pair(src)
    state = src.xs.dump(DOMID, exclude=["device"])

    dst = Host(Xenstored(), domid=DOMID, page=src.page.copy())
    dst.xs.load(DOMID, state)
    create_device(dst.dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    back2 = Backend(dst)
    back2.dev.start()
    front2 = Frontend(dst)
    front2.next_ref, front2.next_port = 40, 40
    dst.store.client.resume()
    front2.dev.resume()
    dst.run(lambda: connected(back2.dev, front2.dev))
    assert back2.trace[0].ring_refs == (40,) and back2.trace[0].event_channel == 41
    back.dev.detach()  # the source lets go without telling anyone
    assert back.trace[-1] == "disconnect" and back.dev.state == S.Connected


def test_a_fresh_backend_does_not_connect_to_a_stale_connected_frontend():
    host = Host()
    create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    host.dom0.write(f"{FE}/ring-ref", "99")
    host.dom0.write(f"{FE}/event-channel", "99")
    host.dom0.write(f"{FE}/state", str(int(S.Connected)))  # left by an old handshake
    back = Backend(host)
    back.dev.start()
    host.run(lambda: True)
    assert back.dev.state == S.InitWait and back.trace == []


def test_close_from_the_frontend_then_reconnect():
    host = Host()
    back, front = start_pair(host)
    front.dev.close()
    host.run(lambda: back.dev.state == front.dev.state == S.Closed)
    assert "disconnect" in back.trace and front.trace[-1] == "disconnect"
    front.dev.resume()  # from Closed: the backend prepares for a reconnect
    host.run(lambda: connected(back.dev, front.dev))
    assert back.dev.connects == 2


def test_close_from_the_backend():
    host = Host()
    back, front = start_pair(host)
    back.dev.close()
    host.run(lambda: front.dev.state == S.Closed)
    assert back.dev.state == S.Closed and front.trace[-1] == "disconnect"


def test_a_frontend_without_an_event_channel_gets_an_error_and_closing():
    host = Host()
    create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    back = Backend(host)
    back.dev.start()
    guest = host.xs.connect(DOMID)  # a broken frontend, by hand
    guest.write(f"{FE}/ring-ref", "8")
    guest.write(f"{FE}/state", str(int(S.Initialised)))
    assert back.dev.state == S.Closing and back.trace == []
    assert "no event-channel" in host.read(f"{BE}/error")
    guest.write(f"{FE}/state", str(int(S.Closing)))
    assert back.dev.state == S.Closed


def test_a_frontend_asking_for_more_than_offered_is_refused():
    host = Host()
    create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    back = Backend(host, persistent=False, max_order=0)
    back.dev.start()
    guest = host.xs.connect(DOMID)
    for k, v in {"ring-ref": 8, "event-channel": 3, "feature-persistent": 1}.items():
        guest.write(f"{FE}/{k}", str(v))
    guest.write(f"{FE}/state", str(int(S.Initialised)))
    assert back.dev.state == S.Closing
    assert "persistent grants, not offered" in host.read(f"{BE}/error")


def test_illegal_transitions_are_refused():
    host = Host()
    back, front = start_pair(host)
    with pytest.raises(XenbusError, match=r"backend /local/domain/0/backend/vbd/3/768: "
                                          r"illegal transition Connected -> Initialising"):
        back.dev.start()
    with pytest.raises(XenbusError, match="illegal transition Connected -> Initialised"):
        front.dev.switch_state(S.Initialised)
    with pytest.raises(XenbusError, match="illegal transition Connected -> Closed"):
        back.dev.switch_state(S.Closed)
    assert host.read(f"{BE}/state") == "4" and back.dev.state == S.Connected  # unchanged

    new = Frontend(host)
    with pytest.raises(XenbusError, match="illegal transition Unknown -> Closing"):
        new.dev.close()
    front.dev.close()  # Closing, until the backend has closed
    with pytest.raises(XenbusError, match="cannot resume while Closing"):
        front.dev.resume()


def test_a_device_that_was_not_created_is_refused():
    host = Host()
    back = Backend(host)
    with pytest.raises(XenbusError, match="no 'frontend' node \\(was the device created\\?\\)"):
        back.dev.start()


def test_client_store_keeps_the_events_after_a_failing_callback():
    host = Host()
    seen = []

    def bad(path: str, token: str) -> None:
        raise RuntimeError("guest bug")

    host.store.watch("a", bad)
    host.store.watch("b", lambda p, t: seen.append(p))
    with pytest.raises(RuntimeError, match="guest bug"):
        host.store.dispatch()
    assert host.store.dispatch() == 1 and seen == ["b"]
    other = []
    store = ClientStore(host.store.client, fallback=lambda p, t: other.append((p, t)))
    host.store.client.watch("c", "mine")
    assert store.dispatch() == 1 and other == [("c", "mine")]


def test_allocate_must_give_one_ref_per_ring_page():
    host = Host()
    create_device(host.dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    Backend(host).dev.start()
    dev = FrontendDevice(host.store, FE, max_ring_page_order=1,
                         allocate=lambda n: RingSetup((1,), 2),
                         connect=lambda n: None, disconnect=lambda: None)
    with pytest.raises(XenbusError, match="1 ring refs for ring-page-order 1"):
        dev.start()
        host.run(lambda: False, rounds=3)


def test_both_ends_on_direct_connections():
    """The same state machines over two in-process connections (callbacks run at once)."""
    xs = Xenstored()
    xs.introduce(DOMID, mfn=1, evtchn=1)
    dom0, guest = xs.connect(0), xs.connect(DOMID)
    create_device(dom0, domid=DOMID, devtype="vbd", devid=DEVID)
    trace: list[str] = []
    front = FrontendDevice(guest, FE, allocate=lambda n: RingSetup((5,), 6),
                           connect=lambda n: trace.append("fe"), disconnect=lambda: None)
    back = BackendDevice(dom0, BE, connect=lambda i: trace.append("be") or None,
                         disconnect=lambda: None)
    front.start()  # first this time: it waits for the backend's InitWait
    assert front.state == S.Initialising
    back.start()
    assert connected(front, back) and trace == ["be", "fe"]

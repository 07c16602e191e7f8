"""xenbus: device states and the frontend/backend handshake, as Xen's split drivers do it.

A PV device is two directories in xenstore that point at each other (libxl's layout):

    /local/domain/<domid>/device/<type>/<devid>           the frontend (guest's)
        backend = /local/domain/0/backend/<type>/<domid>/<devid>, backend-id, state, ...
    /local/domain/0/backend/<type>/<domid>/<devid>        the backend (dom0's)
        frontend = /local/domain/<domid>/device/<type>/<devid>, frontend-id, state, ...

Each end publishes its `state` (XenbusState) and watches the other's. The handshake is
blkif.h's: backend Initialising -> InitWait (features published); frontend reads them,
negotiates, allocates its ring and event channel, publishes ring-ref(s),
event-channel, protocol and its choices -> Initialised; backend reads them, connects
-> Connected; frontend -> Connected. Closing goes Closing -> Closed on both ends. After
a resume the frontend starts again from Initialising with a new ring and channel; the
backend, seeing that, drops the old ring and goes back to InitWait (a backend that was
Closed does the same: Linux's "prepare for reconnect").

The state machines are transport-agnostic: they use a `Store` (read, write, directory,
watch with a callback, unwatch) and callbacks for allocate / connect / disconnect. In
the agent the store is dom0's direct xenstored Connection; in the guest it is a
`ClientStore` over the guest's XsClient, which plays Linux's xenwatch: it dispatches
watch events to callbacks when the guest calls `dispatch()`.

Each end acts on the other end's state as it reads it when its watch fires, not on the
sequence of values (watch events carry no value and may coalesce): every step is taken
from a state that the other end cannot leave without waiting for this one. The backend
connects on the frontend's Initialised only (not on Connected as Linux also does): a
frontend's old Connected, left in xenstore by a migration, must not connect a fresh
backend to a stale ring.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Mapping, Protocol

from pvmig.errors import FailedPrecondition
from pvmig.pv.xenstore import XenstoreError, XsClient

log = logging.getLogger(__name__)

WatchCallback = Callable[[str, str], None]
DEFAULT_PROTOCOL = "x86_64-abi"


class XenbusState(IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


S = XenbusState


class XenbusError(FailedPrecondition):
    """A device asked to make a transition its state machine does not allow."""


class Store(Protocol):
    """What the state machines need of xenstore."""

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, value: bytes | str) -> None: ...

    def directory(self, path: str) -> list[str]: ...

    def watch(self, path: str, callback: WatchCallback) -> str: ...

    def unwatch(self, path: str, token: str) -> None: ...


class ClientStore:
    """A Store over the guest's XsClient: watches with callbacks, dispatched by
    `dispatch()` (call it from the guest's loop after the xenstore channel fires).
    Events for tokens it did not make go to `fallback`."""

    def __init__(self, client: XsClient, *,
                 fallback: WatchCallback | None = None) -> None:
        self.client = client
        self._fallback = fallback
        self._callbacks: dict[str, WatchCallback] = {}
        self._pending: deque[tuple[str, str]] = deque()
        self._next = 1

    def read(self, path: str) -> bytes:
        return self.client.read(path)

    def write(self, path: str, value: bytes | str) -> None:
        self.client.write(path, value)

    def directory(self, path: str) -> list[str]:
        return self.client.directory(path)

    def watch(self, path: str, callback: WatchCallback) -> str:
        token = f"xenbus{self._next}"
        self._next += 1
        self._callbacks[token] = callback
        try:
            self.client.watch(path, token)
        except BaseException:
            del self._callbacks[token]
            raise
        return token

    def unwatch(self, path: str, token: str) -> None:
        self._callbacks.pop(token, None)
        self.client.unwatch(path, token)

    def dispatch(self) -> int:
        """Poll the ring and run the callbacks of the events that came; how many ran.
        If a callback raises, the events after it wait for the next call."""
        self.client.poll()
        n = 0
        while True:
            if not self._pending:
                self._pending.extend(self.client.pop_watch_events())
                if not self._pending:
                    return n
            path, token = self._pending.popleft()
            callback = self._callbacks.get(token, self._fallback)
            if callback is not None:
                n += 1
                callback(path, token)


# ---- paths and device creation (the toolstack's side)


def frontend_path(domid: int, devtype: str, devid: int) -> str:
    return f"/local/domain/{domid}/device/{devtype}/{devid}"


def backend_path(domid: int, devtype: str, devid: int, backend_domid: int = 0) -> str:
    return f"/local/domain/{backend_domid}/backend/{devtype}/{domid}/{devid}"


def read_state(store: Store, path: str) -> XenbusState:
    """The state at `path`/state; Unknown if missing or not a state (Linux's
    xenbus_read_driver_state)."""
    try:
        value = int(store.read(f"{path}/state"))
        return XenbusState(value)
    except (XenstoreError, ValueError):
        return S.Unknown


# ---- the state machines


@dataclass(frozen=True)
class Negotiated:
    """What the frontend chose: the intersection of both ends' offers."""

    persistent: bool
    ring_page_order: int


@dataclass(frozen=True)
class RingSetup:
    """What the frontend's allocate callback returns: the grant refs of its ring pages
    (2**ring_page_order of them; none for a device with other keys, like netif's
    tx-ring-ref) and its event channel; `extra` keys are published too."""

    ring_refs: tuple[int, ...]
    event_channel: int
    extra: Mapping[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True)
class FrontendInfo:
    """What the backend read from the frontend when it Initialised."""

    ring_refs: tuple[int, ...]
    event_channel: int
    protocol: str
    persistent: bool
    ring_page_order: int
    keys: Mapping[str, str]


class _Device:
    _LEGAL: dict[XenbusState, frozenset[XenbusState]] = {}
    _role = "device"

    def __init__(self, store: Store, path: str) -> None:
        self.store = store
        self.path = path.rstrip("/")
        self.state = S.Unknown
        self.other: str | None = None       # the other end's directory
        self._token: str | None = None
        self._watched: str | None = None

    def __repr__(self) -> str:
        return f"<{self._role} {self.path} {self.state.name}>"

    def switch_state(self, new: XenbusState) -> None:
        """Publish a new state; XenbusError if this end may not go there from here."""
        new = XenbusState(new)
        if new not in self._LEGAL.get(self.state, frozenset()):
            raise XenbusError(f"{self._role} {self.path}: illegal transition "
                              f"{self.state.name} -> {new.name}")
        old, self.state = self.state, new  # first: callbacks may run inside the write
        try:
            self.store.write(f"{self.path}/state", str(int(new)))
        except BaseException:
            self.state = old
            raise
        log.debug("%s %s: %s -> %s", self._role, self.path, old.name, new.name)

    def other_state(self) -> XenbusState:
        return read_state(self.store, self.other) if self.other else S.Unknown

    def read_other(self, key: str) -> str:
        assert self.other is not None
        return self.store.read(f"{self.other}/{key}").decode()

    def _watch_other(self, pointer: str) -> None:
        """Find the other end through our `pointer` node and watch its state."""
        try:
            other = self.store.read(f"{self.path}/{pointer}").decode().rstrip("/")
        except XenstoreError as e:
            raise XenbusError(f"{self._role} {self.path}: no '{pointer}' node "
                              f"(was the device created?): {e.err}") from e
        self.other = other
        target = f"{other}/state"
        if self._watched == target:
            return
        self.unwatch()
        # Set first: on a direct connection the watch fires inside store.watch().
        self._watched = target
        try:
            self._token = self.store.watch(target, self._on_watch)
        except BaseException:
            self._watched = None
            raise

    def unwatch(self) -> None:
        """Stop following the other end."""
        if self._token is not None and self._watched is not None:
            token, watched = self._token, self._watched
            self._token = self._watched = None
            try:
                self.store.unwatch(watched, token)
            except XenstoreError as e:
                log.debug("%s %s: unwatch %s: %s", self._role, self.path, watched, e.err)

    def _on_watch(self, path: str, token: str) -> None:
        if path != self._watched:
            return  # a watch since replaced (or a node below `state`)
        self.changed()

    def changed(self) -> None:
        raise NotImplementedError


class BackendDevice(_Device):
    """dom0's end of a device (blkback's and netback's xenbus part).

    `connect(info)` maps the frontend's ring and binds its channel; it may return keys
    to publish before Connected (sectors, info, ...). `disconnect()` undoes it. Both run
    in the watch callback's thread."""

    _role = "backend"
    _LEGAL = {
        S.Unknown: frozenset({S.Initialising}),
        S.Initialising: frozenset({S.InitWait, S.Closing}),
        S.InitWait: frozenset({S.Connected, S.Closing}),
        S.Connected: frozenset({S.InitWait, S.Closing}),  # InitWait: the frontend restarted
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.InitWait}),                # prepare for reconnect
    }

    def __init__(self, store: Store, path: str, *,
                 features: Mapping[str, str | int] = {},
                 connect: Callable[[FrontendInfo], Mapping[str, str | int] | None],
                 disconnect: Callable[[], None]) -> None:
        super().__init__(store, path)
        self.features = dict(features)
        self._connect = connect
        self._disconnect = disconnect
        self.info: FrontendInfo | None = None
        self.connects = 0

    def start(self) -> None:
        """Initialising -> publish features -> InitWait, then follow the frontend."""
        self.switch_state(S.Initialising)
        for key, value in self.features.items():
            self.store.write(f"{self.path}/{key}", str(value))
        self.switch_state(S.InitWait)
        self._watch_other("frontend")

    def close(self) -> None:
        """Close from this end (device removal): Closing -> Closed."""
        self._drop()
        if self.state != S.Closing:
            self.switch_state(S.Closing)
        self.switch_state(S.Closed)

    def detach(self) -> None:
        """Stop following the frontend and drop the connection without publishing
        anything (the source of a migration, once the destination owns the guest)."""
        self.unwatch()
        self._drop()

    def changed(self) -> None:
        fe = self.other_state()
        if fe == S.Initialising:
            if self.state == S.Connected:      # the frontend restarted: resume
                self._drop()
                self.switch_state(S.InitWait)
            elif self.state == S.Closed:       # a new frontend after a close
                self.switch_state(S.InitWait)
        elif fe == S.Initialised:
            if self.state == S.InitWait:
                self._connect_frontend()
        elif fe in (S.Closing, S.Closed, S.Unknown):
            if self.state in (S.Initialising, S.InitWait, S.Connected):
                self._drop()
                self.switch_state(S.Closing)
                self.switch_state(S.Closed)
            elif self.state == S.Closing:
                self.switch_state(S.Closed)

    def _connect_frontend(self) -> None:
        try:
            info = self.read_frontend()
        except (XenstoreError, ValueError) as e:
            self._fatal(f"reading the frontend's {self.other}: {e}")
            return
        try:
            extra = self._connect(info) or {}
        except Exception as e:
            log.exception("backend %s: connect failed", self.path)
            self._fatal(f"connect: {e}")
            return
        self.info = info
        self.connects += 1
        for key, value in extra.items():
            self.store.write(f"{self.path}/{key}", str(value))
        self.switch_state(S.Connected)

    def read_frontend(self) -> FrontendInfo:
        """The frontend's published keys, checked against what this backend offers."""
        assert self.other is not None
        keys = {k: self.read_other(k) for k in self.store.directory(self.other)}
        order = int(keys.get("ring-page-order", "0"))
        max_order = int(self.features.get("max-ring-page-order", 0))
        if not 0 <= order <= max_order:
            raise ValueError(f"ring-page-order {order} is over this backend's {max_order}")
        if order == 0 and "ring-ref" in keys:
            refs: tuple[int, ...] = (int(keys["ring-ref"]),)
        elif order > 0:
            refs = tuple(int(keys[f"ring-ref{i}"]) for i in range(1 << order))
        else:
            refs = ()
        if "event-channel" not in keys:
            raise ValueError("no event-channel")
        persistent = keys.get("feature-persistent", "0") == "1"
        if persistent and str(self.features.get("feature-persistent", 0)) != "1":
            raise ValueError("the frontend asks for persistent grants, not offered")
        return FrontendInfo(refs, int(keys["event-channel"]),
                            keys.get("protocol", DEFAULT_PROTOCOL), persistent, order, keys)

    def _drop(self) -> None:
        if self.info is not None:
            self.info = None
            self._disconnect()

    def _fatal(self, message: str) -> None:
        """Linux's xenbus_dev_fatal: say why in `error`, then close."""
        log.error("backend %s: %s", self.path, message)
        self.store.write(f"{self.path}/error", message[:1000])
        self._drop()
        if S.Closing in self._LEGAL.get(self.state, frozenset()):
            self.switch_state(S.Closing)


class FrontendDevice(_Device):
    """The guest's end of a device (blkfront's and netfront's xenbus part).

    `allocate(negotiated)` makes the ring and binds a channel, returning a RingSetup;
    `connect(negotiated)` starts I/O once the backend is Connected; `disconnect()`
    frees the ring (before a restart after resume, or on close)."""

    _role = "frontend"
    _LEGAL = {
        S.Unknown: frozenset({S.Initialising}),
        S.Initialising: frozenset({S.Initialising, S.Initialised, S.Closing}),
        S.Initialised: frozenset({S.Initialising, S.Connected, S.Closing}),
        S.Connected: frozenset({S.Initialising, S.Closing}),   # Initialising: resume
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.Initialising}),
    }

    def __init__(self, store: Store, path: str, *, persistent: bool = True,
                 max_ring_page_order: int = 0, protocol: str = DEFAULT_PROTOCOL,
                 allocate: Callable[[Negotiated], RingSetup],
                 connect: Callable[[Negotiated], None],
                 disconnect: Callable[[], None]) -> None:
        super().__init__(store, path)
        self.persistent = persistent
        self.max_ring_page_order = max_ring_page_order
        self.protocol = protocol
        self._allocate = allocate
        self._connect = connect
        self._disconnect = disconnect
        self.negotiated: Negotiated | None = None
        self.setup: RingSetup | None = None
        self.connects = 0

    def start(self) -> None:
        """Initialising, then follow the backend (its watch fires at once)."""
        self.switch_state(S.Initialising)
        self._watch_other("backend")

    def resume(self) -> None:
        """After the suspend hypercall returned (or in a fresh process that resumes the
        guest): free the old ring, go back to Initialising and run the handshake again."""
        if self.state in (S.Closing,):
            raise XenbusError(f"frontend {self.path}: cannot resume while {self.state.name}")
        self._drop()
        self.switch_state(S.Initialising)
        self._watch_other("backend")  # the backend's path may differ after a move
        self.changed()

    def close(self) -> None:
        """Ask to close: Closing; Closed follows when the backend has closed."""
        self.switch_state(S.Closing)

    def changed(self) -> None:
        be = self.other_state()
        if be == S.InitWait:
            if self.state == S.Initialising:
                self._publish()
        elif be == S.Connected:
            if self.state == S.Initialised:
                assert self.negotiated is not None
                self._connect(self.negotiated)
                self.connects += 1
                self.switch_state(S.Connected)
        elif be == S.Closing:
            if self.state in (S.Initialised, S.Connected):
                self._drop()
                self.switch_state(S.Closing)
        elif be == S.Closed:
            if self.state in (S.Initialised, S.Connected):
                self._drop()
                self.switch_state(S.Closing)
            if self.state == S.Closing:
                self._drop()
                self.switch_state(S.Closed)

    def negotiate(self) -> Negotiated:
        """The intersection of what both ends offer."""
        be_persistent = self._backend_int("feature-persistent") == 1
        be_order = self._backend_int("max-ring-page-order")
        return Negotiated(self.persistent and be_persistent,
                          max(0, min(self.max_ring_page_order, be_order)))

    def _backend_int(self, key: str) -> int:
        try:
            return int(self.read_other(key))
        except (XenstoreError, ValueError):
            return 0

    def _publish(self) -> None:
        neg = self.negotiate()
        setup = self._allocate(neg)
        if setup.ring_refs and len(setup.ring_refs) != 1 << neg.ring_page_order:
            raise XenbusError(f"frontend {self.path}: {len(setup.ring_refs)} ring refs for "
                              f"ring-page-order {neg.ring_page_order}")
        self.negotiated, self.setup = neg, setup
        w = self.store.write
        if neg.ring_page_order == 0 and setup.ring_refs:
            w(f"{self.path}/ring-ref", str(setup.ring_refs[0]))
        else:
            for i, ref in enumerate(setup.ring_refs):
                w(f"{self.path}/ring-ref{i}", str(ref))
        # Always written, 0 included: a key left from an earlier handshake must not lie.
        w(f"{self.path}/ring-page-order", str(neg.ring_page_order))
        w(f"{self.path}/event-channel", str(setup.event_channel))
        w(f"{self.path}/protocol", self.protocol)
        w(f"{self.path}/feature-persistent", "1" if neg.persistent else "0")
        for key, value in setup.extra.items():
            w(f"{self.path}/{key}", str(value))
        self.switch_state(S.Initialised)  # last: the backend reads the keys on this

    def _drop(self) -> None:
        if self.setup is not None:
            self.setup = None
            self._disconnect()

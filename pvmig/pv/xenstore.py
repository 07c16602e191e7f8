"""The xenstore wire protocol and its ring page, shared by the guest and the host agent.

Xen's layout, byte for byte (xen/include/public/io/xs_wire.h): a message is a 16-byte
header (type, req_id, tx_id, len; u32 little-endian each) and `len` bytes of payload,
NUL-separated strings, at most XENSTORE_PAYLOAD_MAX. Messages travel as a byte stream
through two 1024-byte rings in the guest's "magic" page, so a message may be cut at any
byte and wrap around a ring's end: the `Decoder` reassembles them from whatever chunks
arrive, and `XsRing` moves bytes, never messages.

Both ends use the same `XsRing`: the guest through its physical memory, xenstored (in
the host agent) through a foreign mapping of the same frame. Each end is the producer
of one ring and the consumer of the other. It stores the data, then moves its index
(a consumer that sees the index has the data); it reads the data, then moves its
consumer index (a producer never overwrites bytes not yet read). Those are the barriers
of xs_wire's users; CPython does the stores in program order and x86 keeps that order.

`on_write(offset, length)` is called after every store into the page. The guest passes
its memory API's dirty marking. xenstored passes nothing: its writes into the guest's
magic page (responses, watch events, rsp_prod, req_cons) go through a foreign mapping
that log-dirty never tracks, exactly as in the 2014 thread's era. That is one of the
hazards pvmig studies: a migration can carry a copy of this page that misses what
xenstored wrote last.

`XsClient` is the guest kernel's xenbus_xs: blocking requests matched to replies by
req_id, watch events queued for the caller, and the suspend/resume protocol of Linux's
xenbus (drain before suspend; after resume, drop stale responses and re-register every
watch, since the destination's xenstored knows none of them).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterator

import numpy as np

from pvmig.errors import InvalidArgument

log = logging.getLogger(__name__)

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
XENSTORE_RING_SIZE = 1024
XS_PAGE_SIZE = 4096

HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len

# The ring page (struct xenstore_domain_interface).
REQ_OFFSET = 0
RSP_OFFSET = 1024
REQ_CONS = 2048
REQ_PROD = 2052
RSP_CONS = 2056
RSP_PROD = 2060
SERVER_FEATURES = 2064
CONNECTION = 2068

_U32 = 0xFFFFFFFF


class XsType(IntEnum):
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21


_TYPES = frozenset(int(t) for t in XsType)


class XenstoreError(InvalidArgument):
    """A xenstore failure. `err` is the wire's error string ("ENOENT", "EAGAIN", ...);
    `header` is (type, req_id, tx_id) of a refused message whose bytes were consumed,
    so that a server can answer it and carry on (None when the stream is lost)."""

    def __init__(self, message: str, *, err: str = "EINVAL",
                 header: tuple[int, int, int] | None = None) -> None:
        super().__init__(message)
        self.err = err
        self.header = header


@dataclass(frozen=True, slots=True)
class XsMessage:
    type: XsType
    req_id: int = 0
    tx_id: int = 0
    payload: bytes = b""

    @classmethod
    def of(cls, type: XsType, *args: str | bytes, req_id: int = 0,
           tx_id: int = 0) -> "XsMessage":
        """A message whose payload is `args`, each NUL-terminated."""
        return cls(type, req_id, tx_id, pack_strings(*args))

    def strings(self) -> list[str]:
        """The payload's NUL-terminated strings (a trailing unterminated part is dropped)."""
        return [text(s) for s in self.payload.split(b"\0")[:-1]]


def text(raw: bytes) -> str:
    """Wire bytes as str, losslessly (any byte survives the round trip through `raw`)."""
    return raw.decode("utf-8", "surrogateescape")


def raw(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def pack_strings(*args: str | bytes) -> bytes:
    return b"".join(raw(a) + b"\0" for a in args)


def encode(msg: XsMessage) -> bytes:
    if int(msg.type) not in _TYPES:
        raise XenstoreError(f"xenstore: cannot encode unknown message type {int(msg.type)}")
    if len(msg.payload) > XENSTORE_PAYLOAD_MAX:
        raise XenstoreError(f"xenstore: payload of {len(msg.payload)} bytes exceeds "
                            f"{XENSTORE_PAYLOAD_MAX}", err="E2BIG")
    if not (0 <= msg.req_id <= _U32 and 0 <= msg.tx_id <= _U32):
        raise XenstoreError(f"xenstore: req_id {msg.req_id} or tx_id {msg.tx_id} is not a u32")
    return HEADER.pack(int(msg.type), msg.req_id, msg.tx_id, len(msg.payload)) + msg.payload


class Decoder:
    """Reassembles messages from a byte stream cut anywhere.

    `feed(chunk)` buffers the chunk and returns an iterator over the messages now whole.
    A message of unknown type is consumed, then refused with an XenstoreError whose
    `header` lets the receiver answer it; iterating `feed(b"")` again goes on after it.
    A length over XENSTORE_PAYLOAD_MAX loses the stream: that error repeats forever."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes = b"") -> Iterator[XsMessage]:
        self._buf += data
        return self._drain()

    def _drain(self) -> Iterator[XsMessage]:
        while (msg := self.next()) is not None:
            yield msg

    def next(self) -> XsMessage | None:
        """The next whole message, or None until more bytes arrive."""
        if self._broken:
            raise XenstoreError(self._broken, err="EIO")
        if len(self._buf) < HEADER.size:
            return None
        type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
        if length > XENSTORE_PAYLOAD_MAX:
            self._broken = (f"xenstore: message length {length} exceeds {XENSTORE_PAYLOAD_MAX}"
                            f" (type {type_}, req_id {req_id}): the stream is lost")
            raise XenstoreError(self._broken, err="EIO")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        if type_ not in _TYPES:
            raise XenstoreError(f"xenstore: unknown message type {type_} (req_id {req_id})",
                                header=(type_, req_id, tx_id))
        return XsMessage(XsType(type_), req_id, tx_id, payload)


class XsRing:
    """The two byte rings of a xenstore page; either end of them.

    Guest side: write_request / read_response. Server side: read_request /
    write_response. Indices are free-running u32 byte counts, masked by 1024."""

    def __init__(self, page: np.ndarray, *,
                 on_write: Callable[[int, int], None] | None = None) -> None:
        if page.dtype != np.uint8 or page.shape != (XS_PAGE_SIZE,) or not page.flags.c_contiguous:
            raise InvalidArgument(f"a xenstore ring needs a contiguous page of {XS_PAGE_SIZE} "
                                  f"u8, not {page.dtype} {page.shape}")
        self.page = page
        self._idx = page[REQ_CONS:CONNECTION + 4].view("<u4")
        self._on_write = on_write

    # ---- the guest's side

    def write_request(self, data: bytes) -> int:
        return self._produce(REQ_OFFSET, REQ_CONS, REQ_PROD, data)

    def read_response(self, max_bytes: int = XENSTORE_RING_SIZE) -> bytes:
        return self._consume(RSP_OFFSET, RSP_CONS, RSP_PROD, max_bytes)

    def discard_responses(self) -> int:
        """Drop unread responses (Linux's xb_init_comms after resume); bytes dropped."""
        cons, prod = self._get(RSP_CONS), self._get(RSP_PROD)
        used = (prod - cons) & _U32
        if used:
            self._set(RSP_CONS, prod)
        return used

    # ---- the server's side

    def read_request(self, max_bytes: int = XENSTORE_RING_SIZE) -> bytes:
        return self._consume(REQ_OFFSET, REQ_CONS, REQ_PROD, max_bytes)

    def write_response(self, data: bytes) -> int:
        return self._produce(RSP_OFFSET, RSP_CONS, RSP_PROD, data)

    # ---- state

    def requests_pending(self) -> int:
        return self._used(REQ_CONS, REQ_PROD)

    def responses_pending(self) -> int:
        return self._used(RSP_CONS, RSP_PROD)

    @property
    def server_features(self) -> int:
        return self._get(SERVER_FEATURES)

    @server_features.setter
    def server_features(self, value: int) -> None:
        self._set(SERVER_FEATURES, value)

    @property
    def connection(self) -> int:
        return self._get(CONNECTION)

    @connection.setter
    def connection(self, value: int) -> None:
        self._set(CONNECTION, value)

    # ---- internals

    def _get(self, off: int) -> int:
        return int(self._idx[(off - REQ_CONS) // 4])

    def _set(self, off: int, value: int) -> None:
        self._idx[(off - REQ_CONS) // 4] = value & _U32
        if self._on_write is not None:
            self._on_write(off, 4)

    def _used(self, cons_off: int, prod_off: int) -> int:
        cons, prod = self._get(cons_off), self._get(prod_off)
        used = (prod - cons) & _U32
        if used > XENSTORE_RING_SIZE:
            side = "request" if cons_off == REQ_CONS else "response"
            raise XenstoreError(f"xenstore {side} ring is corrupt: prod {prod} is {used} bytes "
                                f"ahead of cons {cons} (at most {XENSTORE_RING_SIZE})",
                                err="EIO")
        return used

    def _produce(self, base: int, cons_off: int, prod_off: int, data: bytes) -> int:
        prod = self._get(prod_off)
        n = min(len(data), XENSTORE_RING_SIZE - self._used(cons_off, prod_off))
        if n <= 0:
            return 0
        start = prod & (XENSTORE_RING_SIZE - 1)
        first = min(n, XENSTORE_RING_SIZE - start)
        self._store(base + start, data[:first])
        if n > first:  # wraps around the ring's end
            self._store(base, data[first:n])
        # Only now the index: the consumer must never see bytes it covers unwritten.
        self._set(prod_off, prod + n)
        return n

    def _consume(self, base: int, cons_off: int, prod_off: int, max_bytes: int) -> bytes:
        cons = self._get(cons_off)
        n = min(max_bytes, self._used(cons_off, prod_off))
        if n <= 0:
            return b""
        start = cons & (XENSTORE_RING_SIZE - 1)
        first = min(n, XENSTORE_RING_SIZE - start)
        out = self.page[base + start:base + start + first].tobytes()
        if n > first:
            out += self.page[base:base + n - first].tobytes()
        # Copied out before the index moves: the producer may reuse the bytes after it.
        self._set(cons_off, cons + n)
        return out

    def _store(self, off: int, data: bytes) -> None:
        self.page[off:off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        if self._on_write is not None:
            self._on_write(off, len(data))


WatchEvent = tuple[str, str]  # (path, token)


class XsClient:
    """The guest's xenstore client: blocking requests over an XsRing.

    `notify()` kicks the xenstore event channel; `wait(seconds)` blocks until the
    channel fires or the time passes (the guest select()s on its event fd). Each wait
    is bounded by `poll_interval` so a lost notification costs a little latency, never
    a hang; a request without a reply after `timeout` seconds raises ETIMEDOUT."""

    def __init__(self, ring: XsRing, notify: Callable[[], None], *,
                 wait: Callable[[float], None] | None = None, timeout: float = 30.0,
                 poll_interval: float = 0.05) -> None:
        self._ring = ring
        self._notify = notify
        self._wait = wait or time.sleep
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._cond = threading.Condition(threading.RLock())
        self._decoder = Decoder()
        self._out = bytearray()               # requests not yet in the ring
        self._next_req_id = 1
        self._inflight: set[int] = set()
        self._replies: dict[int, XsMessage] = {}
        self._events: deque[WatchEvent] = deque()
        self._watches: dict[tuple[str, str], None] = {}  # registered, in order
        self._open_tx: set[int] = set()
        self._tx_blocked = False              # suspend, phase 1: no new transactions
        self._suspended = False               # suspend, phase 2: no new requests
        self._suspender: int | None = None

    # ---- the operations

    def read(self, path: str, *, tx: int = 0) -> bytes:
        return self._request(XsType.READ, pack_strings(path), tx).payload

    def write(self, path: str, value: bytes | str, *, tx: int = 0) -> None:
        self._request(XsType.WRITE, raw(path) + b"\0" + raw(value), tx)

    def mkdir(self, path: str, *, tx: int = 0) -> None:
        self._request(XsType.MKDIR, pack_strings(path), tx)

    def rm(self, path: str, *, tx: int = 0) -> None:
        self._request(XsType.RM, pack_strings(path), tx)

    def directory(self, path: str, *, tx: int = 0) -> list[str]:
        return self._request(XsType.DIRECTORY, pack_strings(path), tx).strings()

    def get_perms(self, path: str, *, tx: int = 0) -> list[str]:
        """The node's permissions in wire form: ["n3", "r0"] (owner first)."""
        return self._request(XsType.GET_PERMS, pack_strings(path), tx).strings()

    def set_perms(self, path: str, perms: list[str], *, tx: int = 0) -> None:
        self._request(XsType.SET_PERMS, pack_strings(path, *perms), tx)

    def get_domain_path(self, domid: int) -> str:
        return self._request(XsType.GET_DOMAIN_PATH, pack_strings(str(domid)), 0).strings()[0]

    def watch(self, path: str, token: str) -> None:
        self._request(XsType.WATCH, pack_strings(path, token), 0)
        with self._cond:
            self._watches[(path, token)] = None

    def unwatch(self, path: str, token: str) -> None:
        with self._cond:
            self._watches.pop((path, token), None)
        self._request(XsType.UNWATCH, pack_strings(path, token), 0)

    def transaction_start(self) -> int:
        reply = self._request(XsType.TRANSACTION_START, b"\0", 0)
        tx = int(reply.strings()[0])
        with self._cond:
            self._open_tx.add(tx)
        return tx

    def transaction_end(self, tx: int, commit: bool) -> None:
        """Commit (raises EAGAIN on a conflict: start again) or abort."""
        try:
            self._request(XsType.TRANSACTION_END, pack_strings("T" if commit else "F"), tx)
        finally:
            with self._cond:
                self._open_tx.discard(tx)
                self._cond.notify_all()

    def pop_watch_events(self) -> list[WatchEvent]:
        with self._cond:
            events = list(self._events)
            self._events.clear()
            return events

    @property
    def watches(self) -> list[tuple[str, str]]:
        with self._cond:
            return list(self._watches)

    def poll(self) -> bool:
        """Move bytes both ways and sort what arrived; call when the xenstore event
        channel fires, or now and then. Whether anything moved."""
        with self._cond:
            return self._pump()

    # ---- suspend / resume (Linux's xs_suspend and xs_resume)

    def suspend(self, timeout: float | None = None) -> None:
        """Wait until no transaction is open and no request in flight, and block new
        ones (requests inside an open transaction may still finish it)."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        with self._cond:
            self._tx_blocked = True
            self._suspender = threading.get_ident()
            try:
                self._drain_until(lambda: not self._open_tx, deadline, "transactions")
                self._suspended = True
                self._drain_until(lambda: not self._inflight, deadline, "requests")
            except BaseException:
                self._tx_blocked = self._suspended = False
                self._suspender = None
                self._cond.notify_all()
                raise

    def resume(self) -> None:
        """After the suspend hypercall returns: drop the responses left in the ring and
        any half-read message, let requests through again, and register every watch
        again (each fires once, so the caller re-reads what it watches)."""
        with self._cond:
            self._tx_blocked = self._suspended = False
            self._suspender = None
            self._decoder = Decoder()
            self._replies.clear()
            dropped = self._ring.discard_responses()
            if dropped:
                log.debug("xenstore resume: dropped %d bytes of stale responses", dropped)
                self._notify()
            watches = list(self._watches)
            self._cond.notify_all()
        for path, token in watches:
            try:
                self._request(XsType.WATCH, pack_strings(path, token), 0)
            except XenstoreError as e:
                if e.err != "EEXIST":
                    raise
                # Still registered (the suspend was cancelled): register it afresh so
                # that it fires, as the caller expects after a resume.
                self._request(XsType.UNWATCH, pack_strings(path, token), 0)
                self._request(XsType.WATCH, pack_strings(path, token), 0)

    # ---- internals

    def _drain_until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise XenstoreError(f"xenstore suspend: {what} still in flight after the "
                                    f"timeout", err="EBUSY")
            self._cond.wait(min(remaining, self._poll_interval))

    def _request(self, type_: XsType, payload: bytes, tx: int) -> XsMessage:
        with self._cond:
            if self._blocked(type_):
                if self._suspender == threading.get_ident():
                    raise XenstoreError(f"xenstore {type_.name}: requests are blocked while "
                                        f"suspended", err="EBUSY")
                if not self._cond.wait_for(lambda: not self._blocked(type_), self._timeout):
                    raise XenstoreError(f"xenstore {type_.name}: still suspended after "
                                        f"{self._timeout} s", err="EBUSY")
            req_id = self._next_req_id
            self._next_req_id = (req_id + 1) & _U32 or 1
            data = encode(XsMessage(type_, req_id, tx, payload))
            self._inflight.add(req_id)
            self._out += data
            try:
                self._pump()
            except BaseException:
                self._inflight.discard(req_id)
                raise
        try:
            reply = self.wait_for(req_id)
        finally:
            with self._cond:
                self._inflight.discard(req_id)
                self._replies.pop(req_id, None)
                self._cond.notify_all()
        if reply.type == XsType.ERROR:
            err = reply.strings()[0] if reply.payload.endswith(b"\0") else text(reply.payload)
            raise XenstoreError(f"xenstore {type_.name} {_describe(payload)}: {err}", err=err)
        if reply.type != type_:
            raise XenstoreError(f"xenstore {type_.name}: the reply is a {reply.type.name}",
                                err="EIO")
        return reply

    def _blocked(self, type_: XsType) -> bool:
        return self._suspended or (self._tx_blocked and type_ == XsType.TRANSACTION_START)

    def wait_for(self, req_id: int) -> XsMessage:
        """The reply to `req_id`, pumping the ring until it comes or the timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            with self._cond:
                self._pump()
                reply = self._replies.pop(req_id, None)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise XenstoreError(f"xenstore: no reply to request {req_id} after "
                                    f"{self._timeout} s", err="ETIMEDOUT")
            self._wait(min(remaining, self._poll_interval))

    def _pump(self) -> bool:
        moved = False
        if self._out:
            n = self._ring.write_request(bytes(self._out))
            del self._out[:n]
            moved = n > 0
        while data := self._ring.read_response():
            moved = True
            for msg in self._decoder.feed(data):
                self._sort(msg)
        if moved:
            self._notify()
        return moved

    def _sort(self, msg: XsMessage) -> None:
        if msg.type == XsType.WATCH_EVENT:
            parts = msg.strings()
            if len(parts) >= 2:
                self._events.append((parts[0], parts[1]))
            else:
                log.warning("xenstore: dropped a malformed watch event %r", msg.payload)
        elif msg.req_id in self._inflight:
            self._replies[msg.req_id] = msg
        else:
            log.debug("xenstore: dropped a reply to request %d, which nobody waits for",
                      msg.req_id)


def _describe(payload: bytes) -> str:
    first = payload.split(b"\0", 1)[0]
    return text(first[:200])

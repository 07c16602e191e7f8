"""xenstored's end of a guest's ring: `RingServer` moves whole requests from the ring in the
guest's magic page to its connection, and the replies and events back."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pvmig.dom0.xenstored.connection import Connection
from pvmig.pv.xenstore import Decoder, XenstoreError, XsMessage, XsRing, XsType, encode

log = logging.getLogger("pvmig.dom0.xenstored")  # the daemon's one logger, as before the split

OUTBOX_LIMIT = 16 * 1024    # bytes of replies a RingServer holds before it stops reading


class RingServer:
    """xenstored's end of one guest's ring: whole requests in, replies and events out.

    The agent calls `pump()` when the guest's xenstore channel fires and when
    `conn.on_event` says events are waiting. Output that does not fit waits in an
    outbox; while the outbox holds more than OUTBOX_LIMIT bytes no request is read
    (a guest that does not read its replies stops being served, not the daemon).
    A stream that cannot be resynchronised (a length over 4096) stops this server:
    `broken` says why. The ring is written through xenstored's foreign mapping:
    nothing here marks the page dirty."""

    def __init__(self, conn: Connection, ring: XsRing, notify: Callable[[], None]) -> None:
        self.conn = conn
        self.ring = ring
        self._notify = notify
        self._decoder = Decoder()
        self._out = bytearray()
        self._lock = threading.Lock()
        self.broken: str | None = None
        self.requests = 0

    def pump(self) -> bool:
        """Serve what the ring holds; whether the guest was notified."""
        with self._lock:
            if self.broken or self.conn.closed:
                return False
            moved = False
            try:
                while True:
                    moved |= self._flush()
                    if len(self._out) >= OUTBOX_LIMIT:
                        break
                    data = self.ring.read_request()
                    if not data:
                        break
                    moved = True
                    self._serve(data)
                    if self.broken:
                        break
                if len(self._out) < OUTBOX_LIMIT:
                    for ev in self.conn.take_events():
                        self._out += encode(ev)
                moved |= self._flush()
            except XenstoreError as e:  # the guest corrupted its ring indices
                self.broken = str(e)
                log.error("xenstore: domain %d: %s; its ring is no longer served",
                          self.conn.domid, e)
            if moved:
                self._notify()
            return moved

    def _serve(self, data: bytes) -> None:
        while True:
            try:
                for msg in self._decoder.feed(data):
                    self.requests += 1
                    for out in self.conn.handle(msg):
                        self._out += encode(out)
                return
            except XenstoreError as e:
                data = b""
                if e.header is None:
                    self.broken = str(e)
                    log.error("xenstore: domain %d: %s; its ring is no longer served",
                              self.conn.domid, e)
                    return
                _, req_id, tx_id = e.header
                self._out += encode(XsMessage.of(XsType.ERROR, "EINVAL", req_id=req_id,
                                                 tx_id=tx_id))

    def _flush(self) -> bool:
        if not self._out:
            return False
        n = self.ring.write_response(bytes(self._out))
        del self._out[:n]
        return n > 0

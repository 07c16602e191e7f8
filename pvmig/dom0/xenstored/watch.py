"""Watches (tools/xenstored/watch.c): registered by a connection, fired by the changes at or
below their path (and by the special @introduceDomain and @releaseDomain), delivered to the
connection's queue of events for its ring, or to a dom0 user's callback run outside the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from pvmig.dom0.xenstored.store import _Change, _fail, _under
from pvmig.dom0.xenstored.transaction import Transactions, TxClient
from pvmig.pv.xenstore import XsMessage, XsType

log = logging.getLogger("pvmig.dom0.xenstored")  # the daemon's one logger, as before the split

MAX_WATCHES = 128           # per guest connection (E2BIG beyond); dom0 has no quota
MAX_QUEUED_EVENTS = 1024    # watch events waiting for a slow ring (later ones dropped)

SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")

WatchCallback = Callable[[str, str], None]    # (path, token)


@dataclass(slots=True)
class _Watch:
    path: str                  # as registered (relative, absolute or special)
    abspath: str
    token: str
    callback: WatchCallback | None


class Peer(TxClient, Protocol):
    """A connection (connection.py's `Connection`) as the daemon's layers see it. The daemon's
    list of them lives here, where a change is matched against every connection's watches;
    `closed` is domain.py's to set."""

    home: str
    closed: bool
    on_event: Callable[[], None] | None
    _watches: dict[tuple[str, str], _Watch]
    _events: deque[XsMessage]

    def _canon(self, path: str, *, watch: bool = False) -> str: ...


class Watches(Transactions):
    """The store with watches: the connections', and the callbacks they queue."""

    def __init__(self) -> None:
        super().__init__()
        self._conns: list[Peer] = []
        self._next_token = 1
        self._callbacks: deque[tuple[WatchCallback, str, str]] = deque()
        self._dispatching = threading.Lock()
        self.dropped_events = 0

    # ---- watches

    def _watch(self, conn: Peer, path: str, token: str,
               callback: WatchCallback | None) -> None:
        abspath = conn._canon(path, watch=True)
        if (abspath, token) in conn._watches:
            raise _fail("EEXIST", f"watch {path} {token}")
        if len(conn._watches) >= MAX_WATCHES and conn.domid != 0:
            raise _fail("E2BIG", f"more than {MAX_WATCHES} watches")
        w = _Watch(path, abspath, token, callback)
        conn._watches[(abspath, token)] = w
        self._deliver(conn, w, abspath)  # fires once at once

    def _unwatch(self, conn: Peer, path: str, token: str) -> None:
        abspath = conn._canon(path, watch=True)
        if conn._watches.pop((abspath, token), None) is None:
            raise _fail("ENOENT", f"watch {path} {token}")

    def _fire(self, change: _Change) -> None:
        removed = dict(change.removed)
        for conn in self._conns:
            for w in conn._watches.values():
                if w.abspath.startswith("@"):
                    continue
                if _under(change.path, w.abspath):
                    path, perms = change.path, change.perms
                elif change.removed and _under(w.abspath, change.path):
                    path, perms = w.abspath, removed.get(w.abspath, change.perms)
                else:
                    continue
                if self._may(conn, perms, "r"):
                    self._deliver(conn, w, path)

    def _fire_special(self, name: str) -> None:
        for conn in self._conns:
            if conn.domid != 0:
                continue
            for w in conn._watches.values():
                if w.abspath == name:
                    self._deliver(conn, w, name)

    def _deliver(self, conn: Peer, w: _Watch, path: str) -> None:
        if w.path != w.abspath and path.startswith(conn.home + "/"):
            path = path[len(conn.home) + 1:]  # a relative watch hears relative paths
        if w.callback is not None:
            self._callbacks.append((w.callback, path, w.token))
            return
        if len(conn._events) >= MAX_QUEUED_EVENTS:
            self.dropped_events += 1
            log.warning("xenstore: domain %d is not reading its ring; dropped a watch "
                        "event for %s", conn.domid, path)
            return
        conn._events.append(XsMessage.of(XsType.WATCH_EVENT, path, w.token))
        if conn.on_event is not None:
            conn.on_event()

    def _dispatch(self) -> None:
        """Run queued watch callbacks, outside the lock, one at a time, in order."""
        while self._callbacks:
            if not self._dispatching.acquire(blocking=False):
                return  # another thread (or an outer frame of this one) is running them
            try:
                while True:
                    try:
                        callback, path, token = self._callbacks.popleft()
                    except IndexError:
                        break
                    try:
                        callback(path, token)
                    except Exception:
                        log.exception("xenstore watch callback for %s (token %s) failed",
                                      path, token)
            finally:
                self._dispatching.release()

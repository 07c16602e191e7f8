"""xenstored: the host's tree of small strings, with permissions, watches and transactions.

The daemon's logic only, with no transport of its own: the host agent drives it. Each
domain talks to it through a `Connection`: a guest's connection is fed whole messages by
a `RingServer` pumping the ring in the guest's magic page; dom0's in-process users (the
toolstack, blkback, netback) call the same connection's Python methods directly and get
watch events as callbacks. Semantics follow C xenstored (tools/xenstored/core.c):

- Nodes: path -> value, permissions, children. Permissions are a list of (domid, perm),
  perm one of 'n' (none) 'r' 'w' 'b' (both); the first entry names the owner and gives
  everyone else's access; later entries grant particular domains. The owner and dom0
  may do anything. Access is checked on the node itself only, never on its parents,
  except that creating a node needs write access to its nearest existing ancestor. New
  nodes, and the parents created with them, inherit that ancestor's permissions, and an
  unprivileged domain owns what it creates.
- Paths: absolute, or relative to the connection's home /local/domain/<domid>. A name
  is made of [A-Za-z0-9-_@/], without "//" or a trailing "/". Watches may also name the
  special events "@introduceDomain" and "@releaseDomain" (sent to dom0 only).
- Watches fire once at registration, then for every change (write, mkdir, rm,
  set_perms) at or below their path, and an rm also fires the watches below the removed
  node. A connection receives an event only if it may read the changed node. Events of
  a relative watch carry relative paths.
- Transactions see a snapshot of the tree taken at their start, plus their own
  changes. The commit fails with EAGAIN if any node the transaction read or wrote
  (including nodes it found missing) changed since the start; otherwise its changes
  land at once and their watches fire then. Creating or removing a node changes its
  parent's list of children, so two transactions adding siblings conflict (as in C).
- Errors travel as strings ("ENOENT", "EACCES", "EINVAL", ...). A malformed request is
  answered with ERROR and the daemon goes on; a handler never raises.

Why snapshots are copies of a dict of immutable nodes: a transaction's start is one
shallow dict copy (a few thousand pointers at most here), a commit compares node
identities, and no node is ever modified in place, so the live tree and every snapshot
share whatever did not change.

Callbacks run outside the daemon's lock, in the thread that made the change, before the
call that made it returns, one at a time and in order; a change made inside a callback
queues its callbacks, which run after that callback returns, never nested in it. `Connection.on_event` runs under the
lock: it may only wake the thread that pumps that connection's ring.

`RingServer` writes responses and events into the guest's magic page without marking
it dirty: the foreign mapping xenstored uses is never tracked by log-dirty.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, TypeVar

from pvmig.pv.xenstore import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    Decoder,
    XenstoreError,
    XsMessage,
    XsRing,
    XsType,
    encode,
    pack_strings,
    raw,
    text,
)

log = logging.getLogger(__name__)

DOMID_FIRST_RESERVED = 0x7FF0
MAX_WATCHES = 128           # per guest connection (E2BIG beyond); dom0 has no quota
MAX_TRANSACTIONS = 10       # open at once per guest connection (ENOSPC beyond)
MAX_QUEUED_EVENTS = 1024    # watch events waiting for a slow ring (later ones dropped)
OUTBOX_LIMIT = 16 * 1024    # bytes of replies a RingServer holds before it stops reading

SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")
_VALID = re.compile(r"[A-Za-z0-9_@/-]+")
_PERM_CHARS = "nrwb"

Perm = tuple[int, str]                        # (domid, 'n' | 'r' | 'w' | 'b')
WatchCallback = Callable[[str, str], None]    # (path, token)
T = TypeVar("T")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


@dataclass(frozen=True, slots=True)
class _Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Change:
    """A change to fire watches for; `removed` lists the nodes an rm took away."""

    path: str
    perms: tuple[Perm, ...]
    removed: tuple[tuple[str, tuple[Perm, ...]], ...] = ()


@dataclass(slots=True)
class _Watch:
    path: str                  # as registered (relative, absolute or special)
    abspath: str
    token: str
    callback: WatchCallback | None


@dataclass(slots=True)
class _Transaction:
    id: int
    conn: "Connection"
    nodes: dict[str, _Node]
    accessed: dict[str, _Node | None]        # path -> the node as first seen (None: absent)
    written: dict[str, None]                 # paths changed, in order
    changes: list[_Change]


@dataclass(slots=True)
class _Domain:
    domid: int
    mfn: int
    evtchn: int
    shutdown: bool = False
    target: int | None = None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _fail(err: str, what: str) -> XenstoreError:
    return XenstoreError(f"{err}: {what}", err=err)


def format_perms(perms: Iterable[Perm]) -> list[str]:
    """Wire form: [(3, 'n'), (0, 'r')] -> ["n3", "r0"]."""
    return [f"{p}{d}" for d, p in perms]


def parse_perms(items: Iterable[str]) -> tuple[Perm, ...]:
    out = []
    for item in items:
        if len(item) < 2 or item[0] not in _PERM_CHARS or not item[1:].isdigit():
            raise _fail("EINVAL", f"bad permission {item!r}")
        domid = int(item[1:])
        if domid >= DOMID_FIRST_RESERVED:
            raise _fail("EINVAL", f"bad domain in permission {item!r}")
        out.append((domid, item[0]))
    if not out:
        raise _fail("EINVAL", "no permissions")
    return tuple(out)


class Xenstored:
    """One host's xenstore daemon."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        root_perms: tuple[Perm, ...] = ((0, "n"),)
        self._nodes: dict[str, _Node] = {
            "/": _Node(b"", root_perms, ("local",)),
            "/local": _Node(b"", root_perms, ("domain",)),
            "/local/domain": _Node(b"", root_perms, ("0",)),
            "/local/domain/0": _Node(b"", root_perms),
        }
        self._domains: dict[int, _Domain] = {}
        self._conns: list[Connection] = []
        self._txs: dict[int, _Transaction] = {}
        self._next_tx = 1
        self._next_token = 1
        self._callbacks: deque[tuple[WatchCallback, str, str]] = deque()
        self._dispatching = threading.Lock()
        self.dropped_events = 0

    # ---- domains (the toolstack's calls; also reachable as messages from dom0)

    def connect(self, domid: int) -> "Connection":
        """A new connection acting as `domid` (dom0: the toolstack or a backend; any
        other domain must have been introduced)."""
        with self._lock:
            if domid != 0 and domid not in self._domains:
                raise _fail("ENOENT", f"domain {domid} is not introduced to xenstored")
            conn = Connection(self, domid)
            self._conns.append(conn)
            return conn

    def introduce(self, domid: int, mfn: int, evtchn: int) -> None:
        with self._lock:
            self._introduce(domid, mfn, evtchn)
        self._dispatch()

    def release(self, domid: int) -> None:
        """Forget a domain: its connections close, with their watches and transactions.
        Its nodes stay: removing them is the toolstack's job, as in Xen."""
        with self._lock:
            self._release(domid)
        self._dispatch()

    def domain_shutdown(self, domid: int) -> None:
        """The hypervisor reports the domain shut down (or suspended): @releaseDomain
        fires once, until RESUME re-arms it."""
        with self._lock:
            dom = self._domains.get(domid)
            if dom is None:
                raise _fail("ENOENT", f"domain {domid} is not introduced")
            if not dom.shutdown:
                dom.shutdown = True
                self._fire_special("@releaseDomain")
        self._dispatch()

    def resume(self, domid: int) -> None:
        with self._lock:
            self._resume(domid)

    def is_introduced(self, domid: int) -> bool:
        with self._lock:
            return domid == 0 or domid in self._domains

    # ---- the guest's own entries, carried with the device state

    def dump(self, domid: int, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The subtree /local/domain/<domid> as msgpack-able data, parents first;
        `exclude` names subtrees (relative to the home) to leave out."""
        home = domain_path(domid)
        skip = [f"{home}/{e.strip('/')}" for e in exclude]
        with self._lock:
            if home not in self._nodes:
                raise _fail("ENOENT", home)
            nodes = []
            stack = [home]
            while stack:
                path = stack.pop()
                if any(_under(path, s) for s in skip):
                    continue
                node = self._nodes[path]
                rel = path[len(home) + 1:]
                nodes.append([rel, node.value, [[d, p] for d, p in node.perms]])
                stack.extend(f"{path}/{c}" for c in reversed(node.children))
        return {"domid": domid, "nodes": nodes}

    def load(self, domid: int, data: dict[str, Any]) -> None:
        """Replace /local/domain/<domid> by a `dump` (perhaps of another domid:
        permissions naming the old domid are given to the new one; values are kept as
        they are). Watches fire as for any change."""
        home = domain_path(domid)
        entries = []
        try:
            old = int(data["domid"])
            for rel, value, perms in data["nodes"]:
                path = f"{home}/{rel}" if rel else home
                _check_path(path)
                p = parse_perms(f"{perm}{domid if int(d) == old else int(d)}"
                                for d, perm in perms)
                entries.append((path, bytes(value), p))
        except (KeyError, TypeError, ValueError) as e:
            raise _fail("EINVAL", f"not a xenstore dump: {e!r}") from e
        if not entries or entries[0][0] != home:
            raise _fail("EINVAL", "a xenstore dump must start with the domain's home")
        dom0 = self._root_conn()
        with self._lock:
            if home in self._nodes:
                self._rm(dom0, None, home)
            for path, value, perms in entries:
                self._write(dom0, None, path, value)
                self._set_perms(dom0, None, path, perms)
        self._dispatch()

    # ---- operations (callers hold the lock)

    def _view(self, tx: _Transaction | None) -> dict[str, _Node]:
        return tx.nodes if tx is not None else self._nodes

    def _get(self, tx: _Transaction | None, path: str) -> _Node | None:
        nodes = self._view(tx)
        node = nodes.get(path)
        if tx is not None and path not in tx.accessed:
            tx.accessed[path] = node
        return node

    def _put(self, tx: _Transaction | None, path: str, node: _Node | None) -> None:
        self._get(tx, path)  # a write is an access too
        nodes = self._view(tx)
        if node is None:
            nodes.pop(path, None)
        else:
            nodes[path] = node
        if tx is not None:
            tx.written[path] = None

    def _changed(self, tx: _Transaction | None, change: _Change) -> None:
        if tx is not None:
            tx.changes.append(change)
        else:
            self._fire(change)

    def _perm(self, conn: Connection, perms: tuple[Perm, ...]) -> str:
        owner = perms[0][0]
        if conn.domid == 0 or owner == conn.domid or (conn.target is not None
                                                      and owner == conn.target):
            return "b"
        for domid, perm in perms[1:]:
            if domid == conn.domid:
                return perm
        return perms[0][1]

    def _may(self, conn: Connection, perms: tuple[Perm, ...], need: str) -> bool:
        have = self._perm(conn, perms)
        return have == "b" or have == need

    def _node(self, conn: Connection, tx: _Transaction | None, path: str, need: str) -> _Node:
        node = self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path, need)
        if not self._may(conn, node.perms, need):
            raise _fail("EACCES", path)
        return node

    def _missing(self, conn: Connection, tx: _Transaction | None, path: str,
                 need: str) -> XenstoreError:
        """ENOENT, or EACCES if the nearest existing ancestor would not let `conn` see."""
        nodes = self._view(tx)
        anc = _parent(path)
        while anc not in nodes:
            anc = _parent(anc)
        return _fail("ENOENT" if self._may(conn, nodes[anc].perms, need) else "EACCES", path)

    def _read(self, conn: Connection, tx: _Transaction | None, path: str) -> bytes:
        return self._node(conn, tx, path, "r").value

    def _directory(self, conn: Connection, tx: _Transaction | None, path: str) -> list[str]:
        return list(self._node(conn, tx, path, "r").children)

    def _get_perms(self, conn: Connection, tx: _Transaction | None,
                   path: str) -> tuple[Perm, ...]:
        return self._node(conn, tx, path, "r").perms

    def _write(self, conn: Connection, tx: _Transaction | None, path: str,
               value: bytes) -> None:
        node = self._get(tx, path)
        if node is None:
            self._create(conn, tx, path, value)
            return
        if not self._may(conn, node.perms, "w"):
            raise _fail("EACCES", path)
        new = replace(node, value=value)
        self._put(tx, path, new)
        self._changed(tx, _Change(path, new.perms))

    def _mkdir(self, conn: Connection, tx: _Transaction | None, path: str) -> None:
        node = self._get(tx, path)
        if node is None:
            self._create(conn, tx, path, b"")
        elif not self._may(conn, node.perms, "w"):
            raise _fail("EACCES", path)

    def _create(self, conn: Connection, tx: _Transaction | None, path: str,
                value: bytes) -> None:
        if path == "/":
            raise _fail("EINVAL", "cannot create /")
        nodes = self._view(tx)
        missing = [path]
        anc = _parent(path)
        while anc not in nodes:
            missing.append(anc)
            anc = _parent(anc)
        top = self._get(tx, anc)
        assert top is not None
        if not self._may(conn, top.perms, "w"):
            raise _fail("EACCES", path)
        perms = top.perms
        if conn.domid != 0:  # unprivileged domains own what they create
            perms = ((conn.domid, perms[0][1]),) + perms[1:]
        for p in reversed(missing):
            parent = self._get(tx, _parent(p))
            assert parent is not None
            name = p.rsplit("/", 1)[1]
            self._put(tx, _parent(p), replace(parent, children=parent.children + (name,)))
            self._put(tx, p, _Node(value if p == path else b"", perms))
        self._changed(tx, _Change(path, perms))

    def _rm(self, conn: Connection, tx: _Transaction | None, path: str) -> None:
        if path == "/":
            raise _fail("EINVAL", "cannot remove /")
        node = self._get(tx, path)
        if node is None:
            err = self._missing(conn, tx, path, "w")
            if err.err == "ENOENT" and self._get(tx, _parent(path)) is not None:
                return  # already gone: fine, if its parent exists (as C xenstored)
            raise err
        if not self._may(conn, node.perms, "w"):
            raise _fail("EACCES", path)
        nodes = self._view(tx)
        removed = []
        stack = [path]
        while stack:
            p = stack.pop()
            n = nodes[p]
            removed.append((p, n.perms))
            stack.extend(f"{p}/{c}" for c in n.children)
            self._put(tx, p, None)
        parent = self._get(tx, _parent(path))
        assert parent is not None
        name = path.rsplit("/", 1)[1]
        self._put(tx, _parent(path),
                  replace(parent, children=tuple(c for c in parent.children if c != name)))
        self._changed(tx, _Change(path, node.perms, tuple(removed[1:])))

    def _set_perms(self, conn: Connection, tx: _Transaction | None, path: str,
                   perms: tuple[Perm, ...]) -> None:
        node = self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path, "w")
        owner = node.perms[0][0]
        if conn.domid != 0:
            if owner != conn.domid and owner != conn.target:
                raise _fail("EACCES", f"{path}: only its owner may set permissions")
            if perms[0][0] != owner:
                raise _fail("EACCES", f"{path}: only dom0 may give a node away")
        new = replace(node, perms=perms)
        self._put(tx, path, new)
        self._changed(tx, _Change(path, perms))

    # ---- watches

    def _watch(self, conn: Connection, path: str, token: str,
               callback: WatchCallback | None) -> None:
        abspath = conn._canon(path, watch=True)
        if (abspath, token) in conn._watches:
            raise _fail("EEXIST", f"watch {path} {token}")
        if len(conn._watches) >= MAX_WATCHES and conn.domid != 0:
            raise _fail("E2BIG", f"more than {MAX_WATCHES} watches")
        w = _Watch(path, abspath, token, callback)
        conn._watches[(abspath, token)] = w
        self._deliver(conn, w, abspath)  # fires once at once

    def _unwatch(self, conn: Connection, path: str, token: str) -> None:
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

    def _deliver(self, conn: Connection, w: _Watch, path: str) -> None:
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

    # ---- transactions

    def _tx_start(self, conn: Connection) -> _Transaction:
        if len(conn._txs) >= MAX_TRANSACTIONS and conn.domid != 0:
            raise _fail("ENOSPC", f"more than {MAX_TRANSACTIONS} open transactions")
        while self._next_tx in self._txs or self._next_tx == 0:
            self._next_tx = (self._next_tx + 1) & 0xFFFFFFFF
        tx = _Transaction(self._next_tx, conn, dict(self._nodes), {}, {}, [])
        self._next_tx = (self._next_tx + 1) & 0xFFFFFFFF
        self._txs[tx.id] = tx
        conn._txs[tx.id] = tx
        return tx

    def _tx_lookup(self, conn: Connection, tx_id: int) -> _Transaction | None:
        if tx_id == 0:
            return None
        tx = conn._txs.get(tx_id)
        if tx is None:
            raise _fail("ENOENT", f"no transaction {tx_id}")
        return tx

    def _tx_end(self, conn: Connection, tx: _Transaction, commit: bool) -> None:
        self._txs.pop(tx.id, None)
        conn._txs.pop(tx.id, None)
        if not commit:
            return
        for path, seen in tx.accessed.items():
            if self._nodes.get(path) is not seen:
                raise _fail("EAGAIN", f"transaction {tx.id}: {path} changed")
        for path in tx.written:
            node = tx.nodes.get(path)
            if node is None:
                self._nodes.pop(path, None)
            else:
                self._nodes[path] = node
        for change in tx.changes:
            self._fire(change)

    # ---- domains

    def _introduce(self, domid: int, mfn: int, evtchn: int) -> None:
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise _fail("EINVAL", f"cannot introduce domain {domid}")
        dom = self._domains.get(domid)
        if dom is not None:
            if dom.mfn != mfn:
                raise _fail("EINVAL", f"domain {domid} is already introduced with frame "
                                      f"{dom.mfn}")
            dom.evtchn = evtchn  # a reconnection: the ring stays, the channel is new
            return
        self._domains[domid] = _Domain(domid, mfn, evtchn)
        home = domain_path(domid)
        if home not in self._nodes:
            root = self._root_conn()
            self._create(root, None, home, b"")
            self._set_perms(root, None, home, ((domid, "n"),))
        self._fire_special("@introduceDomain")

    def _release(self, domid: int) -> None:
        if domid not in self._domains:
            raise _fail("ENOENT", f"domain {domid} is not introduced")
        del self._domains[domid]
        for conn in [c for c in self._conns if c.domid == domid]:
            self._close(conn)
        self._fire_special("@releaseDomain")

    def _resume(self, domid: int) -> None:
        dom = self._domains.get(domid)
        if dom is None:
            raise _fail("ENOENT", f"domain {domid} is not introduced")
        dom.shutdown = False

    def _set_target(self, domid: int, target: int) -> None:
        dom = self._domains.get(domid)
        if dom is None or target not in self._domains:
            raise _fail("ENOENT", f"domain {domid} or {target} is not introduced")
        dom.target = target

    def _reset(self, conn: Connection) -> None:
        conn._watches.clear()
        for tx_id in conn._txs:
            self._txs.pop(tx_id, None)
        conn._txs.clear()

    def _close(self, conn: Connection) -> None:
        self._reset(conn)
        conn._events.clear()
        conn.closed = True
        if conn in self._conns:
            self._conns.remove(conn)

    def _root_conn(self) -> "Connection":
        return Connection(self, 0)  # privileged, not registered: no watches of its own

    def _target_of(self, domid: int) -> int | None:
        dom = self._domains.get(domid)
        return dom.target if dom is not None else None


def _check_path(path: str, *, relative: bool = False) -> None:
    limit = XENSTORE_REL_PATH_MAX if relative else XENSTORE_ABS_PATH_MAX
    if (not path or len(path) > limit or not _VALID.fullmatch(path) or "//" in path
            or (path.endswith("/") and path != "/")):
        raise _fail("EINVAL", f"bad path {path[:100]!r}")


class Connection:
    """One client of xenstored: a domain's ring, or a dom0 user in the agent.

    Ring connections: `handle(msg)` answers one request; `take_events()` returns the
    watch events queued since. Direct use (dom0): the methods below, raising
    XenstoreError; watches call back `callback(path, token)`."""

    def __init__(self, xs: Xenstored, domid: int) -> None:
        self._xs = xs
        self.domid = domid
        self.home = domain_path(domid)
        self.closed = False
        self.on_event: Callable[[], None] | None = None
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._txs: dict[int, _Transaction] = {}
        self._events: deque[XsMessage] = deque()

    def __repr__(self) -> str:
        return f"<xenstore connection of domain {self.domid}{' (closed)' if self.closed else ''}>"

    @property
    def target(self) -> int | None:
        return self._xs._target_of(self.domid)

    # ---- the wire

    def handle(self, msg: XsMessage) -> list[XsMessage]:
        """The reply to one request, then the watch events queued for this connection.
        Never raises: whatever goes wrong is an ERROR reply."""
        if self.closed:
            return []
        try:
            with self._xs._lock:
                reply = self._handle(msg)
                out = [reply, *self._events]
                self._events.clear()
        except XenstoreError as e:
            out = [self._error(msg, e.err)]
        except Exception:
            log.exception("xenstore: domain %d's %s request failed", self.domid,
                          getattr(msg.type, "name", msg.type))
            out = [self._error(msg, "EIO")]
        self._xs._dispatch()
        return out

    def take_events(self) -> list[XsMessage]:
        with self._xs._lock:
            events = list(self._events)
            self._events.clear()
            return events

    @staticmethod
    def _error(msg: XsMessage, err: str) -> XsMessage:
        return XsMessage.of(XsType.ERROR, err, req_id=msg.req_id, tx_id=msg.tx_id)

    def _handle(self, msg: XsMessage) -> XsMessage:
        xs = self._xs
        try:
            t = XsType(msg.type)
        except ValueError:
            raise _fail("EINVAL", f"unknown message type {msg.type}") from None
        ok = pack_strings("OK")

        def reply(payload: bytes) -> XsMessage:
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise _fail("E2BIG", f"{t.name} reply of {len(payload)} bytes")
            return XsMessage(t, msg.req_id, msg.tx_id, payload)

        if t in (XsType.READ, XsType.DIRECTORY, XsType.GET_PERMS, XsType.WRITE,
                 XsType.MKDIR, XsType.RM, XsType.SET_PERMS):
            tx = xs._tx_lookup(self, msg.tx_id)
            if t == XsType.WRITE:
                raw_path, sep, value = msg.payload.partition(b"\0")
                if not sep:
                    raise _fail("EINVAL", "WRITE needs a NUL after the path")
                xs._write(self, tx, self._canon(text(raw_path)), value)
                return reply(ok)
            if t == XsType.SET_PERMS:
                args = _strings(msg, 2, None)
                xs._set_perms(self, tx, self._canon(args[0]), parse_perms(args[1:]))
                return reply(ok)
            path = self._canon(_strings(msg, 1, 1)[0])
            if t == XsType.READ:
                return reply(xs._read(self, tx, path))
            if t == XsType.DIRECTORY:
                return reply(pack_strings(*xs._directory(self, tx, path)))
            if t == XsType.GET_PERMS:
                return reply(pack_strings(*format_perms(xs._get_perms(self, tx, path))))
            if t == XsType.MKDIR:
                xs._mkdir(self, tx, path)
            else:
                xs._rm(self, tx, path)
            return reply(ok)
        if t == XsType.WATCH:
            path, token = _strings(msg, 2, 2)
            xs._watch(self, path, token, None)  # queues its first event: after the ack
            return reply(ok)
        if t == XsType.UNWATCH:
            path, token = _strings(msg, 2, 2)
            xs._unwatch(self, path, token)
            return reply(ok)
        if t == XsType.TRANSACTION_START:
            if msg.tx_id != 0:
                raise _fail("EBUSY", "TRANSACTION_START inside a transaction")
            if msg.payload not in (b"", b"\0"):
                _strings(msg, 1, 1)
            return reply(pack_strings(str(xs._tx_start(self).id)))
        if t == XsType.TRANSACTION_END:
            arg = _strings(msg, 1, 1)[0]
            if arg not in ("T", "F"):
                raise _fail("EINVAL", f"TRANSACTION_END {arg!r}")
            tx = xs._tx_lookup(self, msg.tx_id)
            if tx is None:
                raise _fail("EINVAL", "TRANSACTION_END outside a transaction")
            xs._tx_end(self, tx, arg == "T")
            return reply(ok)
        if t == XsType.GET_DOMAIN_PATH:
            domid = _domid(_strings(msg, 1, 1)[0])
            return reply(pack_strings(domain_path(domid)))
        if t == XsType.RESET_WATCHES:  # and transactions, as C xenstored
            xs._reset(self)
            return reply(ok)
        if t in (XsType.INTRODUCE, XsType.RELEASE, XsType.RESUME,
                 XsType.IS_DOMAIN_INTRODUCED, XsType.SET_TARGET):
            if self.domid != 0:
                raise _fail("EACCES", f"{t.name} is for dom0")
            if t == XsType.INTRODUCE:
                domid, mfn, port = _strings(msg, 3, 3)
                xs._introduce(_domid(domid), _number(mfn), _number(port))
                return reply(ok)
            if t == XsType.SET_TARGET:
                domid, target = (_domid(a) for a in _strings(msg, 2, 2))
                xs._set_target(domid, target)
                return reply(ok)
            domid = _domid(_strings(msg, 1, 1)[0])
            if t == XsType.RELEASE:
                xs._release(domid)
                return reply(ok)
            if t == XsType.RESUME:
                xs._resume(domid)
                return reply(ok)
            introduced = domid == 0 or domid in xs._domains
            return reply(pack_strings("T" if introduced else "F"))
        raise _fail("EINVAL", f"{t.name} is not a request")

    def _canon(self, path: str, *, watch: bool = False) -> str:
        if watch and path.startswith("@"):
            _check_path(path, relative=True)
            return path
        if path.startswith("/"):
            _check_path(path)
            return path
        _check_path(path, relative=True)
        full = f"{self.home}/{path}"
        _check_path(full)
        return full

    # ---- the direct API (dom0's users in the agent)

    def _call(self, fn: Callable[[], T]) -> T:
        if self.closed:
            raise _fail("EINVAL", f"domain {self.domid}'s xenstore connection is closed")
        try:
            with self._xs._lock:
                return fn()
        finally:
            self._xs._dispatch()

    def read(self, path: str, *, tx: int = 0) -> bytes:
        return self._call(lambda: self._xs._read(self, self._xs._tx_lookup(self, tx),
                                                 self._canon(path)))

    def exists(self, path: str, *, tx: int = 0) -> bool:
        try:
            self.read(path, tx=tx)
            return True
        except XenstoreError as e:
            if e.err == "ENOENT":
                return False
            raise

    def write(self, path: str, value: bytes | str, *, tx: int = 0) -> None:
        self._call(lambda: self._xs._write(self, self._xs._tx_lookup(self, tx),
                                           self._canon(path), raw(value)))

    def mkdir(self, path: str, *, tx: int = 0) -> None:
        self._call(lambda: self._xs._mkdir(self, self._xs._tx_lookup(self, tx),
                                           self._canon(path)))

    def rm(self, path: str, *, tx: int = 0) -> None:
        self._call(lambda: self._xs._rm(self, self._xs._tx_lookup(self, tx),
                                        self._canon(path)))

    def directory(self, path: str, *, tx: int = 0) -> list[str]:
        return self._call(lambda: self._xs._directory(self, self._xs._tx_lookup(self, tx),
                                                      self._canon(path)))

    def get_perms(self, path: str, *, tx: int = 0) -> list[Perm]:
        return list(self._call(lambda: self._xs._get_perms(
            self, self._xs._tx_lookup(self, tx), self._canon(path))))

    def set_perms(self, path: str, perms: Iterable[Perm], *, tx: int = 0) -> None:
        checked = parse_perms(format_perms(perms))
        self._call(lambda: self._xs._set_perms(self, self._xs._tx_lookup(self, tx),
                                               self._canon(path), checked))

    def watch(self, path: str, callback: WatchCallback, token: str | None = None) -> str:
        """Call `callback(path, token)` once now and on every change at or below `path`;
        the token (made up if not given) names the watch for `unwatch`."""
        def register() -> str:
            tok = token
            if tok is None:
                tok = f"cb{self._xs._next_token}"
                self._xs._next_token += 1
            self._xs._watch(self, path, tok, callback)
            return tok
        return self._call(register)

    def unwatch(self, path: str, token: str) -> None:
        self._call(lambda: self._xs._unwatch(self, path, token))

    def transaction(self) -> "Transaction":
        return Transaction(self, self._call(lambda: self._xs._tx_start(self).id))

    def transact(self, fn: Callable[["Transaction"], T], *, attempts: int = 16) -> T:
        """Run `fn` in a transaction and commit, again while the commit says EAGAIN."""
        for attempt in range(attempts):
            t = self.transaction()
            try:
                result = fn(t)
            except BaseException:
                t.abort()
                raise
            try:
                t.commit()
                return result
            except XenstoreError as e:
                if e.err != "EAGAIN" or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Drop this connection's watches and transactions."""
        with self._xs._lock:
            self._xs._close(self)


class Transaction:
    """A direct connection's transaction; a context manager that commits on success."""

    def __init__(self, conn: Connection, tx_id: int) -> None:
        self.conn = conn
        self.id = tx_id
        self._done = False

    def read(self, path: str) -> bytes:
        return self.conn.read(path, tx=self.id)

    def exists(self, path: str) -> bool:
        return self.conn.exists(path, tx=self.id)

    def write(self, path: str, value: bytes | str) -> None:
        self.conn.write(path, value, tx=self.id)

    def mkdir(self, path: str) -> None:
        self.conn.mkdir(path, tx=self.id)

    def rm(self, path: str) -> None:
        self.conn.rm(path, tx=self.id)

    def directory(self, path: str) -> list[str]:
        return self.conn.directory(path, tx=self.id)

    def get_perms(self, path: str) -> list[Perm]:
        return self.conn.get_perms(path, tx=self.id)

    def set_perms(self, path: str, perms: Iterable[Perm]) -> None:
        self.conn.set_perms(path, perms, tx=self.id)

    def commit(self) -> None:
        """Raises XenstoreError EAGAIN if a node it used changed since the start."""
        self._end(True)

    def abort(self) -> None:
        if not self._done:
            self._end(False)

    def _end(self, commit: bool) -> None:
        if self._done:
            raise _fail("EINVAL", f"transaction {self.id} has ended")
        self._done = True
        xs = self.conn._xs
        self.conn._call(lambda: xs._tx_end(self.conn, xs._tx_lookup(self.conn, self.id),
                                           commit))

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _strings(msg: XsMessage, least: int, most: int | None) -> list[str]:
    """The payload as NUL-terminated strings, between `least` and `most` of them."""
    if not msg.payload.endswith(b"\0"):
        raise _fail("EINVAL", f"{msg.type.name}: the payload is not NUL-terminated")
    parts = msg.payload[:-1].split(b"\0")
    if len(parts) < least or (most is not None and len(parts) > most):
        raise _fail("EINVAL", f"{msg.type.name} takes {least}"
                              f"{'' if most == least else '+'} arguments, not {len(parts)}")
    return [text(p) for p in parts]


def _number(arg: str) -> int:
    if not arg.isdigit() or len(arg) > 20:
        raise _fail("EINVAL", f"not a number: {arg[:40]!r}")
    return int(arg)


def _domid(arg: str) -> int:
    domid = _number(arg)
    if domid >= DOMID_FIRST_RESERVED:
        raise _fail("EINVAL", f"not a domain: {arg}")
    return domid


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

"""A connection (struct connection, and the request dispatch of tools/xenstored/core.c): one
domain's client of xenstored. A guest's requests arrive as messages, dispatched by type;
dom0's users in the agent call the same operations as methods, and hold a transaction as a
`Transaction`."""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Iterable, TypeVar

from pvmig.dom0.xenstored.domain import Domains
from pvmig.dom0.xenstored.store import (
    DOMID_FIRST_RESERVED,
    Perm,
    _check_path,
    _fail,
    domain_path,
    format_perms,
    parse_perms,
)
from pvmig.dom0.xenstored.transaction import _Transaction
from pvmig.dom0.xenstored.watch import WatchCallback, _Watch
from pvmig.pv.xenstore import (
    XENSTORE_PAYLOAD_MAX,
    XenstoreError,
    XsMessage,
    XsType,
    pack_strings,
    raw,
    text,
)

log = logging.getLogger("pvmig.dom0.xenstored")  # the daemon's one logger, as before the split

T = TypeVar("T")


class Connection:
    """One client of xenstored: a domain's ring, or a dom0 user in the agent.

    Ring connections: `handle(msg)` answers one request; `take_events()` returns the
    watch events queued since. Direct use (dom0): the methods below, raising
    XenstoreError; watches call back `callback(path, token)`."""

    def __init__(self, xs: Domains, domid: int) -> None:
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

"""The store, xenstored's core (tools/xenstored/core.c): the tree of nodes, their paths and
permissions, the operations on them, and a domain's subtree dumped and loaded.

An operation takes the client asking (for its permissions) and the transaction it runs in,
if any (for that transaction's view of the tree). Firing the watches of a change and running
their callbacks are the watch layer's: `_fire` and `_dispatch` are left to it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol

from pvmig.pv.xenstore import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX, XenstoreError

DOMID_FIRST_RESERVED = 0x7FF0

_VALID = re.compile(r"[A-Za-z0-9_@/-]+")
_PERM_CHARS = "nrwb"

Perm = tuple[int, str]                        # (domid, 'n' | 'r' | 'w' | 'b')


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


class Client(Protocol):
    """Who asks, as far as permissions go: a connection (connection.py) acting as a domain,
    and the domain it may act for besides (dom0's SET_TARGET)."""

    @property
    def domid(self) -> int: ...

    @property
    def target(self) -> int | None: ...


class TxView(Protocol):
    """A transaction as the tree sees it (transaction.py has the rest): its own copy of the
    nodes, the nodes it used as it first saw them, the paths it changed, and the changes
    whose watches fire when it commits."""

    nodes: dict[str, _Node]
    accessed: dict[str, _Node | None]
    written: dict[str, None]
    changes: list[_Change]


@dataclass(frozen=True, slots=True)
class _Root:
    """dom0 acting for the daemon itself (loading a dump, introducing a domain)."""

    domid: int = 0
    target: int | None = None


_ROOT = _Root()


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


def _check_path(path: str, *, relative: bool = False) -> None:
    limit = XENSTORE_REL_PATH_MAX if relative else XENSTORE_ABS_PATH_MAX
    if (not path or len(path) > limit or not _VALID.fullmatch(path) or "//" in path
            or (path.endswith("/") and path != "/")):
        raise _fail("EINVAL", f"bad path {path[:100]!r}")


class Store:
    """The tree, under the daemon's lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        root_perms: tuple[Perm, ...] = ((0, "n"),)
        self._nodes: dict[str, _Node] = {
            "/": _Node(b"", root_perms, ("local",)),
            "/local": _Node(b"", root_perms, ("domain",)),
            "/local/domain": _Node(b"", root_perms, ("0",)),
            "/local/domain/0": _Node(b"", root_perms),
        }

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

    # ---- left to the watch layer (watch.py)

    def _fire(self, change: _Change) -> None:
        """Fire the watches `change` concerns (callers hold the lock); a bare store has
        none."""

    def _dispatch(self) -> None:
        """Run the watch callbacks the changes queued (outside the lock); a bare store
        queues none."""

    # ---- operations (callers hold the lock)

    def _view(self, tx: TxView | None) -> dict[str, _Node]:
        return tx.nodes if tx is not None else self._nodes

    def _get(self, tx: TxView | None, path: str) -> _Node | None:
        nodes = self._view(tx)
        node = nodes.get(path)
        if tx is not None and path not in tx.accessed:
            tx.accessed[path] = node
        return node

    def _put(self, tx: TxView | None, path: str, node: _Node | None) -> None:
        self._get(tx, path)  # a write is an access too
        nodes = self._view(tx)
        if node is None:
            nodes.pop(path, None)
        else:
            nodes[path] = node
        if tx is not None:
            tx.written[path] = None

    def _changed(self, tx: TxView | None, change: _Change) -> None:
        if tx is not None:
            tx.changes.append(change)
        else:
            self._fire(change)

    def _perm(self, conn: Client, perms: tuple[Perm, ...]) -> str:
        owner = perms[0][0]
        if conn.domid == 0 or owner == conn.domid or (conn.target is not None
                                                      and owner == conn.target):
            return "b"
        for domid, perm in perms[1:]:
            if domid == conn.domid:
                return perm
        return perms[0][1]

    def _may(self, conn: Client, perms: tuple[Perm, ...], need: str) -> bool:
        have = self._perm(conn, perms)
        return have == "b" or have == need

    def _node(self, conn: Client, tx: TxView | None, path: str, need: str) -> _Node:
        node = self._get(tx, path)
        if node is None:
            raise self._missing(conn, tx, path, need)
        if not self._may(conn, node.perms, need):
            raise _fail("EACCES", path)
        return node

    def _missing(self, conn: Client, tx: TxView | None, path: str,
                 need: str) -> XenstoreError:
        """ENOENT, or EACCES if the nearest existing ancestor would not let `conn` see."""
        nodes = self._view(tx)
        anc = _parent(path)
        while anc not in nodes:
            anc = _parent(anc)
        return _fail("ENOENT" if self._may(conn, nodes[anc].perms, need) else "EACCES", path)

    def _read(self, conn: Client, tx: TxView | None, path: str) -> bytes:
        return self._node(conn, tx, path, "r").value

    def _directory(self, conn: Client, tx: TxView | None, path: str) -> list[str]:
        return list(self._node(conn, tx, path, "r").children)

    def _get_perms(self, conn: Client, tx: TxView | None,
                   path: str) -> tuple[Perm, ...]:
        return self._node(conn, tx, path, "r").perms

    def _write(self, conn: Client, tx: TxView | None, path: str,
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

    def _mkdir(self, conn: Client, tx: TxView | None, path: str) -> None:
        node = self._get(tx, path)
        if node is None:
            self._create(conn, tx, path, b"")
        elif not self._may(conn, node.perms, "w"):
            raise _fail("EACCES", path)

    def _create(self, conn: Client, tx: TxView | None, path: str,
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

    def _rm(self, conn: Client, tx: TxView | None, path: str) -> None:
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

    def _set_perms(self, conn: Client, tx: TxView | None, path: str,
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

    def _root_conn(self) -> Client:
        return _ROOT  # privileged, not registered: no watches of its own

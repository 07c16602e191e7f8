"""Domains (tools/xenstored/domain.c): introduced (their home, @introduceDomain), shut down
and resumed, given a target, released (their connections closed, @releaseDomain); and a
connection closed, with its watches and transactions."""

from __future__ import annotations

from dataclasses import dataclass

from pvmig.dom0.xenstored.store import DOMID_FIRST_RESERVED, _fail, domain_path
from pvmig.dom0.xenstored.watch import Peer, Watches


@dataclass(slots=True)
class _Domain:
    domid: int
    mfn: int
    evtchn: int
    shutdown: bool = False
    target: int | None = None


class Domains(Watches):
    """The store with the domains it knows."""

    def __init__(self) -> None:
        super().__init__()
        self._domains: dict[int, _Domain] = {}

    # ---- domains (the toolstack's calls; also reachable as messages from dom0)

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

    # ---- domains (callers hold the lock)

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

    def _reset(self, conn: Peer) -> None:
        conn._watches.clear()
        for tx_id in conn._txs:
            self._txs.pop(tx_id, None)
        conn._txs.clear()

    def _close(self, conn: Peer) -> None:
        self._reset(conn)
        conn._events.clear()
        conn.closed = True
        if conn in self._conns:
            self._conns.remove(conn)

    def _target_of(self, domid: int) -> int | None:
        dom = self._domains.get(domid)
        return dom.target if dom is not None else None

"""The daemon whole: `Xenstored`, the store with all its layers, and the one call that makes
connections, which is why it sits above connection.py."""

from __future__ import annotations

from pvmig.dom0.xenstored.connection import Connection
from pvmig.dom0.xenstored.domain import Domains
from pvmig.dom0.xenstored.store import _fail


class Xenstored(Domains):
    """One host's xenstore daemon."""

    def connect(self, domid: int) -> Connection:
        """A new connection acting as `domid` (dom0: the toolstack or a backend; any
        other domain must have been introduced)."""
        with self._lock:
            if domid != 0 and domid not in self._domains:
                raise _fail("ENOENT", f"domain {domid} is not introduced to xenstored")
            conn = Connection(self, domid)
            self._conns.append(conn)
            return conn

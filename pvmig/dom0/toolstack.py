"""The toolstack's part of a PV device: both its xenstore directories, written as
libxl writes them (pvmig.pv.xenbus has the layout and the handshake that follows)."""

from __future__ import annotations

from typing import Mapping

from pvmig.dom0.xenstored import Connection, Perm, Transaction
from pvmig.pv.xenbus import XenbusState as S
from pvmig.pv.xenbus import backend_path, frontend_path


def create_device(conn: Connection, *, domid: int, devtype: str, devid: int,
                  backend_domid: int = 0, frontend_keys: Mapping[str, str | int] = {},
                  backend_keys: Mapping[str, str | int] = {}) -> tuple[str, str]:
    """Write both directories of a device afresh, in one transaction, as libxl does
    (both states Initialising; the frontend's owned by the guest and readable by the
    backend domain, the backend's the other way round). Also what a destination does
    after loading a guest's entries: it resets the device. (frontend, backend) paths."""
    fe = frontend_path(domid, devtype, devid)
    be = backend_path(domid, devtype, devid, backend_domid)
    fe_perms: list[Perm] = [(domid, "n"), (backend_domid, "r")]
    be_perms: list[Perm] = [(backend_domid, "n"), (domid, "r")]

    def build(t: Transaction) -> None:
        for path, perms, keys in ((fe, fe_perms, {"backend": be, "backend-id": backend_domid,
                                                  **frontend_keys}),
                                  (be, be_perms, {"frontend": fe, "frontend-id": domid,
                                                  "online": 1, **backend_keys})):
            if t.exists(path):
                t.rm(path)
            t.mkdir(path)
            t.set_perms(path, perms)  # the keys below inherit these
            for key, value in {**keys, "state": int(S.Initialising)}.items():
                t.write(f"{path}/{key}", str(value))

    conn.transact(build)
    return fe, be

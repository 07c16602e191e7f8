"""Parking: idle domains outlive a clean restart of their agent (as `xl save` to local
disk before a dom0 reboot, and `xl restore` after).

On a clean stop (SIGTERM) the agent suspends each running domain that is not
migrating, lets its backends finish or abandon what is in flight, and writes a record
(its settings, its vCPU context, the backends' records) beside a RAM file it keeps. On
start, each record is restored as a migration's destination resumes a guest: a fresh
guest process waiting on the kept RAM, fresh backends, the vCPU context handed over;
the frontends reconnect and replay what was in flight. A domain that cannot be parked
(its guest does not acknowledge the suspend) is destroyed, and said so; a record that
cannot be restored is kept aside as NAME.broken with the reason in the agent's log.

A crash (SIGKILL) parks nothing: its guests die with it, and their files are removed
at the next start (there is no vCPU context to resume them from).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from . import errors
from .domain import RUNNING

if TYPE_CHECKING:
    from .domain import Domain
    from .host import Host

log = logging.getLogger(__name__)
RECOVERY = "replay"  # how the frontends come back: replay what was in flight


def directory(host: "Host") -> Path:
    return host.data_dir / "parked"


def kept_ram(host: "Host") -> set[Path]:
    """RAM files the parked records hold, and those set aside as broken (for whoever
    looks into them): the start must not clear them away."""
    kept = {Path(r["ram"]) for r in _records(host).values()}
    for path in directory(host).glob("*.broken"):
        try:
            kept.add(Path(msgpack.unpackb(path.read_bytes())["ram"]))
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            pass
    return kept


async def park_all(host: "Host") -> None:
    for name, dom in list(host.domains.items()):
        if dom.state == RUNNING and not dom.migration_id:
            try:
                await park(host, dom)
                continue
            except (errors.PvmigError, OSError) as e:
                log.error("domain %s could not be parked, destroyed: %s", name, e)
        await host.drop(name)


async def park(host: "Host", dom: "Domain") -> None:
    vcpu, _ = await dom.suspend()
    records = {}
    if dom.pv is not None:
        await dom.pv.quiesce()
        records = dom.pv.backend_records()
    record = {"name": dom.name, "ram": str(dom.mem.path), "ram_bytes": dom.ram_bytes,
              "workload": dom.workload, "devices": dom.devices, "vcpu": vcpu,
              "backends": records}
    _write(directory(host) / f"{dom.name}.park", msgpack.packb(record))
    host.domains.pop(dom.name)
    await dom.destroy(keep_ram=True)
    log.info("domain %s parked: RAM kept in %s", dom.name, dom.mem.path)


async def unpark_all(host: "Host") -> list[str]:
    """Resume every parked domain; the names resumed."""
    resumed = []
    for path, record in _records(host).items():
        try:
            await unpark(host, record)
        except (errors.PvmigError, OSError, KeyError, ValueError) as e:
            log.error("parked domain %s not resumed (%s): its record is kept as %s",
                      record.get("name", path.stem), e, path.with_suffix(".broken"))
            path.replace(path.with_suffix(".broken"))
            continue
        path.unlink()
        resumed.append(record["name"])
    return resumed


async def unpark(host: "Host", record: dict) -> None:
    kept = Path(record["ram"])
    if not kept.exists() or kept.stat().st_size != record["ram_bytes"]:
        raise errors.NotFound(f"its RAM file {kept} is gone or not {record['ram_bytes']} bytes")
    dom = host.reserve(record["name"], record["ram_bytes"], record["workload"],
                       record["devices"], ram_from=kept)
    try:
        host.start_devices(dom, fresh_disks=False)
        await dom.start_waiting(host.log_path(dom))
        if dom.pv is not None:
            dom.pv.restore_backend_records(record["backends"])
        await dom.resume(record["vcpu"], RECOVERY)
    except BaseException:
        host.domains.pop(dom.name, None)
        await dom.destroy(keep_ram=True)
        os.rename(dom.mem.path, kept)  # where the record (kept as .broken) says
        raise
    log.info("domain %s resumed from its parked state", dom.name)


def _records(host: "Host") -> dict[Path, dict]:
    out = {}
    for path in sorted(directory(host).glob("*.park")):
        try:
            out[path] = msgpack.unpackb(path.read_bytes())
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.error("parked record %s unreadable (%s): kept as .broken", path, e)
            path.replace(path.with_suffix(".broken"))
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

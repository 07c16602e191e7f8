"""Parking: domains outlive a restart of their agent, clean (as `xl save` to local disk
before a dom0 reboot, and `xl restore` after) or not (as Xen keeps its domains when dom0
crashes, and a live update hands them to the next hypervisor).

On a clean stop (SIGTERM) the agent suspends each running domain that is not
migrating, lets its backends finish or abandon what is in flight, and writes a record
(its settings, its vCPU context, the backends' records) beside a RAM file it keeps. On
start, each record is restored as a migration's destination resumes a guest: a fresh
guest process waiting on the kept RAM, fresh backends, the vCPU context handed over;
the frontends reconnect and replay what was in flight. A domain that cannot be parked
(its guest does not acknowledge the suspend) is destroyed, and said so; a record that
cannot be restored is kept aside as NAME.broken with the reason in the agent's log.

A crash (SIGKILL) parks nothing, but each running domain has a live record (its
settings, and for a migrating one the migration and its role) and its guest process
outlives the agent: seeing its channel close, the guest quiesces its frontends and
leaves its vCPU context beside its RAM (guest/kernel.py, preserve). The next start
revives each: it waits for the old guest process to end, then resumes it as a parked
one. A domain whose migration committed at this source is not revived (it belongs to
the destination): its copy is held until the migration settles (a rollback resumes
it; the watchdog asks the destination once a lease). One caught in a migration this
source never committed is revived and the migration recorded as aborted here, so that
the destination's recovery discards its copy. Only a host crash (the guests killed
too) loses a domain: its files are removed at the next start, as there is no vCPU
context to resume it from.

Kept RAM is never renamed, and every record says at each step what a crash there
needs (see unpark): a context is used only with the RAM it goes with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from pvmig import errors, faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig.dom0.domain import RUNNING
from pvmig.hv.memory import GuestMemory
from pvmig.migration import recovery
from pvmig.pv import guestinfo
from pvmig.rpc.client import AgentClient

if TYPE_CHECKING:
    from pvmig.dom0.domain import Domain
    from pvmig.host.host import Host

log = logging.getLogger(__name__)
RECOVERY = "replay"  # how the frontends come back: replay what was in flight


def directory(host: "Host") -> Path:
    return host.data_dir / "parked"


def live_directory(host: "Host") -> Path:
    return host.data_dir / "domains"


def kept_ram(host: "Host") -> set[Path]:
    """RAM files (and the vCPU contexts beside them) that parked and live records hold,
    and those set aside as broken (for whoever looks into them): the start must not
    clear them away."""
    kept = {Path(r["ram"]) for r in _records(directory(host), "*.park").values()}
    kept |= {Path(r["ram"]) for r in _records(live_directory(host), "*.live").values()}
    kept |= {Path(r["ram"]) for r in _records(directory(host), "*.held").values()}
    for path in [*directory(host).glob("*.broken"), *live_directory(host).glob("*.broken")]:
        try:
            kept.add(Path(msgpack.unpackb(path.read_bytes())["ram"]))
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            pass
    return kept | {ram.with_suffix(".vcpu") for ram in kept}


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
              "resumes": _ram_resumes(dom.mem), "backends": records,
              "pid": dom.proc.pid, "started": _started(dom.proc.pid)}
    _write(directory(host) / f"{dom.name}.park", msgpack.packb(record))
    forget(host, dom.name)
    host.domains.pop(dom.name)
    await dom.destroy(keep_ram=True)
    log.info("domain %s parked: RAM kept in %s", dom.name, dom.mem.path)


async def unpark_all(host: "Host") -> list[str]:
    """Resume every parked domain; the names resumed."""
    resumed = []
    for path, record in _records(directory(host), "*.park").items():
        try:
            await unpark(host, path, record)
        except (errors.PvmigError, OSError, KeyError, ValueError) as e:
            log.error("parked domain %s not resumed (%s): its record is kept as %s",
                      record.get("name", path.stem), e, path.with_suffix(".broken"))
            path.replace(path.with_suffix(".broken"))
            continue
        path.unlink()
        resumed.append(record["name"])
    return resumed


async def unpark(host: "Host", path: Path, record: dict) -> None:
    """Resume a kept domain (its record at `path`, its RAM where the record says) as a
    destination resumes a migrated one. The record says at every step what a crash
    there needs: the context taken in before anything can fail, then the new guest's
    pid before it can run (a next start waits for it, and takes the context it left)."""
    await _gone(record.get("pid", 0), record.get("started", 0))
    record = _take_context(path, record)
    kept = Path(record["ram"])
    if not kept.exists() or kept.stat().st_size != record["ram_bytes"]:
        raise errors.DataLoss(f"its RAM file {kept} is gone or not {record['ram_bytes']} bytes")
    dom = host.reserve(record["name"], record["ram_bytes"], record["workload"],
                       record["devices"], ram_from=kept)
    try:
        host.start_devices(dom, fresh_disks=False)
        await dom.start_waiting(host.log_path(dom))
        _write(path, msgpack.packb({**record, "pid": dom.proc.pid,
                                    "started": _started(dom.proc.pid)}))
        if dom.pv is not None:
            dom.pv.restore_backend_records(record.get("backends", {}))
        faults.point("unpark")
        await dom.resume(record["vcpu"], record.get("recovery", RECOVERY))
        faults.point("unparked")
        refresh(host, dom)
    except BaseException:
        host.domains.pop(dom.name, None)
        await dom.destroy(keep_ram=True)  # (where the record, kept as .broken, says)
        raise
    log.info("domain %s resumed from its kept state", dom.name)


def _take_context(path: Path, record: dict) -> dict:
    """The record with the context to resume from in it (and the RAM's resume count it
    goes with), written before the file the guest left is removed: from here on, a
    context file beside the RAM can only be a later guest's."""
    vcpu = _preserved(record)
    if vcpu is None:
        raise errors.DataLoss("no vCPU context goes with its RAM: it has run since its "
                              "record was written, and its guest left none")
    record = {**record, "vcpu": vcpu, "resumes": _resumes(record)}
    _write(path, msgpack.packb(record))
    _remove_vcpu(record)
    return record


# ---- live records: what a crashed agent's next start needs


def remember(host: "Host", dom: "Domain", **migration) -> None:
    """Record a running (or migrating) domain, so that the next start can revive it if
    this agent crashes. `migration`: migration_id and role while one is under way, and
    at a destination's commit the vCPU context it resumes from (with the RAM's resume
    count it goes with)."""
    record = {"name": dom.name, "ram": str(dom.mem.path), "ram_bytes": dom.ram_bytes,
              "workload": dom.workload, "devices": dom.devices,
              "backends": dom.pv.backend_records() if dom.pv is not None else {},
              "pid": dom.proc.pid if dom.proc else 0,
              "started": _started(dom.proc.pid) if dom.proc else 0, **migration}
    try:
        _write(live_directory(host) / f"{dom.name}.live", msgpack.packb(record))
        dom.recorded = migration
    except OSError as e:
        raise errors.FailedPrecondition(
            f"host {host.name} cannot record domain {dom.name} in "
            f"{live_directory(host)}: {e}") from None


def refresh(host: "Host", dom: "Domain") -> None:
    """remember, once the domain runs again (no migration): a failure is said, not
    raised (the guest runs; only a crash of this agent would now lose it)."""
    _rewrite(host, dom, {})


def backends_changed(host: "Host", dom: "Domain") -> None:
    """Its backends learnt something a revival needs (a peer of its NIC): its record
    again, as it was otherwise."""
    if dom.recorded is not None and host.domains.get(dom.name) is dom:
        _rewrite(host, dom, dom.recorded)


def _rewrite(host: "Host", dom: "Domain", migration: dict) -> None:
    try:
        remember(host, dom, **migration)
    except errors.FailedPrecondition as e:
        log.error("%s: a crash of this agent would lose it", e)


def forget(host: "Host", name: str) -> None:
    (live_directory(host) / f"{name}.live").unlink(missing_ok=True)


async def revive_all(host: "Host") -> list[str]:
    """Resume every domain a crashed agent left running; the names resumed."""
    records = _records(live_directory(host), "*.live")
    # The old guests preserve themselves at once, each in its own process: wait for
    # them all together.
    await asyncio.gather(*(_gone(r.get("pid", 0), r.get("started", 0))
                           for r in records.values()))
    for tmp in host.mem_dir.glob("*.vcpu.tmp"):  # a guest killed as it wrote
        tmp.unlink(missing_ok=True)
    resumed = []
    for path, record in records.items():
        name = record.get("name", path.stem)
        try:
            if await _revive(host, path, record):
                resumed.append(name)
        except Exception as e:  # (one domain's trouble keeps no other one down)
            log.error("domain %s not revived (%s): its record is kept as %s", name, e,
                      path.with_suffix(".broken"), exc_info=not isinstance(
                          e, (errors.PvmigError, OSError, KeyError, ValueError)))
            path.replace(path.with_suffix(".broken"))
    return resumed


async def _revive(host: "Host", path: Path, record: dict) -> bool:
    name = record["name"]
    if (directory(host) / f"{name}.park").exists():
        # Parked or being unparked when the crash came: the parked record resumes it
        # (with the context its guest left, if it ran since); this one goes.
        path.unlink()
        return False
    if _preserved(record) is None:
        # Nothing to resume from (a host crash): nothing is decided here either; a
        # migration's recovery finds the domain lost.
        log.error("domain %s not revived: its guest left no vCPU context (it died with "
                  "its host, or was killed): nothing to resume it from", name)
        _remove(record)
        path.unlink()
        return False
    record = _take_context(path, record)
    action = _decide(host, record)
    if action == "revive":
        await unpark(host, path, record)  # (which writes its record anew)
        log.info("domain %s revived: its agent had crashed", name)
        return True
    if action == "hold":
        # (under the migration's name: the domain's may be taken again meanwhile)
        ram = Path(record["ram"])
        held = ram.with_name(f"{record['migration_id']}.held.ram")
        _write(_held_path(host, record["migration_id"]),
               msgpack.packb({**record, "ram": str(held)}))
        os.rename(ram, held)
        log.warning("domain %s not revived: migration %s committed it to the destination; "
                    "its copy is held until the migration settles", name,
                    record["migration_id"])
    else:
        log.error("domain %s not revived: %s", name, action)
        _remove(record)
    path.unlink()
    return False


def _decide(host: "Host", record: dict) -> str:
    """"revive", "hold" (a committed source's copy, for a rollback), or why not. The
    source decides a migration: one it never committed is aborted now, before anyone
    asks; at a destination, only a committed copy may run."""
    mid, role = record.get("migration_id"), record.get("role")
    if not mid:
        return "revive"
    decided = host.commit_record(mid, role)
    if role == "source":
        if decided is None:
            host.record_commit(mid, "source", record["name"], "aborted")
            log.warning("migration %s aborted: its source agent crashed before commit", mid)
        elif decided["state"] == "committed":
            return "hold"
        elif decided["state"] == "lost":
            return f"migration {mid}: this source answered that its copy was lost"
        return "revive"
    if decided is None:
        return f"migration {mid} was never committed here"
    return "revive"


def _preserved(record: dict) -> bytes | None:
    """The vCPU context to resume from: what the guest left when its agent died, else
    the one the record keeps (a destination's migrated one, or one a failed revival
    kept) if the RAM has not run since it was taken."""
    path = _vcpu_path(record)
    if path.exists():
        return path.read_bytes()
    if record.get("vcpu") is not None and _resumes(record) == record.get("resumes"):
        return record["vcpu"]
    return None


def _resumes(record: dict) -> int | None:
    """How many times the guest in this RAM has resumed (its info page's count): a
    context taken before a resume does not go with the RAM after it."""
    try:
        mem = GuestMemory.open(record["ram"])
    except (OSError, ValueError):
        return None
    try:
        return _ram_resumes(mem)
    finally:
        mem.close()


def _ram_resumes(mem: GuestMemory) -> int:
    return int(guestinfo.view(mem)[0]["resumes"])


# ---- a committed source's copy, held after a crash until its migration settles


def _held_path(host: "Host", migration_id: str) -> Path:
    from pvmig.host.host import check_migration_id  # (host.py imports this module)
    check_migration_id(migration_id)  # it names a file, and may come off the wire
    return directory(host) / f"{migration_id}.held"


def holds(host: "Host", migration_id: str) -> bool:
    return _held_path(host, migration_id).exists()


async def roll_back_held(host: "Host", migration_id: str, reason: str) -> bool:
    """Rollback of a committed migration whose source crashed: resume the held copy
    here (recorded first). False if none is held."""
    async with host.held_lock:
        path = _held_path(host, migration_id)
        if not path.exists():
            return False
        record = msgpack.unpackb(path.read_bytes())
        if not _running(host, record):  # (else: resumed, and a crash kept this record)
            host.record_commit(migration_id, "source", record["name"], "rolled-back")
            log.warning("migration %s rolled back: %s", migration_id, reason)
            await unpark(host, path, record)
        path.unlink()
        return True


async def complete_held(host: "Host", migration_id: str) -> bool:
    """The destination runs the guest: the held copy goes. False if none is held."""
    async with host.held_lock:
        path = _held_path(host, migration_id)
        if not path.exists():
            return False
        record = msgpack.unpackb(path.read_bytes())
        if _running(host, record):  # rolled back already: a crash kept this record
            path.unlink()
            return False
        _remove(record)
        path.unlink()
        return True


def _running(host: "Host", record: dict) -> bool:
    return any(d.mem.path == Path(record["ram"]) for d in host.domains.values())


async def settle_held(host: "Host") -> None:
    """Held copies settle themselves, as an expired session does: the destination is
    asked what it holds (pvmig.migration.recovery). One that cannot be reached, or whose address
    answers as another agent now, is asked again at the next round of the watchdog."""
    try:
        held = _records(directory(host), "*.held")
    except OSError as e:
        log.error("held copies unreadable: %s", e)
        return
    for path, record in held.items():
        mid = record.get("migration_id", path.stem)
        try:
            if not path.exists():  # settled meanwhile (pvmig recover)
                continue
            async with AgentClient(record["dest"], "the destination agent",
                                   host.security) as dest:
                hello = await dest.hello(f"agent {host.name}")
                if hello.agent_name != record["dest_name"]:
                    raise errors.FailedPrecondition(
                        f"{record['dest']} answers as agent {hello.agent_name!r} now, not "
                        f"{record['dest_name']!r}")
                outcome = await recovery.settle(_HeldSource(host, record),
                                                recovery.RemoteDest(dest), mid)
            log.warning("%s (a copy held since a crash, settled by the source)",
                        outcome.describe())
        except (errors.PvmigError, KeyError) as e:
            log.error("migration %s: its held copy stays for now: %s", mid, e)
        except Exception:  # a bug: said, and the next round tries again
            log.exception("migration %s: settling its held copy failed", mid)


class _HeldSource:
    """A held copy, as recovery.settle drives a source."""

    address = "this agent"

    def __init__(self, host: "Host", record: dict) -> None:
        self.host, self.record, self.name = host, record, host.name

    async def resolve(self, migration_id: str, domain: str, instance: str) -> pb.MigrationState:
        decided = self.host.commit_record(migration_id, "source")
        return pb.MigrationState(state=decided["state"] if decided else "unknown",
                                 domain=self.record["name"],
                                 holds_copy=holds(self.host, migration_id))

    async def complete(self, migration_id: str) -> None:
        await complete_held(self.host, migration_id)

    async def rollback(self, migration_id: str, reason: str) -> None:
        if not await roll_back_held(self.host, migration_id, reason):
            raise errors.NotFound(f"migration {migration_id}: no copy held here")


def _vcpu_path(record: dict) -> Path:
    return Path(record["ram"]).with_suffix(".vcpu")


def _remove_vcpu(record: dict) -> None:
    _vcpu_path(record).unlink(missing_ok=True)


def _remove(record: dict) -> None:
    Path(record["ram"]).unlink(missing_ok=True)
    _remove_vcpu(record)


PRESERVE_WAIT_S = 30.0


async def _gone(pid: int, started: int) -> None:
    """Wait for a dead agent's guest process to end (it is preserving itself); one that
    does not is killed (a hung guest; its context, if written, still counts)."""
    if not pid or _started(pid) != started:
        return  # gone already (the pid, if taken, is someone else's)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a throttled guest may have been left stopped
    deadline = time.monotonic() + PRESERVE_WAIT_S
    while _started(pid) == started:
        if time.monotonic() > deadline:
            log.error("guest process %d did not end within %.0f s of its agent: killed",
                      pid, PRESERVE_WAIT_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        await asyncio.sleep(0.05)


def _started(pid: int) -> int:
    """A process's start time (clock ticks after boot), 0 if there is none: a pid with
    its start time names one process, never a later one given the same pid. A zombie
    (dead, not reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return 0 if fields[0] in ("Z", "X") else int(fields[19])


def _records(folder: Path, pattern: str) -> dict[Path, dict]:
    out = {}
    for path in sorted(folder.glob(pattern)):
        try:
            out[path] = msgpack.unpackb(path.read_bytes())
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.error("record %s unreadable (%s): kept as .broken", path, e)
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

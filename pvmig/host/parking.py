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

from pvmig import errors, faults
from pvmig.dom0.domain import Domain, DomainState
from pvmig.host import domain_records as records
from pvmig.host.commit_log import Decision, Role
from pvmig.host.domain_records import DomainRecord
from pvmig.host.host import Host
from pvmig.migration import recovery
from pvmig.migration.recovery import SideState, Status
from pvmig.rpc.client import AgentClient

log = logging.getLogger(__name__)


async def park_all(host: Host) -> None:
    for name, dom in list(host.domains.items()):
        if dom.state == DomainState.RUNNING and not dom.migration_id:
            try:
                await park(host, dom)
                continue
            except (errors.PvmigError, OSError) as e:
                log.error("domain %s could not be parked, destroyed: %s", name, e)
        await host.drop(name)


async def park(host: Host, dom: Domain) -> None:
    vcpu, _ = await dom.suspend()
    if dom.pv is not None:
        await dom.pv.quiesce()
    record = records.of_domain(dom, vcpu=vcpu, resumes=records.resumes_of(dom.mem))
    host.records.write(host.records.park_path(dom.name), record)
    host.records.forget(dom.name)
    host.domains.pop(dom.name)
    await dom.destroy(keep_ram=True)
    log.info("domain %s parked: RAM kept in %s", dom.name, dom.mem.path)


async def unpark_all(host: Host) -> list[str]:
    """Resume every parked domain; the names resumed."""
    resumed = []
    for path, record in host.records.parked().items():
        try:
            await unpark(host, path, record)
        except (errors.PvmigError, OSError, KeyError, ValueError) as e:
            log.error("parked domain %s not resumed (%s): its record is kept as %s",
                      record.name, e, path.with_suffix(".broken"))
            path.replace(path.with_suffix(".broken"))
            continue
        path.unlink()
        resumed.append(record.name)
    return resumed


async def unpark(host: Host, path: Path, record: DomainRecord) -> None:
    """Resume a kept domain (its record at `path`, its RAM where the record says) as a
    destination resumes a migrated one. The record says at every step what a crash
    there needs: the context taken in before anything can fail, then the new guest's
    pid before it can run (a next start waits for it, and takes the context it left)."""
    await wait_gone(record.pid, record.started)
    record = records.take_context(path, record)
    kept = record.ram_path
    if not kept.exists() or kept.stat().st_size != record.ram_bytes:
        raise errors.DataLoss(f"its RAM file {kept} is gone or not {record.ram_bytes} bytes")
    dom = host.reserve(record.name, record.ram_bytes, record.workload, record.devices,
                       ram_from=kept, labels=record.labels)
    try:
        host.start_devices(dom, fresh_disks=False)
        await dom.start_waiting(host.log_path(dom))
        host.records.write(path, record.with_(pid=dom.proc.pid,
                                              started=records.process_started(dom.proc.pid)))
        if dom.pv is not None:
            dom.pv.restore_backend_records(record.backends)
        faults.point("unpark")
        await dom.resume(record.vcpu, record.recovery)
        faults.point("unparked")
        host.records.refresh(dom)
    except BaseException:
        host.domains.pop(dom.name, None)
        await dom.destroy(keep_ram=True)  # (where the record, kept as .broken, says)
        raise
    log.info("domain %s resumed from its kept state", dom.name)


# ---- a committed source's copy, held after a crash until its migration settles


def hold(host: Host, record: DomainRecord) -> None:
    """Keep a committed source's copy for a rollback, under the migration's name (the
    domain's may be taken again meanwhile)."""
    held = record.ram_path.with_name(f"{record.migration_id}.held.ram")
    host.records.write(host.records.held_path(record.migration_id),
                       record.with_(ram=str(held)))
    record.ram_path.rename(held)


def holds(host: Host, migration_id: str) -> bool:
    return host.records.held_path(migration_id).exists()


async def roll_back_held(host: Host, migration_id: str, reason: str) -> bool:
    """Rollback of a committed migration whose source crashed: resume the held copy
    here (recorded first). False if none is held."""
    async with host.held_lock:
        path = host.records.held_path(migration_id)
        if not path.exists():
            return False
        record = DomainRecord.unpack(path.read_bytes())
        if not _running(host, record):  # (else: resumed, and a crash kept this record)
            host.commits.record(migration_id, Role.SOURCE, record.name, Decision.ROLLED_BACK)
            log.warning("migration %s rolled back: %s", migration_id, reason)
            await unpark(host, path, record)
        path.unlink()
        return True


async def complete_held(host: Host, migration_id: str) -> bool:
    """The destination runs the guest: the held copy goes. False if none is held."""
    async with host.held_lock:
        path = host.records.held_path(migration_id)
        if not path.exists():
            return False
        record = DomainRecord.unpack(path.read_bytes())
        if _running(host, record):  # rolled back already: a crash kept this record
            path.unlink()
            return False
        records.remove_files(record)
        path.unlink()
        return True


def _running(host: Host, record: DomainRecord) -> bool:
    return any(d.mem.path == record.ram_path for d in host.domains.values())


async def recover_held(host: Host) -> None:
    """Held copies settle themselves, as an expired session does: the destination is
    asked what it holds (pvmig.migration.recovery). One that cannot be reached, or whose
    address answers as another agent now, is asked again at the watchdog's next round."""
    try:
        held = host.records.held()
    except OSError as e:
        log.error("held copies unreadable: %s", e)
        return
    for path, record in held.items():
        mid = record.migration_id or path.stem
        try:
            if not path.exists():  # settled meanwhile (pvmig recover)
                continue
            async with AgentClient(record.dest, "the destination agent",
                                   host.security) as dest:
                hello = await dest.hello(f"agent {host.name}")
                if hello.agent_name != record.dest_name:
                    raise errors.FailedPrecondition(
                        f"{record.dest} answers as agent {hello.agent_name!r} now, not "
                        f"{record.dest_name!r}")
                outcome = await recovery.recover(_HeldSource(host, record),
                                                recovery.RemoteDest(dest), mid)
            log.warning("%s (a copy held since a crash, settled by the source)",
                        outcome.describe())
        except errors.PvmigError as e:
            log.error("migration %s: its held copy stays for now: %s", mid, e)
        except Exception:  # a bug: said, and the next round tries again
            log.exception("migration %s: settling its held copy failed", mid)


class _HeldSource:
    """A held copy, as recovery.settle drives a source."""

    address = "this agent"

    def __init__(self, host: Host, record: DomainRecord) -> None:
        self.host, self.record, self.name = host, record, host.name

    async def resolve(self, migration_id: str, domain: str, instance: str) -> SideState:
        decided = self.host.commits.read(migration_id, Role.SOURCE)
        return SideState(Status(decided.state.value) if decided else Status.UNKNOWN,
                         self.record.name, holds_copy=holds(self.host, migration_id))

    async def complete(self, migration_id: str) -> None:
        await complete_held(self.host, migration_id)

    async def rollback(self, migration_id: str, reason: str) -> None:
        if not await roll_back_held(self.host, migration_id, reason):
            raise errors.NotFound(f"migration {migration_id}: no copy held here")


PRESERVE_WAIT_S = 30.0
POLL_S = 0.05


async def wait_gone(pid: int, started: int) -> None:
    """Wait for a dead agent's guest process to end (it is preserving itself); one that
    does not is killed (a hung guest; its context, if written, still counts)."""
    if not pid or records.process_started(pid) != started:
        return  # gone already (the pid, if taken, is someone else's)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a throttled guest may have been left stopped
    deadline = time.monotonic() + PRESERVE_WAIT_S
    while records.process_started(pid) == started:
        if time.monotonic() > deadline:
            log.error("guest process %d did not end within %.0f s of its agent: killed",
                      pid, PRESERVE_WAIT_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        await asyncio.sleep(POLL_S)

"""Revival: the domains a crashed agent left running, resumed by its next start.

A crash (SIGKILL) of the agent parks nothing, but each running domain has a live
record (pvmig.host.domain_records) and its guest process outlives the agent: seeing
its channel close, the guest quiesces its frontends and leaves its vCPU context beside
its RAM (guest/kernel.py, preserve). The next start waits for the old guest processes
to end, then decides for each (`decide`) and resumes it as a parked one
(pvmig.host.parking.unpark), holds it, or lets it go.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum
from pathlib import Path

from pvmig import errors
from pvmig.host import domain_records as records
from pvmig.host.commit_log import Decision, Role
from pvmig.host.domain_records import DomainRecord
from pvmig.host.host import Host
from pvmig.host.parking import hold, unpark, wait_gone

log = logging.getLogger(__name__)


class Fate(Enum):
    REVIVE = "revive"
    HOLD = "hold"  # a committed source's copy, kept for a rollback
    DROP = "drop"


async def revive_all(host: Host) -> list[str]:
    """Resume every domain a crashed agent left running; the names resumed."""
    live = host.records.live()
    # The old guests preserve themselves at once, each in its own process: wait for
    # them all together.
    await asyncio.gather(*(wait_gone(r.pid, r.started) for r in live.values()))
    for tmp in host.mem_dir.glob("*.vcpu.tmp"):  # a guest killed as it wrote
        tmp.unlink(missing_ok=True)
    resumed = []
    for path, record in live.items():
        try:
            if await _revive(host, path, record):
                resumed.append(record.name)
        except Exception as e:  # (one domain's trouble keeps no other one down)
            log.error("domain %s not revived (%s): its record is kept as %s", record.name, e,
                      path.with_suffix(".broken"), exc_info=not isinstance(
                          e, (errors.PvmigError, OSError, KeyError, ValueError)))
            path.replace(path.with_suffix(".broken"))
    return resumed


async def _revive(host: Host, path: Path, record: DomainRecord) -> bool:
    name = record.name
    if host.records.park_path(name).exists():
        # Parked or being unparked when the crash came: the parked record resumes it
        # (with the context its guest left, if it ran since); this one goes.
        path.unlink()
        return False
    if records.preserved(record) is None:
        # Nothing to resume from (a host crash): nothing is decided here either; a
        # migration's recovery finds the domain lost.
        log.error("domain %s not revived: its guest left no vCPU context (it died with "
                  "its host, or was killed): nothing to resume it from", name)
        records.remove_files(record)
        path.unlink()
        return False
    record = records.take_context(path, record)
    fate, why = decide(host, record)
    if fate is Fate.REVIVE:
        await unpark(host, path, record)  # (which writes its record anew)
        log.info("domain %s revived: its agent had crashed", name)
        return True
    if fate is Fate.HOLD:
        hold(host, record)
        log.warning("domain %s not revived: migration %s committed it to the destination; "
                    "its copy is held until the migration settles", name, record.migration_id)
    else:
        log.error("domain %s not revived: %s", name, why)
        records.remove_files(record)
    path.unlink()
    return False


def decide(host: Host, record: DomainRecord) -> tuple[Fate, str]:
    """What becomes of a domain found after a crash, and why. The source decides a
    migration: one it never committed is aborted now, before anyone asks; at a
    destination, only a committed copy may run."""
    mid, role = record.migration_id, record.role
    if not mid:
        return Fate.REVIVE, "not migrating"
    decided = host.commits.read(mid, Role(role))
    if role == Role.SOURCE:
        if decided is None:
            host.commits.record(mid, Role.SOURCE, record.name, Decision.ABORTED)
            log.warning("migration %s aborted: its source agent crashed before commit", mid)
            return Fate.REVIVE, "never committed: aborted"
        if decided.state is Decision.COMMITTED:
            return Fate.HOLD, "committed to the destination"
        if decided.state is Decision.LOST:
            return Fate.DROP, f"migration {mid}: this source answered that its copy was lost"
        return Fate.REVIVE, f"migration {decided.state.value}"
    if decided is None:
        return Fate.DROP, f"migration {mid} was never committed here"
    return Fate.REVIVE, "committed here"

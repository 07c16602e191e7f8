"""Domain records: what a later start of this agent needs to resume a domain.

Three kinds, one msgpack file each, all a `DomainRecord`:
    domains/NAME.live   every running domain (its settings, the peers its NIC learnt;
                        while it migrates, the migration and this host's role in it; at a
                        destination's commit, the vCPU context it resumes from)
    parked/NAME.park    a domain parked by a clean stop (with its vCPU context)
    parked/ID.held      a committed source's copy a crash left, held until its migration
                        settles (by the migration's id: the name may be taken again)
A record that cannot be read or acted on is set aside as .broken, its RAM kept.

A vCPU context goes only with the RAM it was taken from: the RAM's resume count (its
info page's) says whether the guest has run since (`preserved`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import msgpack

from pvmig import errors
from pvmig.dom0.domain import Domain
from pvmig.host.commit_log import check_migration_id
from pvmig.hv.memory import GuestMemory
from pvmig.pv import guestinfo
from pvmig.pv.recovery import Recovery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainRecord:
    name: str
    ram: str  # the RAM file's path: it is never renamed while a record names it
    ram_bytes: int
    workload: dict
    devices: list
    backends: dict  # the backends' own records (the NIC's learnt peers)
    pid: int = 0  # its guest process, with its start time: names one process only
    started: int = 0
    migration_id: str = ""
    role: str = ""  # this host's, in that migration
    dest: str = ""  # a source's: where the destination agent is, and its name
    dest_name: str = ""
    vcpu: bytes | None = None  # a context to resume from, if the RAM has not run since
    resumes: int | None = None  # the RAM's resume count when `vcpu` was taken
    recovery: str = Recovery.REPLAY.value  # how the frontends come back
    labels: dict | None = None  # pvmig.labels (None: a record from before labels)

    @classmethod
    def unpack(cls, data: bytes) -> "DomainRecord":
        raw = msgpack.unpackb(data)
        known = {f.name for f in fields(cls)}
        # (fields a later release added are left out, not refused)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self))

    def with_(self, **changes) -> "DomainRecord":
        return replace(self, **changes)

    @property
    def ram_path(self) -> Path:
        return Path(self.ram)

    @property
    def vcpu_path(self) -> Path:
        """Where its guest leaves its context when its agent dies (guest/kernel.py)."""
        return self.ram_path.with_suffix(".vcpu")


def of_domain(dom: Domain, **migration) -> DomainRecord:
    return DomainRecord(
        name=dom.name, ram=str(dom.mem.path), ram_bytes=dom.ram_bytes,
        workload=dom.workload, devices=dom.devices, labels=dict(dom.labels),
        backends=dom.pv.backend_records() if dom.pv is not None else {},
        pid=dom.proc.pid if dom.proc else 0,
        started=process_started(dom.proc.pid) if dom.proc else 0, **migration)


class DomainRecords:
    """The record files of one host's data directory."""

    def __init__(self, data_dir: Path, host_name: str) -> None:
        self.live_dir = Path(data_dir) / "domains"
        self.parked_dir = Path(data_dir) / "parked"
        self.host_name = host_name

    # ---- paths

    def live_path(self, name: str) -> Path:
        return self.live_dir / f"{name}.live"

    def park_path(self, name: str) -> Path:
        return self.parked_dir / f"{name}.park"

    def held_path(self, migration_id: str) -> Path:
        check_migration_id(migration_id)  # it names a file, and may come off the wire
        return self.parked_dir / f"{migration_id}.held"

    # ---- reading and writing

    def read_all(self, folder: Path, pattern: str) -> dict[Path, DomainRecord]:
        """Every record matching; one unreadable is set aside as .broken, and said."""
        out = {}
        for path in sorted(folder.glob(pattern)):
            try:
                out[path] = DomainRecord.unpack(path.read_bytes())
            except (OSError, ValueError, TypeError, msgpack.UnpackException) as e:
                log.error("record %s unreadable (%s): kept as .broken", path, e)
                path.replace(path.with_suffix(".broken"))
        return out

    def live(self) -> dict[Path, DomainRecord]:
        return self.read_all(self.live_dir, "*.live")

    def parked(self) -> dict[Path, DomainRecord]:
        return self.read_all(self.parked_dir, "*.park")

    def held(self) -> dict[Path, DomainRecord]:
        return self.read_all(self.parked_dir, "*.held")

    @staticmethod
    def write(path: Path, record: DomainRecord) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(record.pack())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def kept_ram(self) -> set[Path]:
        """RAM files (and the vCPU contexts beside them) that records hold, and those set
        aside as broken (for whoever looks into them): a start must not clear them."""
        kept = {r.ram_path for r in [*self.parked().values(), *self.live().values(),
                                     *self.held().values()]}
        for path in [*self.parked_dir.glob("*.broken"), *self.live_dir.glob("*.broken")]:
            try:
                kept.add(Path(msgpack.unpackb(path.read_bytes())["ram"]))
            except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                pass
        return kept | {ram.with_suffix(".vcpu") for ram in kept}

    # ---- live records

    def remember(self, dom: Domain, **migration) -> None:
        """Record a running (or migrating) domain, so that the next start can revive it
        if this agent crashes. `migration`: migration_id and role while one is under
        way, and at a destination's commit the vCPU context it resumes from (with the
        RAM's resume count it goes with)."""
        try:
            self.write(self.live_path(dom.name), of_domain(dom, **migration))
            dom.recorded = migration
        except OSError as e:
            raise errors.FailedPrecondition(
                f"host {self.host_name} cannot record domain {dom.name} in "
                f"{self.live_dir}: {e}") from None

    def refresh(self, dom: Domain) -> None:
        """remember, once the domain runs again (no migration): a failure is said, not
        raised (the guest runs; only a crash of this agent would now lose it)."""
        self._rewrite(dom, {})

    def backends_changed(self, dom: Domain) -> None:
        """Its backends learnt something a revival needs (a peer of its NIC): its record
        again, as it was otherwise."""
        if dom.recorded is not None:
            self._rewrite(dom, dom.recorded)

    def _rewrite(self, dom: Domain, migration: dict) -> None:
        try:
            self.remember(dom, **migration)
        except errors.FailedPrecondition as e:
            log.error("%s: a crash of this agent would lose it", e)

    def forget(self, name: str) -> None:
        self.live_path(name).unlink(missing_ok=True)


# ---- a record's vCPU context and the RAM it goes with


def preserved(record: DomainRecord) -> bytes | None:
    """The vCPU context to resume from: what the guest left when its agent died, else
    the one the record keeps (a destination's migrated one, or one a failed revival
    kept) if the RAM has not run since it was taken."""
    if record.vcpu_path.exists():
        return record.vcpu_path.read_bytes()
    if record.vcpu is not None and ram_resumes(record.ram) == record.resumes:
        return record.vcpu
    return None


def ram_resumes(ram: str | Path) -> int | None:
    """How many times the guest in this RAM has resumed (its info page's count): a
    context taken before a resume does not go with the RAM after it."""
    try:
        mem = GuestMemory.open(ram)
    except (OSError, ValueError):
        return None
    try:
        return resumes_of(mem)
    finally:
        mem.close()


def resumes_of(mem: GuestMemory) -> int:
    return int(guestinfo.view(mem)[0]["resumes"])


def take_context(path: Path, record: DomainRecord) -> DomainRecord:
    """The record with the context to resume from in it (and the RAM's resume count it
    goes with), written before the file the guest left is removed: from here on, a
    context file beside the RAM can only be a later guest's."""
    vcpu = preserved(record)
    if vcpu is None:
        raise errors.DataLoss("no vCPU context goes with its RAM: it has run since its "
                              "record was written, and its guest left none")
    record = record.with_(vcpu=vcpu, resumes=ram_resumes(record.ram))
    DomainRecords.write(path, record)
    record.vcpu_path.unlink(missing_ok=True)
    return record


def remove_files(record: DomainRecord) -> None:
    """Its RAM and any context beside it: the domain is gone for good."""
    record.ram_path.unlink(missing_ok=True)
    record.vcpu_path.unlink(missing_ok=True)


def process_started(pid: int) -> int:
    """A process's start time (clock ticks after boot), 0 if there is none: a pid with
    its start time names one process, never a later one given the same pid. A zombie
    (dead, not reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields_ = stat[stat.rindex(")") + 2:].split()
    return 0 if fields_[0] in ("Z", "X") else int(fields_[19])


def domids(mem_dir: Path) -> Iterator[int]:
    """The domids that name files in `mem_dir` (NAME.DOMID.ram): the RAM of kept
    domains, which is never renamed, so a new domain must not be given one of them."""
    for path in mem_dir.glob("*.ram"):
        domid = path.stem.rpartition(".")[2]
        if domid.isdigit():
            yield int(domid)

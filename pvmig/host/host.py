"""A host: the domains one agent holds, and the migrations it takes part in.

The logic behind the agent's gRPC services lives here and in source_host/ and
dest_host/; the servicers only translate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pvmig import errors
from pvmig.dom0.devices import DomainDevices, normalise
from pvmig.dom0.domain import Domain
from pvmig.dom0.xenstored import Xenstored
from pvmig.host import parking
from pvmig.hv.memory import PAGE_SIZE
from pvmig.rpc.security import Security

if TYPE_CHECKING:
    from dest_host.restore import RestoreSession
    from source_host.save import SaveSession

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_WORKLOAD = {"dirty_rate": 1000.0, "hot_fraction": 0.1, "hot_share": 0.9,
                    "fill": 1.0, "seed": 1}


def default_max_ram() -> int:
    """Half of the host's memory: the rest is for the agent, the guests' peers and the OS."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


DEFAULT_SESSION_TIMEOUT_S = 120.0
RECORDS_KEPT_S = 30 * 86400  # commit records: a month, then pruned at the agent's start


@dataclass
class Lease:
    """A migration session's hold on this host: kept alive by the coordinator's calls
    and the page streams. A session nobody has touched for `timeout_s` has lost its
    coordinator: the host's watchdog settles it (see Host.watchdog)."""

    timeout_s: float
    _busy: int = 0
    _last: float = field(default_factory=time.monotonic)

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._last = time.monotonic()

    def renew(self) -> None:
        self._last = time.monotonic()

    def expired(self) -> bool:
        return self._busy == 0 and time.monotonic() - self._last > self.timeout_s


class Host:
    def __init__(self, *, name: str, data_dir: Path, mem_dir: Path, max_ram_bytes: int,
                 advertise: str, session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S,
                 security: Security | None = None, storage_dir: Path | None = None) -> None:
        self.name = name
        self.security = security or Security()
        # where a disk named by a relative path lives on this host (shared storage may be
        # mounted at a different place on each)
        self.storage_dir = Path(storage_dir) if storage_dir else None
        self.session_timeout_s = session_timeout_s
        self.instance_id = uuid.uuid4().hex
        self.data_dir = Path(data_dir)
        self.mem_dir = Path(mem_dir)
        self.max_ram_bytes = max_ram_bytes
        self.advertise = advertise
        self.listen_host = "127.0.0.1"  # where the agent listens (set when it serves)
        self.domains: dict[str, Domain] = {}
        self.saves: dict[str, SaveSession] = {}
        self.restores: dict[str, RestoreSession] = {}
        self.held_lock = asyncio.Lock()  # the copies a crash left held (pvmig.host.parking)
        self.xenstored = Xenstored()
        for d in (self.data_dir, self.mem_dir, self.data_dir / "migrations",
                  self.data_dir / "logs"):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise errors.InvalidArgument(f"cannot use {d} as an agent directory: {e}") from None
        self._clear_stale_memory()
        self._next_domid = 1 + max(_domids(self.mem_dir), default=0)  # past kept files
        self.prune_records()

    def _clear_stale_memory(self) -> None:
        # The agent owns its memory directory: files found at start are a dead agent's.
        # The RAM of domains it parked or left running (pvmig.host.parking) is kept, to resume
        # them; the rest only holds tmpfs memory.
        kept = parking.kept_ram(self)
        for path in sorted(p for ext in ("ram", "dirty", "gnttab", "evtchn", "vcpu")
                           for p in self.mem_dir.glob(f"*.{ext}") if p not in kept):
            log.warning("removing %s, left by an agent that did not stop cleanly", path)
            path.unlink(missing_ok=True)

    async def watchdog(self, every_s: float = 1.0) -> None:
        """Settle migrations whose coordinator has gone silent (session.expire): before
        commit they are aborted; after it, finished from the durable decision. Each in
        a task of its own: one unreachable peer holds up no other migration. Copies a
        crash left held (pvmig.host.parking) are settled once a lease too."""
        settling: dict[str, asyncio.Task] = {}
        held, held_next = None, time.monotonic() + self.session_timeout_s
        try:
            while True:
                await asyncio.sleep(every_s)
                for mid in [m for m, t in settling.items() if t.done()]:
                    del settling[mid]
                for session in [*self.saves.values(), *self.restores.values()]:
                    if session.lease.expired() and session.migration_id not in settling:
                        settling[session.migration_id] = asyncio.create_task(
                            self._expire(session))
                if (held is None or held.done()) and time.monotonic() >= held_next:
                    held = asyncio.create_task(parking.settle_held(self))
                    held_next = time.monotonic() + self.session_timeout_s
        finally:
            for task in [*settling.values(), held]:
                if task is not None:
                    task.cancel()

    @staticmethod
    async def _expire(session) -> None:
        try:
            await session.expire()
        except errors.PvmigError as e:
            # (an unreachable peer: tried again after another lease)
            log.error("migration %s, its coordinator gone: %s", session.migration_id, e)
            session.lease.renew()
        except Exception:  # a bug: said, and the watchdog goes on
            log.exception("migration %s: settling it failed", session.migration_id)
            session.lease.renew()

    def prune_records(self, older_than_s: float = RECORDS_KEPT_S) -> int:
        """Commit records a recovery could still need are young: a migration left
        unsettled is settled within a few leases. Older ones go (at start)."""
        now, pruned = time.time(), 0
        for path in (self.data_dir / "migrations").glob("*.json"):
            try:
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    pruned += 1
            except OSError as e:
                log.warning("cannot prune %s: %s", path, e)
        return pruned

    # ---- domains

    def domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise errors.NotFound(f"no domain {name!r} on host {self.name}") from None

    def reserve(self, name: str, ram_bytes: int, workload: dict,
                devices: list[dict] = (), ram_from: Path | None = None) -> Domain:
        """Check and allocate a domain's memory (or take over a kept RAM file: a parked
        domain's); the caller starts its guest."""
        if not _NAME.match(name):
            raise errors.InvalidArgument(
                f"bad domain name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if name in self.domains:
            raise errors.AlreadyExists(f"domain {name!r} already exists on host {self.name}")
        self._check_ram(ram_bytes, allocating=ram_from is None)
        devices = [normalise(d) for d in devices]
        dom = Domain.allocate(name=name, domid=self._next_domid, ram_bytes=ram_bytes,
                              mem_dir=self.mem_dir, workload=workload, ram_from=ram_from)
        dom.devices = devices
        self._next_domid += 1
        self.domains[name] = dom
        return dom

    def start_devices(self, dom: Domain, *, fresh_disks: bool) -> None:
        """The toolstack's part: entries in xenstored, backends waiting for the guest."""
        # The guest's wire listens where the agent does (all addresses for a wildcard
        # listener) and is announced under the name peers reach the agent by.
        public = self.advertise.rpartition(":")[0].strip("[]") or "127.0.0.1"
        net_bind = "0.0.0.0" if self.listen_host in ("0.0.0.0", "::", "") else self.listen_host
        dom.pv = DomainDevices(self.xenstored, dom, dom.devices, fresh_disks=fresh_disks,
                               net_bind=net_bind, net_public=public,
                               storage_dir=self.storage_dir)
        dom.pv.start()
        dom.pv.on_records = lambda: parking.backends_changed(self, dom)

    async def create_domain(self, name: str, ram_bytes: int, workload: dict,
                            devices: list[dict] = ()) -> Domain:
        for key in workload:
            if key not in DEFAULT_WORKLOAD:
                raise errors.InvalidArgument(f"unknown workload setting {key!r}")
        workload = {**DEFAULT_WORKLOAD, **workload}
        _check_workload(workload)
        dom = self.reserve(name, ram_bytes, workload, devices)
        try:
            self.start_devices(dom, fresh_disks=True)
            await dom.boot(self.log_path(dom))
            parking.remember(self, dom)
        except BaseException:
            await self.destroy_domain(name)
            raise
        return dom

    async def destroy_domain(self, name: str) -> None:
        dom = self.domain(name)
        if dom.migration_id and (dom.migration_id in self.saves
                                 or dom.migration_id in self.restores):
            raise errors.FailedPrecondition(
                f"domain {name!r} is migrating ({dom.migration_id}); "
                f"`pvmig cancel --migration {dom.migration_id}` first")
        await self.drop(name)

    async def drop(self, name: str) -> None:
        dom = self.domains.pop(name)
        parking.forget(self, name)
        await dom.destroy()

    def log_path(self, dom: Domain) -> Path:
        return self.data_dir / "logs" / f"{dom.name}.{dom.domid}.log"

    def _check_ram(self, ram_bytes: int, allocating: bool = True) -> None:
        if ram_bytes <= 0 or ram_bytes % PAGE_SIZE:
            raise errors.InvalidArgument(
                f"guest RAM must be a positive multiple of {PAGE_SIZE} bytes, not {ram_bytes}")
        mib = ram_bytes >> 20
        if ram_bytes > self.max_ram_bytes:
            raise errors.ResourceExhausted(
                f"a {mib} MiB guest is larger than host {self.name} allows "
                f"({self.max_ram_bytes >> 20} MiB, agent --max-ram-mb)")
        used = sum(d.ram_bytes for d in self.domains.values())
        if used + ram_bytes > self.max_ram_bytes:
            raise errors.ResourceExhausted(
                f"host {self.name} has {(self.max_ram_bytes - used) >> 20} MiB of guest RAM "
                f"left, not {mib} MiB")
        free = shutil.disk_usage(self.mem_dir).free
        if allocating and ram_bytes > free:
            raise errors.ResourceExhausted(
                f"{self.mem_dir} has {free >> 20} MiB free, not {mib} MiB for the guest's RAM")

    # ---- migrations

    def record_commit(self, migration_id: str, role: str, domain: str,
                      state: str = "committed") -> None:
        """Write the commit decision (or, rolled-back, its undoing) durably, before
        anyone acts on it."""
        path = self._record_path(migration_id)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"migration_id": migration_id, "role": role, "domain": domain,
                           "state": state, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise errors.FailedPrecondition(
                f"host {self.name} cannot record the commit of migration {migration_id} "
                f"in {path.parent}: {e}") from None

    def commit_record(self, migration_id: str, role: str) -> dict | None:
        """This host's durable record of a migration it committed in `role`, if any."""
        try:
            record = json.loads(self._record_path(migration_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise errors.DataLoss(f"host {self.name}: the commit record of migration "
                                  f"{migration_id} is unreadable: {e}") from None
        return record if record.get("role") == role else None

    def _record_path(self, migration_id: str) -> Path:
        check_migration_id(migration_id)
        return self.data_dir / "migrations" / f"{migration_id}.json"

    def save(self, migration_id: str) -> "SaveSession":
        try:
            return self.saves[migration_id]
        except KeyError:
            raise errors.NotFound(
                f"no outgoing migration {migration_id!r} on host {self.name}") from None

    def restore(self, migration_id: str) -> "RestoreSession":
        try:
            return self.restores[migration_id]
        except KeyError:
            raise errors.NotFound(
                f"no incoming migration {migration_id!r} on host {self.name}") from None


def _domids(mem_dir: Path) -> Iterator[int]:
    """The domids that name files in `mem_dir` (NAME.DOMID.ram): the RAM of kept
    domains, which is never renamed, so a new domain must not be given one of them."""
    for path in mem_dir.glob("*.ram"):
        domid = path.stem.rpartition(".")[2]
        if domid.isdigit():
            yield int(domid)


_MIGRATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_migration_id(migration_id: str) -> None:
    """Ids name files here (the commit records): letters, digits, '-', '_', at most 64."""
    if not _MIGRATION_ID.fullmatch(migration_id):
        raise errors.InvalidArgument(
            f"bad migration id {migration_id[:80]!r}: use letters, digits, '-', '_' "
            "(at most 64)")


def _check_workload(w: dict) -> None:
    for key, value in w.items():
        if not math.isfinite(value):
            raise errors.InvalidArgument(f"{key} must be a finite number, not {value}")
    if w["dirty_rate"] < 0:
        raise errors.InvalidArgument(f"dirty rate must be >= 0 pages/s, not {w['dirty_rate']}")
    for key in ("hot_fraction", "hot_share", "fill"):
        if not 0.0 <= w[key] <= 1.0:
            raise errors.InvalidArgument(f"{key} must be within 0..1, not {w[key]}")
    if w["hot_fraction"] == 0:
        raise errors.InvalidArgument("hot_fraction must be above 0")

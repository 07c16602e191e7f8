"""A host: the domains one agent holds, and the migrations it takes part in.

The logic behind the agent's gRPC services lives here and in source_host/ and
dest_host/; the servicers only translate. Its records (pvmig.host.commit_log,
pvmig.host.domain_records) are what a later start of the agent goes on from.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from pvmig import errors
from pvmig.dom0.devices import DomainDevices, normalise
from pvmig.dom0.domain import Domain
from pvmig.dom0.xenstored import Xenstored
from pvmig.host.commit_log import CommitLog
from pvmig.host.domain_records import DomainRecords, domids
from pvmig.host.ledger import Ledger
from pvmig.host.metrics import Metrics
from pvmig.host.sessions import Clock, Sessions
from pvmig.hv.memory import PAGE_SIZE
from pvmig.labels import check as check_labels
from pvmig.migration import policy
from pvmig.rpc.security import Security

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_WORKLOAD = {"dirty_rate": 1000.0, "hot_fraction": 0.1, "hot_share": 0.9,
                    "fill": 1.0, "seed": 1}


def default_max_ram() -> int:
    """Half of the host's memory: the rest is for the agent, the guests' peers and the OS."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2




class Host:
    def __init__(self, *, name: str, data_dir: Path, mem_dir: Path, max_ram_bytes: int,
                 advertise: str, session_timeout_s: float = policy.SESSION_TIMEOUT_S,
                 security: Security | None = None, storage_dir: Path | None = None,
                 clock: Clock = time.monotonic,
                 transport: policy.Transport = policy.TRANSPORT) -> None:
        self.name = name
        # the transport this agent's migrations take unless one is asked for
        self.transport = policy.Transport(transport)
        # (host, port, tls) of the data listener once it runs (pvmig.agent.data_server);
        # None: none here (--data-listen off), only transport grpc reaches this agent
        self.data_endpoint: tuple[str, int, bool] | None = None
        self.security = security or Security()
        # where a disk named by a relative path lives on this host (shared storage may be
        # mounted at a different place on each)
        self.storage_dir = Path(storage_dir) if storage_dir else None
        if self.storage_dir is not None:  # (a host's local storage: made if new)
            self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.session_timeout_s = session_timeout_s
        self.clock = clock  # leases and the watchdog's rounds (a test's own)
        self.instance_id = uuid.uuid4().hex
        self.data_dir = Path(data_dir)
        self.mem_dir = Path(mem_dir)
        self.max_ram_bytes = max_ram_bytes
        self.advertise = advertise
        self.listen_host = "127.0.0.1"  # where the agent listens (set when it serves)
        self.domains: dict[str, Domain] = {}
        self.saves: Sessions = Sessions("outgoing", name)  # source_host.save's
        self.restores: Sessions = Sessions("incoming", name)  # dest_host.restore's
        self.commits = CommitLog(self.data_dir / "migrations", name)
        self.records = DomainRecords(self.data_dir, name)
        self.held_lock = asyncio.Lock()  # the copies a crash left held (pvmig.host.parking)
        self.metrics = Metrics(self)
        self.ledger = Ledger()
        self.xenstored = Xenstored()
        for d in (self.data_dir, self.mem_dir, self.data_dir / "migrations",
                  self.data_dir / "logs"):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise errors.InvalidArgument(f"cannot use {d} as an agent directory: {e}") from None
        self._clear_stale_memory()
        self._next_domid = 1 + max(domids(self.mem_dir), default=0)  # past kept files
        self.commits.prune()

    def _clear_stale_memory(self) -> None:
        # The agent owns its memory directory: files found at start are a dead agent's.
        # The RAM of domains it parked or left running (pvmig.host.parking) is kept, to resume
        # them; the rest only holds tmpfs memory.
        kept = self.records.kept_ram()
        for path in sorted(p for ext in ("ram", "dirty", "gnttab", "evtchn", "vcpu")
                           for p in self.mem_dir.glob(f"*.{ext}") if p not in kept):
            log.warning("removing %s, left by an agent that did not stop cleanly", path)
            path.unlink(missing_ok=True)

    # ---- migrations, as counted (metrics) and recorded (ledger) here

    def migration_began(self, role: str, migration_id: str, domain: str) -> None:
        self.metrics.started.labels(role).inc()
        self.ledger.began(migration_id, role, domain)

    def migration_ended(self, role: str, migration_id: str, outcome: str) -> None:
        self.metrics.ended_as(role, outcome)
        self.ledger.ended(migration_id, role, outcome)

    # ---- domains

    def domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise errors.NotFound(f"no domain {name!r} on host {self.name}") from None

    def reserve(self, name: str, ram_bytes: int, workload: dict,
                devices: list[dict] = (), ram_from: Path | None = None,
                lazy: bool = False, labels: dict | None = None) -> Domain:
        """Check and allocate a domain's memory (or take over a kept RAM file: a parked
        domain's); the caller starts its guest."""
        if not _NAME.match(name):
            raise errors.InvalidArgument(
                f"bad domain name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if name in self.domains:
            raise errors.AlreadyExists(f"domain {name!r} already exists on host {self.name}")
        labels = check_labels(labels or {})
        self._check_ram(ram_bytes, allocating=ram_from is None)
        devices = [normalise(d) for d in devices]
        dom = Domain.allocate(name=name, domid=self._next_domid, ram_bytes=ram_bytes,
                              mem_dir=self.mem_dir, workload=workload, ram_from=ram_from,
                              lazy=lazy)
        dom.devices = devices
        dom.labels = labels
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
        dom.pv.on_records = lambda: self._backends_changed(dom)

    def _backends_changed(self, dom: Domain) -> None:
        if self.domains.get(dom.name) is dom:  # (not a domain already dropped)
            self.records.backends_changed(dom)

    async def create_domain(self, name: str, ram_bytes: int, workload: dict,
                            devices: list[dict] = (), labels: dict | None = None) -> Domain:
        for key in workload:
            if key not in DEFAULT_WORKLOAD:
                raise errors.InvalidArgument(f"unknown workload setting {key!r}")
        workload = {**DEFAULT_WORKLOAD, **workload}
        _check_workload(workload)
        dom = self.reserve(name, ram_bytes, workload, devices, labels=labels)
        try:
            self.start_devices(dom, fresh_disks=True)
            await dom.boot(self.log_path(dom))
            self.records.remember(dom)
        except BaseException:
            await self.destroy_domain(name)
            raise
        return dom

    async def set_workload(self, name: str, dirty_rate: float | None,
                           io_rate: float | None) -> Domain:
        dom = self.domain(name)
        for key, value in (("dirty_rate", dirty_rate), ("io_rate", io_rate)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise errors.InvalidArgument(f"{key} must be a finite number >= 0, not {value}")
        if dirty_rate is None and io_rate is None:
            raise errors.InvalidArgument("a workload change needs dirty_rate or io_rate")
        if io_rate is not None and not any(d.get("kind") == "vbd" for d in dom.devices):
            raise errors.InvalidArgument(f"domain {name!r} has no disk: no io_rate to set")
        await dom.set_workload(dirty_rate, io_rate)
        self.records.backends_changed(dom)  # (its record keeps the rates a revival shows)
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
        self.records.forget(name)
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

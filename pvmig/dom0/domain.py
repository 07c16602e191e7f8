"""A domain as its host agent holds it: RAM and log-dirty files, and the guest process.

The agent is the domain's hypervisor: it creates the memory, starts the guest process
with the memory mapped as its physical RAM, and talks to it over the hypercall channel
for what memory does not carry (boot, suspend, resume). The guest outlives a crash of
its agent: it leaves its vCPU context at `preserved` for the next start (pvmig.host.parking).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Callable

import numpy as np

from pvmig import errors
from pvmig.hv.evtchn import BackendEvents, EventChannels
from pvmig.hv.foreign_writes import ForeignWrites
from pvmig.hv.grant_table import GrantTable
from pvmig.hv.hypercall import AgentChannel, read_first
from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import PAGE_SIZE, GuestMemory
from pvmig.hv.userfault import UserFault
from pvmig.pv import guestinfo
from pvmig.pv.devlayout import shared_areas
from pvmig.pv.recovery import Recovery

BOOT_TIMEOUT_S = 300.0  # filling a large guest's memory takes a while
START_TIMEOUT_S = 60.0
SUSPEND_TIMEOUT_S = 60.0  # as Xen's toolstack waits for the suspend acknowledgement
RESUME_TIMEOUT_S = 30.0

# A throttled vCPU runs a slice, then stays off long enough to make `percent`% of the
# time off (as QEMU's cpu-throttle: 10 ms slices there).
THROTTLE_SLICE_S = 0.02



class DomainState(StrEnum):
    """A domain's life on this host (the guest's own, not a migration's)."""

    INCOMING = "incoming"      # a destination's: memory arriving, its guest waiting
    RUNNING = "running"
    OUTGOING = "outgoing"      # running, and a migration's source
    SUSPENDING = "suspending"  # asked to suspend, not yet acknowledged
    SUSPENDED = "suspended"
    CRASHED = "crashed"        # its guest died, or did not answer: stopped, not trusted


@dataclass
class Domain:
    name: str
    domid: int
    mem: GuestMemory
    log: DirtyLog
    workload: dict
    state: DomainState = DomainState.INCOMING
    migration_id: str = ""
    proc: subprocess.Popen | None = None
    chan: AgentChannel | None = None
    log_path: Path | None = None
    grants: GrantTable | None = None        # the hypervisor's, not guest RAM: not migrated
    channels: EventChannels | None = None   # likewise
    events: BackendEvents | None = None
    devices: list = field(default_factory=list)  # DeviceConfig dicts
    journal: ForeignWrites | None = None  # dom0's writes into guest RAM, for the verifier
    pv: object = None  # pvmig.dom0.devices.DomainDevices: its xenstore and backends here
    recorded: dict | None = None  # what its live record adds (pvmig.host.parking); None: no record
    userfault: UserFault | None = None  # post-copy: the guest's faults, and page placement
    missing: np.ndarray | None = None  # post-copy: frames not here yet (bool per frame)
    postcopy: str = ""  # post-copy's paging state (postcopy-active, -paused) until done
    labels: dict = field(default_factory=dict)  # pvmig.labels: they move with the domain
    _watch: asyncio.Task | None = field(default=None, repr=False)
    _exited: asyncio.Future | None = field(default=None, repr=False)
    _suspending: asyncio.Task | None = field(default=None, repr=False)
    _request: int = 0
    throttle: int = 0  # percent of the time the hypervisor keeps the vCPU off (auto-converge)
    _throttler: asyncio.Task | None = field(default=None, repr=False)
    _replies: dict = field(default_factory=dict, repr=False)  # request id -> future
    _inbox: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    _reader: asyncio.Task | None = field(default=None, repr=False)
    _gone: errors.GuestError | None = field(default=None, repr=False)
    # Set by the host's device layer: what a guest asks of its toolstack, and how the
    # toolstack asks a guest to suspend (control/shutdown in xenstore).
    on_xenstore: Callable[[int], None] | None = field(default=None, repr=False)
    request_suspend: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def ram_bytes(self) -> int:
        return self.mem.ram_bytes

    @property
    def preserved(self) -> Path:
        """Where the guest leaves its vCPU context if its agent dies."""
        return self.mem.path.with_suffix(".vcpu")

    @property
    def frames_missing(self) -> bool:
        return self.missing is not None and bool(self.missing.any())

    @property
    def guest_alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @classmethod
    def allocate(cls, *, name: str, domid: int, ram_bytes: int, mem_dir: Path,
                 workload: dict, ram_from: Path | None = None, lazy: bool = False
                 ) -> "Domain":
        """New hypervisor files for a domain; its RAM new too, or `ram_from`, a RAM file
        kept from before (a parked or crashed agent's domain: pvmig.host.parking), taken over
        where it is: never renamed, so that a crash at any moment finds it where its
        record says. lazy: the RAM file stays sparse (a post-copy destination's)."""
        base = mem_dir / f"{name}.{domid}"
        try:
            if ram_from is not None:
                mem = GuestMemory.open(ram_from)
            else:
                mem = GuestMemory.create(f"{base}.ram", ram_bytes // PAGE_SIZE,
                                         populate=not lazy)
        except OSError as e:
            raise errors.ResourceExhausted(f"cannot create the RAM of domain {name}: {e}") from None
        made: list = [mem]
        try:
            log = DirtyLog.create(f"{base}.dirty", mem.nr_frames)
            made.append(log)
            grants = GrantTable.create(f"{base}.gnttab", domid=domid, memory=mem, dirty=log)
            made.append(grants)
            channels = EventChannels.create(f"{base}.evtchn", domid=domid)
        except BaseException as e:
            for f in made:
                f.close()
                if f is not mem or ram_from is None:  # (a kept RAM stays kept)
                    f.unlink()
            if isinstance(e, OSError):
                raise errors.ResourceExhausted(
                    f"cannot create the hypervisor files of domain {name}: {e}") from None
            raise
        journal = ForeignWrites(mem.nr_frames)
        grants.journal = journal
        return cls(name=name, domid=domid, mem=mem, log=log, workload=workload,
                   grants=grants, channels=channels, events=BackendEvents(channels),
                   journal=journal)

    # ---- the guest process

    async def boot(self, log_path: Path) -> None:
        """Start a fresh guest and wait until it has laid out and filled its memory."""
        await self._spawn("boot", log_path, config={**self.workload, "devices": self.devices})
        await self._unsolicited("booted", BOOT_TIMEOUT_S)
        self.state = DomainState.RUNNING

    async def start_waiting(self, log_path: Path, lazy: bool = False) -> None:
        """Start the guest process that will resume this incoming domain, loaded and idle.
        lazy (post-copy): it registers its RAM with userfaultfd and hands the descriptor
        over with its first message; its faults are this agent's from then on."""
        await self._spawn("restore", log_path, lazy=lazy)
        msg = await self._unsolicited("waiting", START_TIMEOUT_S)
        if lazy and self.userfault is None:
            raise errors.GuestError(f"domain {self.name}: the guest handed over no "
                                    f"userfaultfd ({msg})")

    def set_throttle(self, percent: int) -> None:
        """Keep the vCPU off `percent`% of the time, as a hypervisor's scheduler caps a
        domain: the guest process runs a slice, then is stopped (SIGSTOP) for as long as
        makes that share. 0 lets it run freely again."""
        if not 0 <= percent < 100:
            raise errors.InvalidArgument(f"throttle must be within 0..99 %, not {percent}")
        self.throttle = percent
        if percent and self._throttler is None and self.guest_alive:
            self._throttler = asyncio.create_task(self._throttle_loop())
        elif not percent:
            self._stop_throttle()

    def _stop_throttle(self) -> None:
        # Only a stop of our own is undone: whatever else stopped the process (a
        # debugger, an operator) is not the throttle's to end.
        if self._throttler is not None:
            self._throttler.cancel()
            self._throttler = None
            self._signal(signal.SIGCONT)

    async def _throttle_loop(self) -> None:
        try:
            while self.throttle and self.guest_alive:
                off = THROTTLE_SLICE_S * self.throttle / (100 - self.throttle)
                self._signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(off)
                finally:  # a cancel never leaves the guest stopped
                    self._signal(signal.SIGCONT)
                await asyncio.sleep(THROTTLE_SLICE_S)
        except asyncio.CancelledError:
            pass

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def suspend(self) -> tuple[bytes, int]:
        """Ask the guest to suspend; return its vCPU context and when it acknowledged.

        The exchange runs on even if the caller gives up (a deadline, a cancel): a guest
        that acknowledged is suspended whatever became of the call, and an abort must
        know it to resume the guest (wait_suspend_outcome)."""
        self._require(DomainState.RUNNING, DomainState.OUTGOING)
        self.set_throttle(0)  # a stopped vCPU cannot answer
        before, self.state = self.state, DomainState.SUSPENDING
        self._suspending = asyncio.create_task(self._suspend(before))
        return await asyncio.shield(self._suspending)

    async def _suspend(self, before: str) -> tuple[bytes, int]:
        try:
            while not self._inbox.empty():  # an acknowledgement nobody waited for
                self._inbox.get_nowait()
            if self.request_suspend is not None:
                self.request_suspend()  # the toolstack's control/shutdown = "suspend"
            else:
                await self._send({"op": "suspend"})
            msg = await self._unsolicited("suspended", SUSPEND_TIMEOUT_S)
        except errors.GuestError:
            # No acknowledgement: the guest is hung or gone, and might suspend at any
            # moment; a guest in an unknown state is stopped, not trusted.
            self._kill()
            self.state = DomainState.CRASHED
            raise
        self.state = DomainState.SUSPENDED
        return msg["vcpu"], msg["t"]

    async def set_workload(self, dirty_rate: float | None, io_rate: float | None) -> dict:
        """Ask the running guest to change its own rates (it writes them in its info
        page, where they move with it); returns those now in force."""
        self._require(DomainState.RUNNING, DomainState.OUTGOING)
        try:
            msg = await self._exchange({"op": "workload", "dirty_rate": dirty_rate,
                                        "io_rate": io_rate}, "workload-set", START_TIMEOUT_S)
        except errors.GuestError as e:
            if self.state not in (DomainState.RUNNING, DomainState.OUTGOING):
                # (a suspend overtook the request: the guest refused it, suspended)
                raise errors.FailedPrecondition(
                    f"domain {self.name} is {self.state}: its workload stays as it was") from e
            raise
        self.workload = {**self.workload, "dirty_rate": msg["dirty_rate"]}
        for d in self.devices:
            if d.get("kind") == "vbd":
                d["io_rate"] = msg["io_rate"]
        return {"dirty_rate": msg["dirty_rate"], "io_rate": msg["io_rate"]}

    async def wait_suspend_outcome(self) -> None:
        """Wait for a suspend still in flight, so that its outcome is known."""
        if self._suspending is not None and not self._suspending.done():
            await asyncio.gather(self._suspending, return_exceptions=True)

    async def cancel_suspend(self) -> int:
        """Resume in place after a suspend that will not be followed by a move."""
        self._require(DomainState.SUSPENDED)
        msg = await self._exchange({"op": "resume-cancelled"}, "resumed", RESUME_TIMEOUT_S)
        self.state = DomainState.RUNNING
        return msg["t"]

    async def resume(self, vcpu: bytes, recovery: Recovery = Recovery.REPLAY) -> int:
        """Hand the vCPU context to the waiting guest; return its first step's time."""
        self._require(DomainState.INCOMING)
        if not self.guest_alive:
            raise errors.GuestError(
                f"domain {self.name}: the guest process waiting to resume it is gone "
                f"(see {self.log_path})")
        try:
            msg = await self._exchange({"op": "resume", "vcpu": vcpu, "recovery": recovery},
                                       "resumed", RESUME_TIMEOUT_S)
        except errors.GuestError:
            self._kill()  # it must not take the vCPU late, after someone gave up on it
            raise
        self.state = DomainState.RUNNING
        return msg["t"]

    async def destroy(self, keep_ram: bool = False) -> None:
        """Stop the guest and free everything; keep_ram: all but the RAM file (parked)."""
        for task in (self._watch, self._reader, self._throttler):
            if task:
                task.cancel()
        # Killed before its channel closes: a guest that saw the end first would take
        # it for its agent's crash and preserve itself.
        self._kill()
        if self._exited is not None:
            await asyncio.shield(self._exited)
        if self.chan:
            self.chan.close()
        if self.pv is not None:
            await self.pv.close()
        self.events.close()
        if self.userfault is not None:
            self.userfault.close()
        for f in (self.grants, self.channels, self.mem, self.log):
            f.close()
            if not (keep_ram and f is self.mem):
                f.unlink()
        self.preserved.unlink(missing_ok=True)

    def _kill(self) -> None:
        if self.proc is not None and self.guest_alive:
            self.proc.kill()

    def info(self) -> dict:
        # (not while post-copy frames are missing: a read through this agent's mapping
        # would hand the guest a zero page, pvmig.hv.userfault)
        info_here = self.missing is None or not self.missing[guestinfo.INFO_FRAME]
        stats = (guestinfo.read(self.mem) if self.state != DomainState.INCOMING
                 and info_here else {})
        whole = stats and not self.frames_missing
        return {"name": self.name, "domid": self.domid, "ram_bytes": self.ram_bytes,
                "state": self.state.value, "migration_id": self.migration_id,
                "guest_pid": self.proc.pid if self.proc else 0,
                "guest": stats, "workload": self._workload_now(stats), "devices": self.devices,
                "device_stats": self.pv.stats() if self.pv is not None and whole else [],
                "shared_frames": shared_areas(self.mem) if whole else [],
                "postcopy": self.postcopy, "labels": dict(self.labels),
                "missing_frames": int(self.missing.sum()) if self.missing is not None else 0}

    def _workload_now(self, stats: dict) -> dict:
        """As the guest keeps it (it may have changed since its creation, on another
        host), where its info page can be read; else as created."""
        return {**self.workload, **(guestinfo.workload(self.mem) if stats else {})}

    # ---- internals

    async def _spawn(self, mode: str, log_path: Path, config: dict | None = None,
                     lazy: bool = False) -> None:
        ours, theirs = socket.socketpair()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-X", "faulthandler", "-m", "guest", mode,
                "--ram", str(self.mem.path), "--dirty", str(self.log.path),
                "--fd", str(theirs.fileno()), "--gnttab", str(self.grants.path),
                "--evtchn", str(self.channels.path), "--evfd", str(self.channels.guest_fd),
                "--domid", str(self.domid), "--preserve", str(self.preserved)]
        if config is not None:
            argv += ["--config", json.dumps(config)]
        if lazy:
            argv.append("--lazy")
        # subprocess, not the event loop's spawn: it uses vfork, which runs no atfork
        # handlers. A plain fork() of this multi-threaded gRPC process runs gRPC's in
        # the child, which crashed guests with SIGSEGV before exec under load.
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, pass_fds=[theirs.fileno(), self.channels.guest_fd],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        theirs.close()
        self.channels.close_guest_end()
        self.events.start()
        self._exited = asyncio.get_running_loop().create_future()
        _on_exit(self.proc, self._exited)
        if lazy:
            await self._take_userfault(ours)
        self.chan = await AgentChannel.open(ours)
        self._watch = asyncio.create_task(self._watch_exit())
        self._reader = asyncio.create_task(self._read_channel())

    async def _take_userfault(self, sock: socket.socket) -> None:
        """The lazy guest's first message carries its userfaultfd: read before the
        channel's stream takes the socket (it would drop the descriptor)."""
        try:
            msg, fds = await asyncio.to_thread(read_first, sock, START_TIMEOUT_S)
        except (OSError, EOFError) as e:
            raise errors.GuestError(f"domain {self.name}: the guest process did not start "
                                    f"for post-copy ({e}; see {self.log_path})") from None
        if msg.get("op") == "waiting" and len(fds) == 1:
            self.userfault = UserFault(fds[0], int(msg["base"]), self.mem.nr_frames)
        else:
            for fd in fds:
                os.close(fd)
            if msg.get("op") == "error":
                raise errors.FailedPrecondition(f"domain {self.name}: {msg.get('error')}")
        self._inbox.put_nowait(msg)

    async def _watch_exit(self) -> None:
        # An incoming domain keeps its state: resume checks that its guest is alive.
        await asyncio.shield(self._exited)
        if self.state != DomainState.INCOMING:
            self.state = DomainState.CRASHED

    async def _exit_status(self) -> str:
        try:
            code = await asyncio.wait_for(asyncio.shield(self._exited), 5.0)
        except asyncio.TimeoutError:
            return "closed its channel"
        return f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"

    async def _send(self, msg: dict) -> None:
        try:
            await self.chan.send(msg)
        except (ConnectionError, OSError) as e:
            raise errors.GuestError(f"domain {self.name}: guest process is gone ({e})") from e

    async def _exchange(self, msg: dict, reply: str, timeout: float) -> dict:
        """Send a request and wait for its reply, matched by id: a reply to an earlier
        request whose caller gave up finds nobody waiting and is dropped."""
        self._request += 1
        rid = self._request
        fut = self._replies[rid] = asyncio.get_running_loop().create_future()
        try:
            await self._send({**msg, "id": rid})
            msg = await self._wait(fut, reply, timeout)
        finally:
            self._replies.pop(rid, None)
        return self._check_reply(msg, reply)

    async def _unsolicited(self, op: str, timeout: float) -> dict:
        """Wait for a message the guest sends of itself (booted, waiting, suspended)."""
        return self._check_reply(
            await self._wait(asyncio.ensure_future(self._inbox.get()), op, timeout), op)

    async def _wait(self, fut: asyncio.Future, op: str, timeout: float) -> dict:
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise errors.GuestError(f"domain {self.name}: guest did not answer {op!r} "
                                    f"within {timeout:.0f} s") from None

    def _check_reply(self, msg: dict, op: str) -> dict:
        if msg.get("op") == "gone":
            raise self._gone
        if msg.get("op") != op:
            raise errors.GuestError(
                f"domain {self.name}: guest answered {msg.get('op')!r} "
                f"({msg.get('error', '')}) where {op!r} was expected")
        return msg

    async def _read_channel(self) -> None:
        """Everything the guest says: replies to our requests, its own requests to the
        toolstack, and what it announces (into the inbox)."""
        try:
            while True:
                msg = await self.chan.recv()
                fut = self._replies.get(msg.get("id", 0))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif msg.get("op") == "xenstore":
                    await self._answer_xenstore(msg)
                else:
                    self._inbox.put_nowait(msg)
        except EOFError:
            self._gone = errors.GuestError(
                f"domain {self.name}: guest process {await self._exit_status()} "
                f"(see {self.log_path})")
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_result({"op": "gone"})
            self._inbox.put_nowait({"op": "gone"})

    async def _answer_xenstore(self, msg: dict) -> None:
        try:
            if self.on_xenstore is None:
                raise errors.FailedPrecondition("no xenstored on this host")
            self.on_xenstore(int(msg["port"]))
            reply = {"op": "xenstore-ok", "rid": msg.get("rid", 0)}
        except (errors.PvmigError, KeyError, ValueError) as e:
            reply = {"op": "xenstore-error", "rid": msg.get("rid", 0), "error": str(e)}
        await self._send(reply)

    def _require(self, *states: DomainState) -> None:
        if self.state not in states:
            raise errors.FailedPrecondition(
                f"domain {self.name} is {self.state}, not {' or '.join(states)}")


def _on_exit(proc: subprocess.Popen, exited: asyncio.Future) -> None:
    """Resolve `exited` with the process's return code when it ends: a pidfd in the
    event loop, no thread and no SIGCHLD handler."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = proc.wait()
        if not exited.done():
            exited.set_result(code)

    loop.add_reader(pidfd, reap)

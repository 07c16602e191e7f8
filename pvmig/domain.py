"""A domain as its host agent holds it: RAM and log-dirty files, and the guest process.

The agent is the domain's hypervisor: it creates the memory, starts the guest process
with the memory mapped as its physical RAM, and talks to it over the hypercall channel
for what memory does not carry (boot, suspend, resume).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import errors, guestinfo
from .evtchn import BackendEvents, EventChannels
from .grant_table import GrantTable
from .hypercall import AgentChannel
from .logdirty import DirtyLog
from .memory import PAGE_SIZE, GuestMemory

BOOT_TIMEOUT_S = 300.0  # filling a large guest's memory takes a while
START_TIMEOUT_S = 60.0
SUSPEND_TIMEOUT_S = 60.0  # as Xen's toolstack waits for the suspend acknowledgement
RESUME_TIMEOUT_S = 30.0

RUNNING, SUSPENDING, SUSPENDED, OUTGOING, INCOMING, CRASHED = (
    "running", "suspending", "suspended", "outgoing", "incoming", "crashed")


@dataclass
class Domain:
    name: str
    domid: int
    mem: GuestMemory
    log: DirtyLog
    workload: dict
    state: str = INCOMING
    migration_id: str = ""
    proc: subprocess.Popen | None = None
    chan: AgentChannel | None = None
    log_path: Path | None = None
    grants: GrantTable | None = None        # the hypervisor's, not guest RAM: not migrated
    channels: EventChannels | None = None   # likewise
    events: BackendEvents | None = None
    devices: list = field(default_factory=list)  # DeviceConfig dicts
    _watch: asyncio.Task | None = field(default=None, repr=False)
    _exited: asyncio.Future | None = field(default=None, repr=False)
    _suspending: asyncio.Task | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _request: int = 0

    @property
    def ram_bytes(self) -> int:
        return self.mem.ram_bytes

    @property
    def guest_alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @classmethod
    def allocate(cls, *, name: str, domid: int, ram_bytes: int, mem_dir: Path,
                 workload: dict) -> "Domain":
        base = mem_dir / f"{name}.{domid}"
        try:
            mem = GuestMemory.create(f"{base}.ram", ram_bytes // PAGE_SIZE)
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
                f.unlink()
            if isinstance(e, OSError):
                raise errors.ResourceExhausted(
                    f"cannot create the hypervisor files of domain {name}: {e}") from None
            raise
        return cls(name=name, domid=domid, mem=mem, log=log, workload=workload,
                   grants=grants, channels=channels, events=BackendEvents(channels))

    # ---- the guest process

    async def boot(self, log_path: Path) -> None:
        """Start a fresh guest and wait until it has laid out and filled its memory."""
        await self._spawn("boot", log_path, config=self.workload)
        await self._expect("booted", BOOT_TIMEOUT_S, request=0)
        self.state = RUNNING

    async def start_waiting(self, log_path: Path) -> None:
        """Start the guest process that will resume this incoming domain, loaded and idle."""
        await self._spawn("restore", log_path)
        await self._expect("waiting", START_TIMEOUT_S, request=0)

    async def suspend(self) -> tuple[bytes, int]:
        """Ask the guest to suspend; return its vCPU context and when it acknowledged.

        The exchange runs on even if the caller gives up (a deadline, a cancel): a guest
        that acknowledged is suspended whatever became of the call, and an abort must
        know it to resume the guest (settle_suspend)."""
        self._require(RUNNING, OUTGOING)
        before, self.state = self.state, SUSPENDING
        self._suspending = asyncio.create_task(self._suspend(before))
        return await asyncio.shield(self._suspending)

    async def _suspend(self, before: str) -> tuple[bytes, int]:
        try:
            msg = await self._exchange({"op": "suspend"}, "suspended", SUSPEND_TIMEOUT_S)
        except errors.GuestError:
            # No acknowledgement: the guest is hung or gone, and might suspend at any
            # moment; a guest in an unknown state is stopped, not trusted.
            self._kill()
            self.state = CRASHED
            raise
        self.state = SUSPENDED
        return msg["vcpu"], msg["t"]

    async def settle_suspend(self) -> None:
        """Wait for a suspend still in flight, so that its outcome is known."""
        if self._suspending is not None and not self._suspending.done():
            await asyncio.gather(self._suspending, return_exceptions=True)

    async def cancel_suspend(self) -> int:
        """Resume in place after a suspend that will not be followed by a move."""
        self._require(SUSPENDED)
        msg = await self._exchange({"op": "resume-cancelled"}, "resumed", RESUME_TIMEOUT_S)
        self.state = RUNNING
        return msg["t"]

    async def resume(self, vcpu: bytes) -> int:
        """Hand the vCPU context to the waiting guest; return its first step's time."""
        self._require(INCOMING)
        if not self.guest_alive:
            raise errors.GuestError(
                f"domain {self.name}: the guest process waiting to resume it is gone "
                f"(see {self.log_path})")
        msg = await self._exchange({"op": "resume", "vcpu": vcpu}, "resumed", RESUME_TIMEOUT_S)
        self.state = RUNNING
        return msg["t"]

    async def destroy(self) -> None:
        if self._watch:
            self._watch.cancel()
        if self.chan:
            self.chan.close()
        self._kill()
        if self._exited is not None:
            await asyncio.shield(self._exited)
        self.events.close()
        for f in (self.grants, self.channels, self.mem, self.log):
            f.close()
            f.unlink()

    def _kill(self) -> None:
        if self.proc is not None and self.guest_alive:
            self.proc.kill()

    def info(self) -> dict:
        stats = guestinfo.read(self.mem) if self.state != INCOMING else {}
        return {"name": self.name, "domid": self.domid, "ram_bytes": self.ram_bytes,
                "state": self.state, "migration_id": self.migration_id,
                "guest_pid": self.proc.pid if self.proc else 0,
                "guest": stats, "workload": self.workload}

    # ---- internals

    async def _spawn(self, mode: str, log_path: Path, config: dict | None = None) -> None:
        ours, theirs = socket.socketpair()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-X", "faulthandler", "-m", "guest", mode,
                "--ram", str(self.mem.path), "--dirty", str(self.log.path),
                "--fd", str(theirs.fileno()), "--gnttab", str(self.grants.path),
                "--evtchn", str(self.channels.path), "--evfd", str(self.channels.guest_fd)]
        if config is not None:
            argv += ["--config", json.dumps(config)]
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
        self.chan = await AgentChannel.open(ours)
        self._watch = asyncio.create_task(self._watch_exit())

    async def _watch_exit(self) -> None:
        # An incoming domain keeps its state: resume checks that its guest is alive.
        await asyncio.shield(self._exited)
        if self.state != INCOMING:
            self.state = CRASHED

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
        """Send a request and wait for its reply; one exchange at a time, and a reply
        to an earlier request (whose caller gave up) is recognised by its id and dropped."""
        async with self._lock:
            self._request += 1
            await self._send({**msg, "id": self._request})
            return await self._expect(reply, timeout, request=self._request)

    async def _expect(self, op: str, timeout: float, *, request: int) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                msg = await asyncio.wait_for(
                    self.chan.recv(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise errors.GuestError(f"domain {self.name}: guest did not answer {op!r} "
                                        f"within {timeout:.0f} s") from None
            except EOFError:
                raise errors.GuestError(
                    f"domain {self.name}: guest process {await self._exit_status()} "
                    f"(see {self.log_path})") from None
            if msg.get("id", 0) == request:
                break
        if msg.get("op") != op:
            raise errors.GuestError(
                f"domain {self.name}: guest answered {msg.get('op')!r} "
                f"({msg.get('error', '')}) where {op!r} was expected")
        return msg

    def _require(self, *states: str) -> None:
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

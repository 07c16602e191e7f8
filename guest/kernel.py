"""The guest's main loop: boot or restore, then step the workload until told otherwise.

A step writes the pages the dirty rate owes since the last step and checks the next
slice of the rolling sweep. Between steps the guest answers its host agent: suspend
(hand over the vCPU context and wait), resume after a cancelled suspend, or the end of
its channel (the agent crashed: the guest preserves itself for the agent's next start;
a destroyed domain's process is killed, it sees no end).
"""

from __future__ import annotations

import os
import select
import time

import msgpack
import numpy as np

from pvmig.errors import PvmigError
from pvmig.hv.hypercall import GuestChannel
from pvmig.pv import guestinfo
from pvmig.pv.devlayout import BlkArea, NetArea

from .blkfront import format_area
from .devices import GuestDevices, vbd_config, vif_config
from .memapi import VcpuMemory
from .netfront import format_net_area
from .workload import MemoryWorkload

TICK_S = 0.01
# Work is owed for the time the vCPU ran, not for time the hypervisor kept it off (a
# throttle, an overloaded host): a step never makes up more than this much lost time.
MAX_STEP_S = 2 * TICK_S
# Frames checked per step. Steady: light, so the guest leaves the host's CPUs to the
# migration (a 64 MiB sweep takes ~1.3 s). Just after a resume: fast, so that every
# frame is checked soon after a move (a 1 GiB sweep in ~1.3 s of steps).
SWEEP_FRAMES = 128
RESUME_SWEEP_FRAMES = 2048
VCPU_VERSION = 1


class Kernel:
    def __init__(self, vm: VcpuMemory, rng: np.random.Generator) -> None:
        self.vm = vm
        self.work = MemoryWorkload(vm)
        self.rng = rng
        self.owed = 0.0
        self.io_owed = 0.0
        self.last = time.monotonic()
        self.devices: GuestDevices | None = None
        self.suspended = False
        self.preserve_to: str | None = None  # where the vCPU context goes if the agent dies

    # ---- lifecycle

    @classmethod
    def boot(cls, vm: VcpuMemory, config: dict) -> "Kernel":
        """First start: lay out the info page and generation table, fill memory."""
        vbd, vif = vbd_config(config), vif_config(config)
        blk_frames = BlkArea.frames_needed(int(vbd["blocks"])) if vbd else 0
        lay = guestinfo.layout(vm.mem.nr_frames, blk_frames + (NetArea.FRAMES if vif else 0))
        net_first = lay.dev_first + blk_frames if vif else 0
        with vm.writing(0):
            info = guestinfo.view(vm.mem)
            info[0] = np.zeros((), guestinfo.INFO)
            for key, value in dict(
                    nr_frames=vm.mem.nr_frames, gen_first=lay.gen_first,
                    gen_frames=lay.gen_frames, dev_first=lay.dev_first,
                    dev_frames=lay.dev_frames, work_first=lay.work_first,
                    work_frames=lay.work_frames,
                    dirty_rate=config["dirty_rate"], hot_fraction=config["hot_fraction"],
                    hot_share=config["hot_share"], fill=config["fill"],
                    seed=config["seed"], blk_devid=vbd["devid"] if vbd else 0,
                    blk_blocks=vbd["blocks"] if vbd else 0,
                    blk_io_rate=vbd.get("io_rate", 200.0) if vbd else 0.0,
                    blk_persistent=int(bool(vbd.get("persistent"))) if vbd else 0,
                    net_devid=vif["devid"] if vif else 0, net_first=net_first).items():
                info[key] = value
            # The magic goes last: a reader that sees it sees a complete page.
            info["magic"] = guestinfo.MAGIC
        kernel = cls(vm, np.random.default_rng(config["seed"]))
        kernel.work.fill(config["fill"])
        if vbd:
            blocks = int(vbd["blocks"])
            format_area(vm, BlkArea.at(lay.dev_first, blocks),
                        filled=int(float(vbd.get("fill", 0.0)) * blocks))
        if vif:
            format_net_area(vm, NetArea.at(net_first))
        return kernel

    @classmethod
    def restore(cls, vm: VcpuMemory, vcpu: bytes) -> "Kernel":
        """Resume on a new host from RAM and the vCPU context taken at suspend."""
        ctx = msgpack.unpackb(vcpu, raw=False)
        if ctx.get("version") != VCPU_VERSION:
            raise ValueError(f"vCPU context version {ctx.get('version')} is not {VCPU_VERSION}")
        if int(guestinfo.view(vm.mem)[0]["magic"]) != guestinfo.MAGIC:
            raise ValueError("guest RAM has no info page: nothing to resume")
        rng = np.random.default_rng()
        rng.bit_generator.state = _rng_state_in(ctx["rng"])
        kernel = cls(vm, rng)
        kernel.owed = ctx["owed"]
        kernel.resumed()
        return kernel

    def resumed(self) -> None:
        """After any resume: a full sweep starts from the first frame, time restarts."""
        with self.vm.writing(0):
            info = self.work.info
            info["resumes"] += 1
            for name in ("sweeps_since_resume", "checks_since_resume", "failed_since_resume",
                         "sweep_cursor"):
                info[name] = 0
        self.last = time.monotonic()

    def vcpu_context(self) -> bytes:
        return msgpack.packb({
            "version": VCPU_VERSION,
            "rng": _rng_state_out(self.rng.bit_generator.state),
            "owed": self.owed,
            "steps": int(self.work.info[0]["steps"]),
        })

    # ---- running

    def step(self) -> None:
        now = time.monotonic()
        dt, self.last = min(now - self.last, MAX_STEP_S), now
        self.owed += float(self.work.info[0]["dirty_rate"]) * dt
        if self.devices is not None:
            self.devices.service()
            self.io_owed = self.devices.step(dt, self.io_owed)
        n = int(self.owed)
        if n:
            self.owed -= n
            self.work.write(self.work.pick(self.rng, n))
        resumed_sweep = self.work.info[0]["resumes"] and not self.work.info[0]["sweeps_since_resume"]
        self.work.sweep_step(RESUME_SWEEP_FRAMES if resumed_sweep else SWEEP_FRAMES)
        self.work.count("steps", 1)

    def run(self, chan: GuestChannel) -> None:
        """Step until the domain is destroyed (the agent kills this process) or its
        hypervisor goes (the agent's end closes): then preserve and stop."""
        try:
            self._run(chan)
        except (OSError, RuntimeError, TimeoutError, PvmigError):
            # (a send into the closed channel; a xenstore request nobody will answer)
            if not chan.closed():
                raise
        self.preserve()

    def _run(self, chan: GuestChannel) -> None:
        next_tick = time.monotonic()
        waitables = [chan] + ([self.devices] if self.devices is not None else [])
        while True:
            ready, _, _ = select.select(waitables, [], [],
                                        max(0.0, next_tick - time.monotonic()))
            if chan in ready:
                msg = chan.recv()
                if msg is None or not self.handle(msg, chan):
                    return
                continue
            if self.devices is not None:
                self.devices.service()
                if self.devices.suspend_requested:
                    if not self.suspend(chan, rid=0):
                        return
                    continue
            if time.monotonic() >= next_tick:
                self.step()
                next_tick = max(next_tick + TICK_S, time.monotonic())

    def preserve(self) -> None:
        """The hypervisor is gone: quiesce (if not suspended already) and leave the vCPU
        context beside the RAM, where the agent's next start resumes it from, as a
        hypervisor that keeps its domains across a restart of its dom0 (Xen's live
        update) does. Nothing in flight is lost: the frontends replay it."""
        if self.preserve_to is None:
            return
        if self.devices is not None and not self.suspended:
            self.devices.quiesce_alone()
        tmp = f"{self.preserve_to}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.vcpu_context())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.preserve_to)
        print(f"hypervisor gone: vCPU context preserved in {self.preserve_to}", flush=True)

    def suspend(self, chan: GuestChannel, rid: int) -> bool:
        """Quiesce, make the suspend hypercall (hand over the vCPU context), and wait:
        a cancelled suspend goes on here. False when the guest must stop (the channel
        closed: its agent is gone; a destroy kills the process instead)."""
        if self.devices is not None:
            self.devices.suspend()
        self.suspended = True
        chan.send({"op": "suspended", "id": rid, "vcpu": self.vcpu_context(),
                   "t": time.monotonic_ns()})
        while True:
            request = chan.recv()
            if request is None:
                return False
            if request.get("op") == "resume-cancelled":
                break
            chan.send({"op": "error", "id": request.get("id", 0),
                       "error": f"suspended: cannot {request.get('op')!r}"})
        self.suspended = False
        self.resumed()
        if self.devices is not None:
            self.devices.resume_in_place()
        chan.send({"op": "resumed", "id": request.get("id", 0), "t": time.monotonic_ns()})
        return True

    def set_workload(self, msg: dict) -> dict:
        """What its administrator asks of the guest (a scenario's workload change): the
        new rates go into its own info page, so that they move with its RAM and the next
        host's guest goes on at them. Answers the rates now in force."""
        with self.vm.writing(0):
            info = self.work.info
            if msg.get("dirty_rate") is not None:
                info["dirty_rate"] = float(msg["dirty_rate"])
            if msg.get("io_rate") is not None and int(info[0]["blk_blocks"]):
                info["blk_io_rate"] = float(msg["io_rate"])
        if self.devices is not None and self.devices.work is not None:
            self.devices.work.rate = float(info[0]["blk_io_rate"])
        return {"dirty_rate": float(info[0]["dirty_rate"]),
                "io_rate": float(info[0]["blk_io_rate"])}

    def handle(self, msg: dict, chan: GuestChannel) -> bool:
        """Answer one request from the agent; False when the guest must stop."""
        op, rid = msg.get("op"), msg.get("id", 0)
        if op == "suspend":
            return self.suspend(chan, rid)
        if op == "ping":
            chan.send({"op": "pong", "id": rid})
            return True
        if op == "workload":
            chan.send({"op": "workload-set", "id": rid, **self.set_workload(msg)})
            return True
        chan.send({"op": "error", "id": rid, "error": f"unknown request {op!r}"})
        return True


def _rng_state_out(state: dict) -> dict:
    # msgpack holds 64-bit integers; PCG64's state is 128-bit.
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def _rng_state_in(state: dict) -> dict:
    return {**state, "state": {k: int(v) for k, v in state["state"].items()}}

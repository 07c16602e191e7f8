"""python -m guest: the guest process, started by its host agent.

    python -m guest boot    --ram PATH --dirty PATH --fd N --config JSON
    python -m guest restore --ram PATH --dirty PATH --fd N [--lazy]

`boot` lays out a fresh domain; `restore` waits, already loaded, for the vCPU context
that resumes a migrated one (started during prepare so that resume costs no start-up).
With --lazy (post-copy) its memory arrives after it resumes: it registers its RAM with
userfaultfd and hands the descriptor to its agent, which places each page it blocks on.

A running guest outlives a crash of its agent (dom0), as Xen's domains do: when the
channel closes it quiesces and writes its vCPU context to --preserve, and the agent's
next start resumes it from there (pvmig.host.parking). A destroyed domain's process is
killed; a guest still waiting to be resumed has nothing to keep and just ends.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from pvmig.errors import PvmigError
from pvmig.hv import userfault
from pvmig.hv.hypercall import GuestChannel
from pvmig.hv.logdirty import DirtyLog
from pvmig.hv.memory import GuestMemory
from pvmig.pv.recovery import Recovery

from .devices import GuestDevices
from .kernel import Kernel
from .memapi import VcpuMemory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guest")
    p.add_argument("mode", choices=["boot", "restore"])
    p.add_argument("--ram", required=True)
    p.add_argument("--dirty", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--gnttab", required=True, help="the hypervisor's grant table file")
    p.add_argument("--evtchn", required=True, help="the hypervisor's event channel file")
    p.add_argument("--evfd", type=int, required=True, help="the event channel socket")
    p.add_argument("--domid", type=int, required=True, help="this domain's id on this host")
    p.add_argument("--config", default="{}")
    p.add_argument("--preserve", help="where the vCPU context goes if the agent dies")
    p.add_argument("--lazy", action="store_true",
                   help="restore: memory arrives after resume (post-copy); a frame not "
                        "yet here blocks whoever reads it until the agent places it")
    args = p.parse_args(argv)
    chan = GuestChannel(socket.socket(fileno=args.fd))
    vm = VcpuMemory(GuestMemory.open(args.ram, populate=not args.lazy),
                    DirtyLog.open(args.dirty))
    devices = lambda rng: GuestDevices(vm, chan, gnttab=args.gnttab, evtchn=args.evtchn,  # noqa: E731
                                       evfd=args.evfd, domid=args.domid, rng=rng)
    if args.mode == "boot":
        try:
            kernel = Kernel.boot(vm, json.loads(args.config))
            kernel.devices = devices(kernel.rng)
            kernel.devices.connect(moved=False)
            chan.send({"op": "booted", "t": time.monotonic_ns()})
        except (OSError, RuntimeError, TimeoutError, PvmigError):
            if chan.closed():  # the agent died before the domain was whole: nothing to keep
                print("hypervisor gone during boot", flush=True)
                return 1
            raise
    else:
        if args.lazy:
            # Before anything reads guest RAM: from here a frame not in the file faults
            # to the agent, which places it when it arrives.
            try:
                reg = userfault.register(vm.mem.mapping, vm.mem.ram_bytes)
            except userfault.Unsupported as e:
                chan.send({"op": "error", "error": f"post-copy: {e}"})
                return 1
            chan.send_fd({"op": "waiting", "base": reg.base}, reg.fd)
        else:
            chan.send({"op": "waiting"})
        msg = chan.recv()
        if msg is None:
            return 0
        rid = msg.get("id", 0)
        if msg.get("op") != "resume":
            chan.send({"op": "error", "id": rid,
                       "error": f"expected resume, got {msg.get('op')!r}"})
            return 1
        try:
            kernel = Kernel.restore(vm, msg["vcpu"])
        except ValueError as e:
            chan.send({"op": "error", "id": rid, "error": str(e)})
            return 1
        # Running from here: this is the first step on the new host.
        kernel.preserve_to = args.preserve
        try:
            chan.send({"op": "resumed", "id": rid, "t": time.monotonic_ns()})
            kernel.devices = devices(kernel.rng)
            recovery = Recovery(msg.get("recovery", Recovery.REPLAY))
            kernel.devices.connect(moved=True, recovery=recovery)
        except (OSError, RuntimeError, TimeoutError, PvmigError):
            if not chan.closed():
                raise
            kernel.preserve()
            return 0
    kernel.preserve_to = args.preserve
    kernel.run(chan)
    return 0


if __name__ == "__main__":
    sys.exit(main())

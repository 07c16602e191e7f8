"""A domain's PV world on one host, as dom0 and the toolstack see it.

For each domain the host agent:
- introduces it to this host's xenstored once the guest names its xenstore event
  channel, and serves the xenstore ring in the guest's magic page (frame 1). xenstored
  writes that page as foreign memory: nothing marks it dirty, as in Xen;
- writes the device entries (the toolstack's job) and runs one backend per device,
  started at once and waiting in InitWait, on the source at boot and on the
  destination at prepare, before the guest arrives;
- asks the guest to suspend by writing control/shutdown = "suspend".
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from pvmig import errors
from pvmig.dom0.blkback import BlkBack
from pvmig.dom0.disk import DiskImage
from pvmig.dom0.netback import NetBack
from pvmig.dom0.toolstack import create_device
from pvmig.dom0.xenstored import RingServer, Xenstored
from pvmig.hv.evtchn import BackendPort
from pvmig.hv.foreign_writes import XENSTORED
from pvmig.hv.grant_table import GrantMode
from pvmig.pv import guestinfo
from pvmig.pv.content import block_pattern
from pvmig.pv.devlayout import (
    BlkArea,
    NetArea,
    read_blk_counters,
    read_blk_failures,
    read_net_counters,
)
from pvmig.pv.xenbus import BackendDevice, FrontendInfo, backend_path
from pvmig.pv.xenstore import XsRing

log = logging.getLogger(__name__)
DOM0 = 0


def normalise(config: dict) -> dict:
    """A device's configuration with its defaults, checked."""
    if config.get("kind", "vbd") == "vif":
        return {"kind": "vif", "devid": 0, "disk": "", **config}
    cfg = {"kind": "vbd", "devid": 0, "disk": "", "blocks": 256, "latency_ms": 0.0,
           "persistent": False, "grant_mode": GrantMode.MAP.value, "io_rate": 200.0,
           "fill": 0.0, **config}
    if cfg["kind"] != "vbd":
        raise errors.InvalidArgument(f"device kind {cfg['kind']!r}: use 'vbd' or 'vif'")
    if not cfg["disk"]:
        raise errors.InvalidArgument("a vbd needs a disk image path")
    if cfg["grant_mode"] not in set(GrantMode):
        raise errors.InvalidArgument(f"grant mode {cfg['grant_mode']!r}: use "
                                     + " or ".join(repr(m.value) for m in GrantMode))
    if not 0 < cfg["blocks"] <= 1 << 20:
        raise errors.InvalidArgument(f"a vbd has 1..{1 << 20} blocks, not {cfg['blocks']}")
    if cfg["latency_ms"] < 0 or cfg["io_rate"] < 0:
        raise errors.InvalidArgument("latency and I/O rate must be >= 0")
    if not 0.0 <= cfg["fill"] <= 1.0:
        raise errors.InvalidArgument(f"a disk's fill is a fraction of it, 0..1, not {cfg['fill']}")
    return cfg


def filled_blocks(cfg: dict) -> int:
    """The blocks a vbd is created with content in (its first ones)."""
    return int(cfg.get("fill", 0.0) * cfg["blocks"])


def provision(disk: DiskImage, n: int, chunk: int = 4096) -> None:
    """Blocks 0..n-1 at version 1, as the guest's writes would leave them."""
    for lo in range(0, n, chunk):
        blocks = np.arange(lo, min(lo + chunk, n), dtype=np.uint32)
        disk.write_rows(blocks, block_pattern(blocks, np.ones(len(blocks), np.uint32))
                        .view(np.uint8).reshape(len(blocks), -1))


def disk_path(disk: str, storage_dir: Path | None) -> Path:
    """A disk named by an absolute path is there on every host; one named by a relative
    path lives under this host's storage directory."""
    path = Path(disk)
    if path.is_absolute():
        return path
    if storage_dir is None:
        raise errors.InvalidArgument(
            f"disk {disk!r} is a relative path and this agent has no --storage-dir "
            "to find it under: give the agent one, or the disk an absolute path")
    return storage_dir / path


class DomainDevices:
    def __init__(self, xenstored: Xenstored, dom, configs: list[dict], *,
                 fresh_disks: bool, net_bind: str = "127.0.0.1", net_public: str = "",
                 storage_dir: Path | None = None) -> None:
        self.net_bind, self.net_public = net_bind, net_public
        self.netdevs: dict[int, BackendDevice] = {}
        self.xenstore_track = False
        self.xenstored = xenstored
        self.dom0 = xenstored.connect(DOM0)
        self.dom = dom
        self.configs = [normalise(c) for c in configs]
        self.loop = asyncio.get_running_loop()
        self.server: RingServer | None = None
        self.xs_port: BackendPort | None = None
        self.backends: dict[int, tuple[BlkBack, BackendDevice]] = {}
        self.disks = {c["devid"]: DiskImage(disk_path(c["disk"], storage_dir), c["blocks"],
                                            fresh=fresh_disks)
                      for c in self.configs if c["kind"] == "vbd"}
        if fresh_disks:  # a new domain: its disks as provisioned
            for c in self.configs:
                if c["kind"] == "vbd" and c["fill"]:
                    provision(self.disks[c["devid"]], filled_blocks(c))
        self.nets: dict[int, NetBack] = {}
        self.on_records = None  # backend_records() changed (the host keeps them)
        dom.on_xenstore = self.introduce
        dom.request_suspend = self.request_suspend

    @property
    def home(self) -> str:
        return f"/local/domain/{self.dom.domid}"

    # ---- xenstore

    def start(self) -> None:
        """Introduce the domain, write its entries, start its backends waiting (InitWait):
        at boot on the source, at prepare on the destination, before the guest comes."""
        self.xenstored.introduce(self.dom.domid, mfn=guestinfo.XENSTORE_FRAME, evtchn=0)
        self._toolstack_entries()

    def introduce(self, port: int) -> None:
        """The guest names its xenstore channel (at boot, and after each move)."""
        events = self.dom.events
        if self.xs_port is not None:
            events.unbind(self.xs_port)
        self.xs_port = events.bind_interdomain(port)
        conn = self.xenstored.connect(self.dom.domid)
        # A foreign mapping: untracked, unless the policy xenstore-track says otherwise.
        ring = XsRing(self.dom.mem.pages[guestinfo.XENSTORE_FRAME],
                      on_write=self._xenstore_written)
        handle = self.xs_port
        self.server = RingServer(conn, ring, lambda: events.notify(handle))
        conn.on_event = lambda: self.loop.call_soon(self.pump)
        events.on_event(handle, lambda _port: self.pump())

    def _xenstore_written(self, *_args) -> None:
        # Policy xenstore-track: log xenstored's writes into the page (Xen never does).
        if self.xenstore_track:
            self.dom.log.mark(guestinfo.XENSTORE_FRAME)
        if self.dom.journal is not None:
            self.dom.journal.write(guestinfo.XENSTORE_FRAME, XENSTORED)

    def set_policy(self, *, backend_log: bool, xenstore_track: bool) -> None:
        self.dom.grants.backend_log = backend_log
        self.xenstore_track = xenstore_track

    # ---- what the injection points (pvmig.migration.injector) do with the backends

    def hold_reads(self, writes: bool = False) -> list:
        """Every disk backend holds reads (and writes) back from now on (BlkBack.hold);
        the backends."""
        blks = [blk for blk, _dev in self.backends.values()]
        for blk in blks:
            blk.hold(writes)
        return blks

    def release_reads(self) -> None:
        """The held reads finish, as in backends nobody held back."""
        for blk, _dev in self.backends.values():
            blk.release()

    async def answer_in_flight(self, *, keep: frozenset = frozenset(),
                               log_rings: bool = False) -> int:
        """Every backend finishes what it has in flight at once (but requests whose
        buffer is in `keep`) and publishes the responses; with `log_rings`, the ring
        pages, which hold the responses, are logged (as if they were tracked pages).
        How many requests."""
        answered = 0
        for blk, _dev in self.backends.values():
            answered += await blk.answer_now(keep)
            if log_rings and blk.ring_frame is not None:
                self.dom.log.mark(blk.ring_frame)
        return answered

    def read_in_flight(self):
        """A read in flight: (its buffer frame, a callable that finishes it at once), or
        None."""
        for blk, _dev in self.backends.values():
            target = blk.answer_read_into()
            if target is not None:
                return target
        return None

    def set_grant_policy(self, *, grant_mode: str = "", persistent: str = "") -> None:
        """A migration's grant policies on every disk; ("", "") puts them back as the
        disks were created and negotiated (an aborted migration)."""
        disks = [(self.backends[c["devid"]][0], c) for c in self.configs
                 if c["kind"] == "vbd" and c["devid"] in self.backends]
        for blk, _cfg in disks:  # refuse before changing any
            blk.check_grant_policy(persistent)
        for blk, cfg in disks:
            blk.set_grant_policy(grant_mode=grant_mode or cfg["grant_mode"],
                                 persistent=persistent)

    def ring_frames(self) -> list[int]:
        return [blk.ring_frame for blk, _dev in self.backends.values()
                if blk.ring_frame is not None]

    def touch_watched_node(self) -> bool:
        """The toolstack touches a node the guest watches (control/shutdown), so that
        xenstored writes a watch event into the guest's ring page. Whether the page
        changed."""
        if self.server is None:
            return False
        before = self.dom.mem.pages[guestinfo.XENSTORE_FRAME].copy()
        self.dom0.write(f"{self.home}/control/shutdown", "")
        self.pump()
        return bool((self.dom.mem.pages[guestinfo.XENSTORE_FRAME] != before).any())

    async def quiesce(self) -> dict:
        """quiesce=backend: every backend stops and unmaps its grants (so that each
        writable mapping marks its frame before the final pass)."""
        finished = abandoned = unmapped = 0
        for blk, _dev in self.backends.values():
            f, a, u = await blk.quiesce()
            finished, abandoned, unmapped = finished + f, abandoned + a, unmapped + u
        for net in self.nets.values():
            if not net.closed:
                unmapped += len(net._maps)
                net.disconnect("quiesced")
        return {"finished": finished, "abandoned": abandoned, "unmapped": unmapped}

    def unquiesce(self) -> None:
        """A migration aborted after the quiesce: the guest stays, its backends come
        back on the same rings and channels (requests left unanswered are served)."""
        for blk, _dev in self.backends.values():
            if blk.closed == "quiesced" and blk.connection is not None:
                ring_ref, port = blk.connection
                blk.connect(ring_ref=ring_ref, port=port)
        for net in self.nets.values():
            if net.closed == "quiesced" and net.connection is not None:
                net.connect(**net.connection)

    def pump(self) -> None:
        if self.server is not None and not self.server.broken:
            self.server.pump()

    def _toolstack_entries(self) -> None:
        domid = self.dom.domid
        self.dom0.write(f"{self.home}/name", self.dom.name)
        self.dom0.write(f"{self.home}/control/shutdown", "")
        self.dom0.set_perms(f"{self.home}/control/shutdown", [(domid, "n")])
        for cfg in self.configs:
            if cfg["kind"] == "vbd":
                self._start_backend(cfg, self.disks[cfg["devid"]])
            else:
                self._start_netback(cfg)

    def request_suspend(self) -> None:
        self.dom0.write(f"{self.home}/control/shutdown", "suspend")

    # ---- backends

    def _start_backend(self, cfg: dict, disk: DiskImage) -> None:
        domid, devid = self.dom.domid, cfg["devid"]
        create_device(self.dom0, domid=domid, devtype="vbd", devid=devid,
                      backend_keys={"params": cfg["disk"], "sectors": cfg["blocks"] * 8})
        blk = BlkBack(domid=domid, devid=devid, grants=self.dom.grants, events=self.dom.events,
                      disk=disk, grant_mode=cfg["grant_mode"],
                      latency_s=cfg["latency_ms"] / 1e3)
        blk.on_broken = lambda why: self._device_failed(devid, "vbd", why)

        def connect(info: FrontendInfo) -> dict:
            blk.persistent = blk.negotiated = info.persistent
            blk.connect(ring_ref=info.ring_refs[0], port=info.event_channel)
            return {}

        def disconnect() -> None:
            blk.detach()  # at once: a reconnect may follow before the loop turns

        dev = BackendDevice(self.dom0, backend_path(domid, "vbd", devid),
                            features={"feature-persistent": int(cfg["persistent"]),
                                      "max-ring-page-order": 0},
                            connect=connect, disconnect=disconnect)
        dev.start()
        self.backends[devid] = (blk, dev)

    def _start_netback(self, cfg: dict) -> None:
        domid, devid = self.dom.domid, cfg["devid"]
        create_device(self.dom0, domid=domid, devtype="vif", devid=devid)
        net = NetBack(domid=domid, devid=devid, grants=self.dom.grants, events=self.dom.events,
                      bind=self.net_bind, public=self.net_public)
        net.on_broken = lambda why: self._device_failed(devid, "vif", why)
        net.on_peer = lambda: self.on_records() if self.on_records is not None else None
        net.open()

        def connect(info: FrontendInfo) -> dict:
            net.connect(tx_ref=int(info.keys["tx-ring-ref"]), rx_ref=int(info.keys["rx-ring-ref"]),
                        port=info.event_channel)
            self.loop.call_soon(net.announce)  # the gratuitous ARP: peers follow the guest
            return {}

        dev = BackendDevice(self.dom0, backend_path(domid, "vif", devid),
                            features={"feature-rx-copy": 1}, connect=connect,
                            disconnect=lambda: net.disconnect())
        dev.start()
        self.nets[devid] = net
        self.netdevs[devid] = dev

    def _device_failed(self, devid: int, kind: str, why: str) -> None:
        """A backend gave up on its frontend: tell it through xenbus (Closing)."""
        dev = (self.backends.get(devid, (None, None))[1] if kind == "vbd"
               else self.netdevs.get(devid))
        if dev is not None:
            dev._fatal(why)

    def backend_records(self) -> dict:
        """What backends hand over with the device state: the peers a vif has learnt."""
        return {f"vif{d}": {"peers": [list(p) for p in n.peers]} for d, n in self.nets.items()}

    def restore_backend_records(self, records: dict) -> None:
        for devid, net in self.nets.items():
            for peer in records.get(f"vif{devid}", {}).get("peers", []):
                if list(peer) not in [list(p) for p in net.peers]:
                    net.peers.append(list(peer))

    def stats(self) -> list[dict]:
        out = []
        info = self.dom.mem
        lay = guestinfo.view(info)[0]
        for cfg in self.configs:
            if cfg["kind"] == "vif":
                net = self.nets.get(cfg["devid"])
                lay = guestinfo.view(info)[0]
                guest = read_net_counters(info, NetArea.at(int(lay["net_first"]))) \
                    if int(lay["net_first"]) else {}
                out.append({"kind": "vif", "devid": cfg["devid"],
                            "served": net.stats.rx_packets if net else 0,
                            "refused": net.stats.tx_errors if net else 0,
                            "address": net.address() if net else "", "guest": guest})
                continue
            blk, _ = self.backends.get(cfg["devid"], (None, None))
            guest, failed = {}, []
            if int(lay["magic"]) == guestinfo.MAGIC and int(lay["dev_frames"]):
                area = BlkArea.at(int(lay["dev_first"]), cfg["blocks"])
                guest, failed = read_blk_counters(info, area), read_blk_failures(info, area)
            out.append({"kind": "vbd", "devid": cfg["devid"],
                        "served": blk.stats.served if blk else 0,
                        "refused": blk.stats.refused if blk else 0,
                        "in_flight": blk.stats.in_flight if blk else 0, "guest": guest,
                        "failed_frames": failed})
        return out

    async def close(self) -> None:
        if self.server is not None:
            self.server.conn.on_event = None
            self.server = None  # its ring views guest RAM: the memory must unmap
        self.dom.events.release(self.xs_port)
        self.xs_port = None
        for blk, dev in self.backends.values():
            dev.detach()
            await blk.disconnect("domain destroyed")
        self.backends.clear()
        for devid, net in self.nets.items():
            self.netdevs[devid].detach()
            net.close()
        self.nets.clear()
        if self.xenstored.is_introduced(self.dom.domid):
            self.xenstored.release(self.dom.domid)
        for path in (self.home, f"/local/domain/0/backend/vbd/{self.dom.domid}",
                     f"/local/domain/0/backend/vif/{self.dom.domid}"):
            try:
                self.dom0.rm(path)
            except errors.PvmigError:
                pass
        for disk in self.disks.values():
            disk.close()
        self.dom0.close()

"""The report of one migration: one JSON object. Where a figure means what QEMU's
query-migrate means, it has that name (total-time, setup-time, downtime, ...)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from pvmig import errors
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration.precopy import RoundStats
from pvmig.migration.verify import by_area, classify
from pvmig.pv.devlayout import MAX_FAILED

MAX_LISTED_FRAMES = 32


@dataclass
class Report:
    migration_id: str
    domain: str
    source: str
    dest: str
    source_agent: str = ""
    dest_agent: str = ""
    status: str = "completed"
    error: str | None = None
    committed: bool = False
    ram_bytes: int = 0
    total_time_s: float = 0.0
    setup_time_s: float = 0.0
    downtime_s: float | None = None
    downtime_uncertainty_s: float = 0.0
    expected_downtime_s: float = 0.0
    stop_reason: str = ""
    rounds: list[dict] = field(default_factory=list)
    memory: str | int | None = None
    differing_frames: list[int] = field(default_factory=list)
    differing_by_area: dict[str, int] = field(default_factory=dict)
    differing_by_class: dict[str, int] = field(default_factory=dict)
    differing_by_cause: dict[str, int] = field(default_factory=dict)
    differing_detail: list[dict] = field(default_factory=list)
    observed_frames: list[int] = field(default_factory=list)
    guest: dict | None = None
    devices: list[dict] = field(default_factory=list)
    net_peer: dict | None = None
    policies: dict = field(default_factory=dict)
    quiesce: dict | None = None
    compression: str = "none"
    transport: str = ""  # tcp or grpc: what the source agent used
    converged: bool | None = None  # stopped iterating because the rest fit the limit
    auto_converge: bool = False
    max_throttle: int = 0          # the highest vCPU throttle auto-converge applied, %
    injected: dict = field(default_factory=dict)  # a `pvmig peer`'s figures, when one was named
    abort_errors: list[str] = field(default_factory=list)
    recovered: str = ""   # the commit's answer lost: how it was settled (pvmig.migration.recovery)
    unrecovered: bool = False  # ... or that it could not be: pvmig recover, later
    postcopy: dict | None = None  # the post-copy phase, when the migration switched to it
    storage: dict | None = None  # migrate --copy-storage: the disks' copy
    intervention: dict | None = None  # a fleet's timeout or stall ended pre-copy early
    phases: dict[str, float] = field(default_factory=dict)  # ms from the start
    t0: float = 0.0
    _precopy_s: float = 0.0
    _differing: object = None  # (frames, areas, causes) until classify

    def mark(self, phase: str) -> None:
        """Note when a phase began, on the coordinator's clock."""
        self.phases[phase] = round((time.monotonic() - self.t0) * 1e3, 3)

    # ---- filled in by the coordinator

    def add_round(self, s: RoundStats, final: bool, blocks=None) -> None:
        """A memory round; with `blocks` (its pb.RoundStats, --copy-storage), the disk
        blocks it carried too, counted apart (s sums both, for the stop policy)."""
        b = blocks
        pages = s.dirty_pages - (b.dirty_blocks if b else 0)
        mem_bytes = s.bytes - (b.block_bytes if b else 0)
        self.rounds.append({
            "round": s.round, "final": final, "pages": pages,
            "normal-pages": s.sent_pages - (b.sent_blocks if b else 0),
            "zero-pages": s.zero_pages - (b.zero_blocks if b else 0), "bytes": mem_bytes,
            "duration-ms": round(s.duration_s * 1e3, 3),
            "dirty-pages-rate": round(s.dirty_rate, 1),
            "remaining": s.remaining_pages - (b.remaining_blocks if b else 0),
            "mbps": round(s.bytes * 8 / 1e6 / s.duration_s, 1) if s.duration_s else 0.0})
        if b is not None:
            self.rounds[-1]["disk"] = _blocks(b)
            # the disks' first copy in memory's round 0 (--storage-with-memory)
            self._storage_sums(b, final, first=s.round == 0
                               and not self.storage["storage-rounds"])
        self._precopy_s += s.duration_s

    # ---- storage migration

    def start_storage(self, mode: str, devices) -> dict:
        vbds = [d for d in devices if d.kind == "vbd"]
        self.storage = {
            "mode": str(mode), "disks": [{"devid": d.devid, "disk": d.disk,
                                          "size-bytes": d.blocks * PAGE_SIZE} for d in vbds],
            "size-bytes": sum(d.blocks for d in vbds) * PAGE_SIZE, "bytes": 0,
            "blocks-sent": 0, "rounds": 0, "storage-rounds": [], "ready": None,
            "ready-ms": None, "final-blocks": None, "dirty-blocks-after-first": 0,
            "write-latency-ms": None, "mirrored-writes": 0, "mirrored-bytes": 0,
            "mirror-broken": "",
            "verdict": None, "source-image": None}
        return self.storage

    def add_storage_round(self, b, started_ms: float) -> None:
        r = {"round": b.round, "storage": True, "pages": b.dirty_blocks, **_blocks(b),
             "duration-ms": round(b.duration_ns / 1e6, 3), "started-ms": started_ms}
        if b.interrupted:
            r["interrupted"] = b.interrupted
        # the first copy: round 0, or its redo if it was interrupted (every block again)
        first = not any(not r.get("interrupted") for r in self.storage["storage-rounds"])
        self.storage["storage-rounds"].append(r)
        self._storage_sums(b, final=False, first=first)

    def _storage_sums(self, b, final: bool, first: bool = False) -> None:
        s = self.storage
        s["bytes"] += b.block_bytes
        s["blocks-sent"] += b.sent_blocks + b.zero_blocks
        s["rounds"] += 1 if b.dirty_blocks or first else 0
        if not first:
            s["dirty-blocks-after-first"] += b.dirty_blocks
        if final:
            s["final-blocks"] = b.dirty_blocks
        if b.writes:
            s["write-latency-ms"] = {"p50": round(b.write_p50_ns / 1e6, 3),
                                     "p99": round(b.write_p99_ns / 1e6, 3), "writes": b.writes}
        s["mirrored-writes"] = b.mirrored_writes
        s["mirrored-bytes"] = b.mirrored_bytes  # (so far: the last round's says all)
        s["mirror-broken"] = b.mirror_broken

    def set_storage_verdict(self, differing: np.ndarray | None, causes: np.ndarray,
                            removed: bool) -> None:
        """Blocks of the two images that differ at resume: each must be one blkback
        wrote after the final pass (its request is replayed at the destination)."""
        s = self.storage
        s["source-image"] = "removed" if removed else "kept"
        if differing is None:
            s["verdict"] = {"disks": "size-mismatch", "unexplained": None}
            return
        late = causes[differing] != 0 if len(causes) else np.zeros(len(differing), bool)
        s["verdict"] = {
            "disks": "identical" if not len(differing) else int(len(differing)),
            "differing-blocks": [int(b) for b in differing[:MAX_LISTED_FRAMES]],
            "written-after-final": int(late.sum()),  # replayed by the frontend there
            "unexplained": int((~late).sum()),
            "unexplained-blocks": [int(b) for b in differing[~late][:MAX_LISTED_FRAMES]]}

    def set_memory_verdict(self, differing: np.ndarray | None, shared=(),
                           causes: np.ndarray | None = None) -> None:
        """Which frames differ, and where: a frame that xenstored or a backend writes
        (the xenstore page, a ring, an I/O buffer) can differ because they go on
        writing after the final pass (the hazard pvmig studies); any other is lost."""
        if differing is None:
            self.memory = "size-mismatch"
            return
        if len(differing) == 0:
            self.memory = "identical"
            return
        self.memory = int(len(differing))
        self.differing_frames = [int(f) for f in differing[:MAX_LISTED_FRAMES]]
        areas = [(r.area, r.first, r.count) for r in shared]
        self.differing_by_area = by_area(differing, areas)
        self._differing = (differing, causes, areas)

    def classify(self) -> None:
        """Once the guest has run on the destination: each differing frame's class and
        cause, the frames the guest's checks named being the observed ones."""
        seen = {f["frame"] for f in (self.guest or {}).get("failures", [])}
        for d in self.devices:
            seen.update(d.get("failed-frames", []))
        self.observed_frames = sorted(seen)
        if self._differing is None:
            return
        v = classify(*self._differing, observed=seen)
        self.differing_by_class, self.differing_by_cause = v["by-class"], v["by-cause"]
        self.differing_detail = v["frames"]

    def set_devices(self, before, on_source, on_dest) -> None:
        """Per device: what the source's backend served, what was in flight at
        suspend and replayed on the destination (the guest's counters, which live in
        its RAM and go on across moves, taken before and after), and its checks."""
        first = {(d.kind, d.devid): dict(d.guest) for d in before}
        dest = {(d.kind, d.devid): d for d in on_dest}
        for s in on_source:
            d = dest.get((s.kind, s.devid))
            g0, g_dst = first.get((s.kind, s.devid), {}), dict(d.guest) if d else {}
            since = {k: v - g0.get(k, 0) for k, v in g_dst.items()}
            if s.kind == "vif":
                self.devices.append({
                    "kind": "vif", "devid": s.devid,
                    "packets-in-on-source": s.served, "packets-in-on-dest": d.served if d else 0,
                    "inflight-at-suspend": since.get("inflight_at_suspend", 0),
                    "dropped-at-resume": since.get("dropped_at_resume", 0),
                    "guest-checks": {"requests": since.get("requests", 0),
                                     "responses": since.get("responses", 0),
                                     "duplicates": since.get("duplicates", 0),
                                     # numbers never seen: requests the guest lost
                                     "unseen": max(0, g_dst.get("highest_seq", 0)
                                                   - (g_dst.get("requests", 0)
                                                      - g_dst.get("duplicates", 0))),
                                     "longest-gap": g_dst.get("longest_gap", 0)},
                    "address-on-dest": d.address if d else "",
                    "guest-totals": g_dst,
                })
                continue
            n0, n1 = (min(g.get("nr_failed_frames", 0), MAX_FAILED) for g in (g0, g_dst))
            self.devices.append({
                "kind": s.kind, "devid": s.devid,
                "served-on-source": s.served, "refused-on-source": s.refused,
                "failed-frames": list(d.failed_frames)[n0:n1] if d else [],
                "inflight-at-suspend": since.get("inflight_at_suspend", 0),
                "replayed-on-dest": since.get("replayed", 0),
                "trusted-old-ring": since.get("trusted_old_ring", 0),
                "served-on-dest": d.served if d else 0,
                "guest-checks": {"reads-checked": since.get("reads_checked", 0),
                                 "read-failures": since.get("read_failures", 0),
                                 "writes-acked": since.get("writes_acked", 0),
                                 "errors": since.get("errors", 0)},
                "guest-totals": g_dst,
            })

    def fail(self, err: errors.PvmigError, *, started: bool, committed: bool) -> None:
        self.status = "failed"
        self.committed = committed
        if self.recovered:
            where = f"settled: {self.recovered}"
        elif self.unrecovered:
            where = "not settled: run pvmig recover, as abort-errors says"
        elif committed:
            where = "after commit: the guest belongs to the destination"
        elif started:
            where = "before commit: aborted, the guest runs on the source"
        else:
            where = "nothing was changed on either host"
        self.error = f"{err} ({where})"

    # ---- verdicts

    @property
    def verified(self) -> bool:
        # Frames only the guest writes must be identical; the shared ones may differ
        # (written after the final pass), and the guest's checks say whether it saw it.
        memory_ok = self.memory == "identical" or (
            isinstance(self.memory, int) and "guest-only" not in self.differing_by_area)
        devices_ok = all(d["guest-checks"].get("read-failures", 0) == 0
                         and d["guest-checks"].get("errors", 0) == 0 for d in self.devices)
        storage_ok = self.storage is None or (self.storage["verdict"] is not None
                                              and self.storage["verdict"]["unexplained"] == 0)
        return (self.status == "completed" and memory_ok and devices_ok and storage_ok
                and self.guest is not None and self.guest["failed"] == 0
                and self.guest["sweeps"] >= 1)

    @property
    def transferred_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rounds) + (self.postcopy or {}).get("bytes", 0)

    def to_dict(self) -> dict:
        transferred = self.transferred_bytes
        ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
        return {
            "status": self.status,
            "committed": self.committed,
            "error": self.error,
            "migration-id": self.migration_id,
            "domain": self.domain,
            "source": self.source, "dest": self.dest,
            "source-agent": self.source_agent, "dest-agent": self.dest_agent,
            "ram-bytes": self.ram_bytes,
            "total-time-ms": ms(self.total_time_s),  # to resume, as QEMU's
            "verify-ms": (round(self.phases["done"] - self.phases["verify"], 3)
                          if "verify" in self.phases and "done" in self.phases else None),
            "setup-time-ms": ms(self.setup_time_s),
            "downtime-ms": ms(self.downtime_s),
            "downtime-uncertainty-ms": ms(self.downtime_uncertainty_s),
            "expected-downtime-ms": ms(self.expected_downtime_s),
            "stop-reason": self.stop_reason,
            "converged": self.converged,
            "auto-converge": {"enabled": self.auto_converge,
                              "max-throttle-percent": self.max_throttle},
            "transferred-bytes": transferred,
            "transferred-ratio": round(transferred / self.ram_bytes, 4) if self.ram_bytes else None,
            "zero-pages": sum(r["zero-pages"] for r in self.rounds),
            "normal-pages": sum(r["normal-pages"] for r in self.rounds),
            "normal-bytes": sum(r["normal-pages"] for r in self.rounds) * PAGE_SIZE,
            "dirty-sync-count": len(self.rounds),
            "compression": self.compression,
            "transport": self.transport or None,
            "mbps": round(transferred * 8 / 1e6 / self._precopy_s, 1) if self._precopy_s else 0.0,
            "rounds": self.rounds,
            "phases-ms": self.phases,
            "verification": {
                "memory": self.memory,
                "differing-frames": self.differing_frames,
                "differing-by-area": self.differing_by_area,
                "differing-by-class": self.differing_by_class,
                "differing-by-cause": self.differing_by_cause,
                "differing-detail": self.differing_detail,
                "observed-frames": self.observed_frames,
                "guest-checks": self.guest,
                "passed": self.verified,
            },
            "policies": self.policies,
            "quiesce": self.quiesce,
            "injected": self.injected,
            "devices": self.devices,
            "net-peer": self.net_peer,
            "abort-errors": self.abort_errors,
            "recovered": self.recovered or None,
            # QEMU's names: postcopy-requests, postcopy-blocktime (ms, summed over faults)
            "postcopy-requests": (self.postcopy or {}).get("requests"),
            "postcopy-blocktime": (self.postcopy or {}).get("blocktime-ms"),
            "postcopy": self.postcopy,
            "storage": self._storage_out(),
            "intervention": self.intervention,
        }

    def _storage_out(self) -> dict | None:
        if self.storage is None:
            return None
        s = dict(self.storage)
        s["bytes"] += s["mirrored-bytes"]  # the rounds' and the write-blocking writes'
        s["bytes-ratio"] = round(s["bytes"] / s["size-bytes"], 4) if s["size-bytes"] else None
        # blocks blkback dirtied per second, from the first copy's read of the log to the
        # final pass's (what the rounds after the first had to send)
        first = (s["storage-rounds"] or [r for r in self.rounds if r.get("disk")] or [None])[0]
        final_at = self.phases.get("final")
        if first is not None and final_at is not None and "started-ms" in first:
            span = (final_at - first["started-ms"]) / 1e3
            s["dirty-rate"] = round(s["dirty-blocks-after-first"] / span, 1) if span > 0 else None
        # the guest's writes blkback served from begin to the final pass, a second
        lat, begin_at = s["write-latency-ms"], self.phases.get("begin")
        if lat and final_at is not None and begin_at is not None and final_at > begin_at:
            s["writes-s"] = round(lat["writes"] / ((final_at - begin_at) / 1e3), 1)
        return s

    def write(self, path: str) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"  # whole, or nothing written
        with open(path, "w") as f:
            f.write(text)


def _blocks(b) -> dict:
    return {"blocks": b.dirty_blocks, "normal-blocks": b.sent_blocks,
            "zero-blocks": b.zero_blocks, "bytes": b.block_bytes,
            "remaining": b.remaining_blocks}

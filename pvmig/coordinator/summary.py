"""The few lines a person reads after a migration."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from pvmig.coordinator.report import Report


def headline(report: Report) -> str:
    d = report.to_dict()
    if report.status != "completed":
        return f"migration of {report.domain} FAILED: {report.error}"
    v = d["verification"]
    s = d["storage"]
    verdict = "verification passed" if v["passed"] else (
        f"VERIFICATION FAILED (memory: {v['memory']}, guest checks: {v['guest-checks']}"
        + (f", disks: {s['verdict']}" if s else "") + ")")
    disk = (f", disk {s['bytes'] / 2**20:.1f} MiB copied ({s['bytes-ratio']}x its size, "
            f"{s['mode']})" if s else "")
    return (f"migrated {report.domain} {report.source_agent or report.source} -> "
            f"{report.dest_agent or report.dest} in {d['total-time-ms'] / 1e3:.2f} s, "
            f"downtime {d['downtime-ms']:.1f} ms, {d['transferred-bytes'] / 2**20:.1f} MiB sent "
            f"({d['transferred-ratio']}x RAM) in {d['dirty-sync-count']} rounds{disk}; "
            f"{verdict}")


def table(report: Report) -> Table:
    d = report.to_dict()
    t = Table(title=f"migration {d['migration-id']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    g = d["verification"]["guest-checks"] or {}
    rows = [
        ("status", d["status"] + (f": {d['error']}" if d["error"] else "")),
        ("route", f"{d['source-agent']} ({d['source']}) -> {d['dest-agent']} ({d['dest']})"),
        ("guest RAM", f"{d['ram-bytes'] / 2**20:.0f} MiB"),
        ("total time", f"{(d['total-time-ms'] or 0):.1f} ms (setup {(d['setup-time-ms'] or 0):.1f} ms)"),
        ("downtime", "-" if d["downtime-ms"] is None else
         f"{d['downtime-ms']:.2f} ms ± {d['downtime-uncertainty-ms']:.2f} "
         f"(expected {d['expected-downtime-ms']:.2f} ms)"),
        ("rounds", f"{d['dirty-sync-count']} ({d['stop-reason']})"),
        ("sent", f"{d['transferred-bytes'] / 2**20:.1f} MiB = {d['transferred-ratio']}x RAM; "
                 f"{d['normal-pages']} pages, {d['zero-pages']} zero pages"),
        ("throughput", f"{d['mbps']:.0f} Mbit/s"),
        ("memory", str(d["verification"]["memory"])),
        *([("disks", f"{d['storage']['bytes'] / 2**20:.1f} MiB copied = "
                     f"{d['storage']['bytes-ratio']}x their size ({d['storage']['mode']}); "
                     f"{(d['storage']['verdict'] or {}).get('disks')}, source image "
                     f"{d['storage']['source-image']}")] if d["storage"] else []),
        ("guest checks", f"{g.get('run', 0)} run, {g.get('failed', 0)} failed, "
                         f"{g.get('sweeps', 0)} full sweeps since resume"),
        ("verdict", "[green]passed" if d["verification"]["passed"] else "[red]failed"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def print_summary(report: Report, tty: bool) -> None:
    if tty:
        Console().print(table(report))
    else:
        print(json.dumps({"event": "summary", "status": report.status,
                          "verified": report.verified, "error": report.error,
                          "headline": headline(report)}), flush=True)
    print(headline(report), file=sys.stderr)

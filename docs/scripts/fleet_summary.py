"""The summary of docs/scripts/fleet_study.sh's runs (docs/FLEET.md): a line per run,
then per caps the evacuation's time and the downtimes' spread; summary.json; and
downtime.png, each migration's downtime by caps.

    .venv/bin/python docs/scripts/fleet_summary.py OUT
"""
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1])
runs = []
for report in sorted(out.glob("caps-*/report.json")):
    r = json.loads(report.read_text())
    rows = r["migrations"]
    dts = [row["downtime-ms"] for row in rows]
    runs.append({
        "run": report.parent.name, "status": r["status"], "census-ok": r["census-ok"],
        "caps": f"{r['caps']['parallel-migrations']}/{r['caps']['parallel-outbound-per-host']}",
        "most-at-once": r["observed"]["most-at-once"],
        "within-caps": r["observed"]["within-caps"],
        "evacuation-s": round((max(row["ended-ms"] for row in rows)
                               - min(row["queued-ms"] for row in rows)) / 1e3, 2),
        "downtime-ms": [round(d, 1) for d in dts],
        "downtime-spread-ms": round(max(dts) - min(dts), 1),
        "total-s": [round(row["total-time-ms"] / 1e3, 2) for row in rows],
        "waited-s": [round(row["waited-ms"] / 1e3, 2) for row in rows],
        "sent-mib": [round(row["transferred-bytes"] / 2**20) for row in rows],
    })
by_caps: dict = {}
for run in runs:
    by_caps.setdefault(run["caps"], []).append(run)
caps_order = sorted(by_caps, key=lambda c: [-int(x) for x in c.split("/")])
per_caps = {}
for caps in caps_order:
    rs = by_caps[caps]
    dts = [d for r in rs for d in r["downtime-ms"]]
    per_caps[caps] = {
        "runs": len(rs), "migrations": len(dts),
        "evacuation-s-median": round(statistics.median(r["evacuation-s"] for r in rs), 2),
        "evacuation-s": [r["evacuation-s"] for r in rs],
        "downtime-ms-median": round(statistics.median(dts), 1),
        "downtime-ms-min": min(dts), "downtime-ms-max": max(dts),
        "downtime-spread-ms": round(max(dts) - min(dts), 1),
        "total-s-median": round(statistics.median(t for r in rs for t in r["total-s"]), 2),
        "sent-mib-median": statistics.median(m for r in rs for m in r["sent-mib"]),
        "all-clean": all(r["census-ok"] and r["status"] == "completed" and r["within-caps"]
                         for r in rs),
    }
(out / "summary.json").write_text(json.dumps({"runs": runs, "by-caps": per_caps},
                                             indent=1) + "\n")

print(f"{'run':<20} {'at once':>7} {'evac s':>7} {'downtime ms (each)':<24} {'spread':>7} "
      f"{'MiB sent (each)':<20} census")
for s in runs:
    print(f"{s['run']:<20} {s['most-at-once']:>7} {s['evacuation-s']:>7} "
          f"{' '.join(f'{d:.0f}' for d in s['downtime-ms']):<24} {s['downtime-spread-ms']:>7} "
          f"{' '.join(map(str, s['sent-mib'])):<20} {'clean' if s['census-ok'] else 'NOT'}")
print()
print(f"{'caps':<6} {'runs':>4} {'evac s (median)':>16} {'downtime median':>16} "
      f"{'min':>6} {'max':>6} {'spread':>7} {'total s':>8} {'MiB':>5} all clean")
for caps, p in per_caps.items():
    print(f"{caps:<6} {p['runs']:>4} {p['evacuation-s-median']:>16} "
          f"{p['downtime-ms-median']:>16} {p['downtime-ms-min']:>6.0f} "
          f"{p['downtime-ms-max']:>6.0f} {p['downtime-spread-ms']:>7} "
          f"{p['total-s-median']:>8} {p['sent-mib-median']:>5} {p['all-clean']}")

fig, ax = plt.subplots(figsize=(7, 4))
for i, caps in enumerate(caps_order):
    dts = [d for r in by_caps[caps] for d in r["downtime-ms"]]
    ax.scatter([i + (j % 4 - 1.5) * 0.06 for j in range(len(dts))], dts, s=18, alpha=0.8)
    ax.hlines(statistics.median(dts), i - 0.25, i + 0.25, color="black")
ax.set_xticks(range(len(caps_order)),
              [f"{c}\n(evacuation {per_caps[c]['evacuation-s-median']} s)" for c in caps_order])
ax.set_xlabel("caps: parallel_migrations / parallel_outbound_per_host")
ax.set_ylabel("downtime ms (each migration; bar: median)")
ax.set_title("Evacuating 4 x 256 MiB busy guests through one 1 Gbit/s uplink",
             fontsize="small")
fig.tight_layout()
fig.savefig(out / "downtime.png", dpi=110)
print(f"wrote {out / 'summary.json'}, {out / 'downtime.png'}")

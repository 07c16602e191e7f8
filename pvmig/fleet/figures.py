"""A fleet report's figures (a scenario's, an evacuation's): PNGs for a study.

    timeline.png    top: the queue over time (moves waiting, moves under way, the cap);
                    below: one bar per migration, its wait (light) and its run, each
                    labelled with its downtime; the scenario's steps as dashed lines
    migrations.png  per migration: downtime, total time, and MiB sent

All times are on the fleet runner's clock, from its start.
"""

from __future__ import annotations

from pathlib import Path


def draw(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.get("migrations", [])
    title = result.get("scenario") or result.get("operation", "fleet")
    written = []

    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 3 + 0.35 * max(len(rows), 4)),
        gridspec_kw={"height_ratios": [1, max(1.0, len(rows) / 6)]})
    queue = result.get("queue", [])
    if queue:
        t = [q["t-ms"] / 1e3 for q in queue]
        top.step(t, [q["queued"] for q in queue], where="post", label="queued")
        top.step(t, [q["migrating"] for q in queue], where="post", label="migrating")
    cap = result.get("caps", {}).get("parallel-migrations")
    if cap:
        top.axhline(cap, color="grey", linestyle=":", label=f"cap {cap}")
    top.set_ylabel("migrations")
    top.legend(loc="upper right", fontsize="small")
    top.set_title(f"{title}: the queue, and each migration (colour: its source; "
                  "dashed: the steps)", fontsize="small", pad=14)
    hosts = sorted({r["source"] for r in rows})
    colors = {h: f"C{i % 10}" for i, h in enumerate(hosts)}
    for i, r in enumerate(rows):
        q, s, e = (r.get(k) for k in ("queued-ms", "started-ms", "ended-ms"))
        if s is not None:
            bottom.barh(i, (s - q) / 1e3, left=q / 1e3, color="lightgrey")
        if s is not None and e is not None:
            bottom.barh(i, (e - s) / 1e3, left=s / 1e3, color=colors[r["source"]],
                        hatch="" if r["state"] == "completed" else "//")
            dt = r.get("downtime-ms")
            bottom.text(e / 1e3, i, f" {dt:.0f} ms" if dt is not None else f" {r['state']}",
                        va="center", fontsize="x-small")
    bottom.set_yticks(range(len(rows)),
                      [f"{r['domain']} {r['source']}->{r['dest']}" for r in rows],
                      fontsize="x-small")
    bottom.invert_yaxis()
    bottom.set_xlabel("s from the start (grey: waiting for the caps)")
    for step in result.get("steps", []):
        for ax in (top, bottom):
            ax.axvline(step["started-ms"] / 1e3, color="black", linestyle="--",
                       linewidth=0.6, alpha=0.5)
        top.text(step["started-ms"] / 1e3, top.get_ylim()[1], f"{step['step']}",
                 fontsize="x-small", va="bottom")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "timeline.png"))
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(max(6, 0.6 * len(rows) + 3), 7))
    names = [f"{r['domain']}\n{r['source']}->{r['dest']}" for r in rows]
    for ax, key, scale, label in (
            (axes[0], "downtime-ms", 1.0, "downtime ms"),
            (axes[1], "total-time-ms", 1e-3, "total s"),
            (axes[2], "transferred-bytes", 1 / (1 << 20), "MiB sent")):
        values = [(r.get(key) or 0) * scale for r in rows]
        ax.bar(range(len(rows)), values, color=[colors[r["source"]] for r in rows])
        ax.set_ylabel(label)
    caps = result.get("caps", {})
    axes[0].set_title(f"{title}: per migration (caps: {caps.get('parallel-migrations')} at "
                      f"once, {caps.get('parallel-outbound-per-host')} from one host)",
                      fontsize="small")
    axes[2].set_xticks(range(len(rows)), names, fontsize="x-small")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "migrations.png"))
    plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path

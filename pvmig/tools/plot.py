"""`pvmig plot REPORT.json`: one migration's timeline as a PNG.

Top: the pages each round sent (bars spanning the round) and the dirty rate the source
measured before it; bottom: the bandwidth of each round and, when auto-converge acted,
the vCPU throttle. The downtime window (suspend to resume, on the coordinator's clock)
is shaded on both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pvmig import errors


def load(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read report {path}: {e.strerror}") from None
    except ValueError as e:
        raise errors.InvalidArgument(f"{path} is not JSON: {e}") from None
    if not isinstance(report, dict) or not report.get("rounds"):
        raise errors.InvalidArgument(f"{path} is not a pvmig migrate report with rounds")
    return report


def timeline(report: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    phases = report.get("phases-ms", {})
    starts = [r["started-ms"] if "started-ms" in r else _guess_start(rounds, i, phases)
              for i, r in enumerate(rounds)]
    widths = [max(r["duration-ms"], 0.5) for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    colors = ["tab:red" if r["final"] else "tab:blue" for r in rounds]
    top.bar(starts, [r["pages"] for r in rounds], width=widths, align="edge",
            color=colors, alpha=0.7, label="pages sent (red: final pass)")
    top.set_ylabel("pages")
    rate = top.twinx()
    rate.plot([s + w for s, w in zip(starts, widths)],
              [r["dirty-pages-rate"] for r in rounds], "o-", color="tab:orange",
              label="dirty rate (pages/s)")
    rate.set_ylabel("dirty pages/s")
    bottom.step([s for s in starts] + [starts[-1] + widths[-1]],
                [r["mbps"] for r in rounds] + [rounds[-1]["mbps"]], where="post",
                color="tab:green", label="bandwidth (Mbit/s)")
    bottom.set_ylabel("Mbit/s")
    bottom.set_xlabel("ms since the migration began")
    throttles = [r.get("throttle-percent", 0) for r in rounds]
    if any(throttles):
        th = bottom.twinx()
        th.step(starts, throttles, where="post", color="tab:purple",
                label="vCPU throttle (%)")
        th.set_ylabel("throttle %")
        th.set_ylim(0, 100)
    if "suspend" in phases and "resumed" in phases:
        for ax in (top, bottom):
            ax.axvspan(phases["suspend"], phases["resumed"], color="grey", alpha=0.3,
                       label="downtime window")
    post = report.get("postcopy")
    if post and "postcopy-active" in phases and "postcopy-done" in phases:
        # the guest runs at the destination while its memory follows it
        for ax in (top, bottom):
            ax.axvspan(phases["postcopy-active"], phases["postcopy-done"], color="tab:cyan",
                       alpha=0.2, label=f"post-copy: {post['pushed-pages']} pushed, "
                       f"{post['requested-pages']} asked for")
        pace = (post.get("guest-progress") or {}).get("during") or []
        if pace:
            steps = bottom.twinx()
            steps.plot([t for t, _ in pace], [r for _, r in pace], ".-", color="tab:brown",
                       label="guest steps/s")
            steps.set_ylabel("guest steps/s")
    down = report.get("downtime-ms")
    fig.suptitle(f"{report.get('domain', '?')}: {report.get('source-agent', '')} -> "
                 f"{report.get('dest-agent', '')}, {len(rounds)} rounds"
                 f"{', post-copy' if post else ''}, downtime "
                 f"{down if down is not None else '?'} ms")
    for ax in (top, bottom):
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, loc="upper left", fontsize="small")
    rate.legend(loc="center left", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _guess_start(rounds: list[dict], i: int, phases: dict) -> float:
    """Reports before round start times were kept: pre-copy rounds back to back, ending
    where the coordinator decided to stop; the final pass where it began."""
    if rounds[i]["final"] and "final" in phases:
        return phases["final"]
    end = phases.get("stop-and-copy", sum(r["duration-ms"] for r in rounds if not r["final"]))
    return end - sum(r["duration-ms"] for r in rounds[i:] if not r["final"])


def bench_figures(out: dict, directory: Path) -> list[Path]:
    """`pvmig bench`'s comparison: throughput of pvmig's idle guest against the raw-TCP
    ceiling and QEMU, per RAM size; downtime (median and p95) per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    sizes = out["sizes"]
    labels = [f"{s['ram-mb']} MiB" for s in sizes]
    series = {"raw TCP (ceiling)": [s["ceiling"]["gib-s"] for s in sizes],
              "bare gRPC (ceiling)": [s.get("grpc-ceiling", {}).get("gib-s") for s in sizes],
              "pvmig (idle guest, round 0)": [_idle(s) for s in sizes],
              "QEMU single stream": [_qemu(s, 0, True) for s in sizes],
              "QEMU 2 multifd": [_qemu(s, 2, True) for s in sizes],
              "QEMU single, RAM faulted in": [_qemu(s, 0, False) for s in sizes]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(sizes))]
        ax.bar(xs, [v or 0 for v in values], width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], labels)
    ax.set_ylabel("GiB/s")
    ax.set_title("Migration throughput against its ceiling and QEMU (same run)")
    tput = _save(fig, ax, directory / "bench-throughput.png")

    cells = [(f"{s['ram-mb']}M {c['dirty']}/{c['devices']}"
              + (f"/{c['cap-mbps']:g}M" if c["cap-mbps"] else "")
              + ("/ac" if c["auto-converge"] else ""), c)
             for s in sizes for c in s["cells"] if c["downtime-ms-median"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(cells) + 1.5))
    ys = range(len(cells))
    ax.barh([y + 0.2 for y in ys], [c["downtime-ms-p95"] for _, c in cells], height=0.4,
            label="p95", color="tab:orange")
    ax.barh([y - 0.2 for y in ys], [c["downtime-ms-median"] for _, c in cells], height=0.4,
            label="median", color="tab:blue")
    ax.set_yticks(list(ys), [n for n, _ in cells], fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel("downtime, ms (log)")
    down = _save(fig, ax, directory / "bench-downtime.png")
    return [tput, down]


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _idle(size: dict) -> float | None:
    return next((c["round0-gib-s-median"] for c in size["cells"]
                 if c["dirty"] == "idle" and c["devices"] == "idle"), None)


def _qemu(size: dict, channels: int, prealloc: bool) -> float | None:
    return next((q["throughput-gib-s"] for q in size["qemu"]
                 if q.get("multifd-channels") == channels and q.get("prealloc") == prealloc
                 and "error" not in q), None)

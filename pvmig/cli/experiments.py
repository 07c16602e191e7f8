"""The experiments' commands: peer, verify, matrix, bench, plot, demo."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pvmig import errors
from pvmig.cli.common import EXIT_FAILED, EXIT_OK, run
from pvmig.migration.verify import verify_images
from pvmig.tools import matrix_postcopy
from pvmig.tools.bench import run_bench
from pvmig.tools.demo import run_demo
from pvmig.tools.matrix import run_matrix
from pvmig.tools.peer import run_peer
from pvmig.tools.plot import load, timeline


def register(sub, auth) -> None:
    pe = sub.add_parser("peer", help="talk to a guest's network service from outside, "
                        "and measure loss, duplicates and the longest outage")
    pe.add_argument("--guest", required=True, metavar="HOST:PORT",
                    help="the guest's address (its vif's, from `pvmig domain show`)")
    pe.add_argument("--rate", type=float, default=200.0, help="requests per second")
    pe.add_argument("--duration", type=float, default=10.0, metavar="S",
                    help="how long to send (0: until SIGINT or SIGTERM); what is "
                    "outstanding then is still waited for")
    pe.add_argument("--give-up", type=float, default=2.0, metavar="S",
                    help="how long a request is retransmitted before it counts as lost")
    pe.add_argument("--until-announced", type=int, default=0, metavar="N",
                    help="stop sending once answered after N announcements (the guest "
                    "moved N times and the peer followed); 0: never")
    pe.add_argument("--stats", type=Path, metavar="FILE",
                    help="keep the running figures here (JSON, rewritten 5 times a second)")
    pe.set_defaults(func=peer)

    v = sub.add_parser("verify", help="compare two saved memory images frame by frame "
                       "and say where they differ")
    v.add_argument("source", type=Path, help="the source's memory at the end")
    v.add_argument("dest", type=Path, help="the destination's memory at resume")
    v.add_argument("--report", type=Path, metavar="FILE",
                   help="the migration's JSON report: the frames the guest's checks named "
                   "after resume become the observed ones")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=verify)

    mx = sub.add_parser("matrix", help="run the policies against each other on busy guests "
                        "and tabulate corruptions, undefined frames and downtime")
    mx.add_argument("--full", action="store_true",
                    help="every combination (default: a quick subset of 8 cells)")
    mx.add_argument("--postcopy", action="store_true",
                    help="post-copy's cells instead: the block and the network backend "
                    "against --postcopy-dom0 demand and unsafe")
    mx.add_argument("--runs", type=int, default=3, metavar="N", help="migrations per cell")
    mx.add_argument("--json", type=Path, metavar="FILE")
    mx.add_argument("--markdown", type=Path, metavar="FILE")
    mx.set_defaults(func=matrix)

    be = sub.add_parser("bench", help="migrations over a grid (RAM, dirty rate, devices, "
                        "bandwidth cap), against the raw-TCP ceiling and QEMU, in one run")
    be.add_argument("--quick", action="store_true",
                    help="256 MiB only: all written over each transport and under TLS, "
                    "and busy (about a minute)")
    be.add_argument("--runs", type=int, default=3, metavar="N",
                    help="migrations per cell (the 1 GiB busy cell runs at least 10)")
    be.add_argument("--ram-mb", type=int, action="append", metavar="MIB",
                    help="only these RAM sizes of the grid (repeat)")
    be.add_argument("--cell", action="append", metavar="TEXT",
                    help="only the cells whose name holds TEXT, e.g. \"all written\" or "
                    "\"limit 5 ms\" (repeat: any of them)")
    be.add_argument("--peer", choices=["none", "qemu"], default="none",
                    help="qemu: QEMU's own migration of a paused guest of the same size "
                    "and content, beside pvmig's")
    be.add_argument("--json", type=Path, metavar="FILE")
    be.add_argument("--markdown", type=Path, metavar="FILE")
    be.add_argument("--plots", type=Path, metavar="DIR", help="write the comparison PNGs here")
    be.set_defaults(func=bench)

    pl = sub.add_parser("plot", help="a migration's timeline as a PNG: pages and dirty rate "
                        "per round, bandwidth, throttle, the downtime window, post-copy and the "
                        "guest's pace across it")
    pl.add_argument("report", type=Path, help="a `pvmig migrate --report` JSON")
    pl.add_argument("-o", "--output", type=Path, help="the PNG (default: REPORT.png)")
    pl.set_defaults(func=plot)

    dm = sub.add_parser("demo", help="two agents on loopback, a busy guest, a migration")
    dm.add_argument("--ram-mb", type=int, default=256)
    dm.add_argument("--dirty-rate", type=float, default=5000.0)
    dm.add_argument("--report", type=Path, metavar="FILE")
    dm.set_defaults(func=demo)


def peer(args) -> int:
    if not args.rate > 0 or not args.give_up > 0 or not args.duration >= 0:
        raise errors.InvalidArgument("--rate and --give-up must be > 0, --duration >= 0")
    if args.until_announced < 0:
        raise errors.InvalidArgument("--until-announced must be >= 0")
    stats = run(run_peer(args.guest, rate=args.rate, duration_s=args.duration,
                         stats_file=args.stats, give_up_s=args.give_up,
                         until_announced=args.until_announced))
    print(json.dumps(stats))
    return EXIT_OK if stats["lost"] == 0 else EXIT_FAILED


def verify(args) -> int:
    observed = observed_frames(args.report) if args.report else ()
    result = verify_images(args.source, args.dest, observed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['frames']} frames: " + (
            "identical" if not result["differing"] else f"{result['differing']} differ"))
        for what in ("area", "class", "cause"):
            counts = result[f"differing-by-{what}"]
            if counts:
                print(f"  by {what}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for f in result["differing-frames"][:16]:
            print(f"  frame {f['frame']}: {f['area']}, {f['class']}, {f['cause']}")
    bad = result["differing-by-class"]
    return EXIT_FAILED if bad.get("lost") or bad.get("observed") else EXIT_OK


def observed_frames(path: Path) -> list[int]:
    try:
        report = json.loads(path.read_text())
        return [int(f) for f in report["verification"]["observed-frames"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.InvalidArgument(
            f"{path}: not a pvmig migrate report with observed frames ({e})") from None


def matrix(args) -> int:
    if args.runs < 1:
        raise errors.InvalidArgument("--runs must be >= 1")
    logging.getLogger().setLevel(logging.WARNING)
    if args.postcopy:
        if args.full:
            raise errors.InvalidArgument("--postcopy has one set of cells: not with --full")
        return matrix_postcopy.run(runs=args.runs, json_path=args.json, md_path=args.markdown,
                                   command=f"pvmig matrix --postcopy --runs {args.runs}")
    command = "pvmig matrix" + (" --full" if args.full else "") + f" --runs {args.runs}"
    return run_matrix(full=args.full, runs=args.runs, json_path=args.json,
                      md_path=args.markdown, command=command)


def bench(args) -> int:
    if args.runs < 1:
        raise errors.InvalidArgument("--runs must be >= 1")
    logging.getLogger().setLevel(logging.WARNING)
    command = "pvmig bench" + (" --quick" if args.quick else "") + f" --runs {args.runs}" + \
        "".join(f" --ram-mb {m}" for m in args.ram_mb or []) + \
        "".join(f" --cell '{c}'" for c in args.cell or []) + \
        (" --peer qemu" if args.peer == "qemu" else "")
    out = run_bench(quick=args.quick, runs=args.runs, peer_qemu=args.peer == "qemu",
                    json_path=args.json, md_path=args.markdown, plots=args.plots,
                    command=command, ram_sizes=args.ram_mb, only=args.cell)
    failed = [c for s in out["sizes"] for c in s["cells"] if c["errors"]]
    return EXIT_FAILED if failed else EXIT_OK


def plot(args) -> int:
    out = timeline(load(args.report), args.output or args.report.with_suffix(".png"))
    print(f"wrote {out}")
    return EXIT_OK


def demo(args) -> int:
    return run_demo(ram_mb=args.ram_mb, dirty_rate=args.dirty_rate, report_path=args.report)

"""`pvmig evacuate`, `pvmig rebalance` and `pvmig scenario`: a fleet's domains moved
under its caps."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from pvmig import errors
from pvmig.cli.common import EXIT_FAILED, EXIT_OK, run
from pvmig.cli.migrate import check_writable
from pvmig.fleet import config, display, figures, operation, scenario


def register(sub, auth) -> None:
    e = sub.add_parser("evacuate", help="move every domain off a host of the fleet, placed "
                       "by free RAM and the policies' labels, under the fleet's caps",
                       parents=[auth])
    e.add_argument("host", help="the host to empty: its name in the fleet file, or its "
                   "address")
    _common(e)
    e.set_defaults(func=evacuate)
    r = sub.add_parser("rebalance", help="even the hosts' RAM: move domains from the "
                       "fullest hosts to the emptiest, under the fleet's caps", parents=[auth])
    _common(r)
    r.set_defaults(func=rebalance)
    s = sub.add_parser("scenario", help="play a timeline of domain creations, workload "
                       "changes, migrations and evacuations on a fleet; report and plots")
    ssub = s.add_subparsers(dest="action", required=True)
    sr = ssub.add_parser("run", help="play the scenario against its fleet's agents",
                         parents=[auth])
    sr.add_argument("file", type=Path, help="the scenario (TOML; see docs/FLEET.md)")
    sr.add_argument("--out", type=Path, metavar="DIR",
                    help="where report.json, timeline.png and migrations.png go "
                    "(default: NAME-results beside the scenario file)")
    sr.add_argument("--no-plots", action="store_true", help="the report only")
    sr.set_defaults(func=scenario_run)
    sc = ssub.add_parser("check", help="check a scenario and its fleet file; run nothing")
    sc.add_argument("file", type=Path)
    sc.set_defaults(func=scenario_check)


def _common(p) -> None:
    p.add_argument("--fleet", required=True, type=Path, metavar="FILE",
                   help="the fleet file (TOML: agents, caps, policies; see docs/FLEET.md)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="write the operation's JSON report here")


def evacuate(args) -> int:
    return _operate(args, lambda op: op.evacuate(args.host), "evacuate")


def rebalance(args) -> int:
    return _operate(args, lambda op: op.rebalance(), "rebalance")


def _operate(args, start, kind: str) -> int:
    fleet = config.load(args.fleet)
    made = bool(args.report) and not args.report.exists()
    if args.report:
        check_writable(args.report)
    op = operation.Operation(fleet, kind, display.for_terminal)
    try:
        result = run(start(op))
    except BaseException:
        if made:  # (nothing was done: no empty report left to be read as one)
            args.report.unlink(missing_ok=True)
        raise
    if args.report:
        operation.write(result, args.report)
    out = Console()
    if op.runner is not None and op.runner.rows:
        out.print(display.table(op.runner.rows, f"{kind}: {result['status']}"))
    for u in result.get("unplaced", []):
        print(f"not moved: {u['domain']} ({u['ram-bytes'] >> 20} MiB): {u['why']}")
    seen = result["observed"]
    dt = result["downtime-ms"] or {}
    print(f"{kind}: {result['completed']} of {result['planned']} moved in "
          f"{result['total-time-ms'] / 1e3:.1f} s; downtime median {dt.get('median', '-')} "
          f"ms, max {dt.get('max', '-')} ms; at most {seen['most-at-once']} at once "
          f"(cap {fleet.parallel_migrations}), {max(seen['most-outbound'].values(), default=0)}"
          f" from one host (cap {fleet.parallel_outbound_per_host}); "
          f"census {'clean' if result['census-ok'] else 'NOT clean'}")
    if result["cancelled"]:
        print(f"pvmig: {kind} cancelled ({result['cancelled']}): what had not committed "
              "runs where it was", file=sys.stderr)
    if not result["census-ok"]:
        print("pvmig: a domain is not running exactly once: " + ", ".join(
            f"{d} on {[w['host'] + ':' + w['state'] for w in where]}"
            for d, where in result["census"].items()
            if len(where) != 1 or where[0]["state"] != "running"), file=sys.stderr)
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


def scenario_check(args) -> int:
    spec = scenario.load(args.file)
    print(f"{spec.path}: {len(spec.steps)} steps over {spec.steps[-1].at:g} s on "
          f"{len(spec.fleet.agents)} agents ({', '.join(spec.fleet.agents)}); "
          f"caps {spec.fleet.parallel_migrations} in all, "
          f"{spec.fleet.parallel_outbound_per_host} from one host")
    for step in spec.steps:
        print(f"  {step.at:8.2f} {step.title}{' (when idle)' if step.when_idle else ''}")
    return EXIT_OK


def scenario_run(args) -> int:
    spec = scenario.load(args.file)
    out = args.out or args.file.parent / f"{spec.name}-results"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.InvalidArgument(f"cannot make the output directory {out}: "
                                     f"{e.strerror}") from None
    made = not (out / "report.json").exists()
    check_writable(out / "report.json")
    play = scenario.Scenario(spec, display.for_terminal,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = run(play.run())
    except BaseException:
        if made:  # (an agent did not answer: nothing ran, no empty report to be read)
            (out / "report.json").unlink(missing_ok=True)
        raise
    operation.write(result, out / "report.json")
    written = [out / "report.json"]
    if not args.no_plots and result["migrations"]:
        written += figures.draw(result, out)
    dt = result["downtime-ms"] or {}
    seen = result["observed"]
    print(f"{spec.name}: {result['status']}: {len(result['steps'])} steps "
          f"({result['steps-failed']} failed), {result['completed']} of "
          f"{result['planned']} migrations completed in {result['total-time-ms'] / 1e3:.1f} "
          f"s; downtime median {dt.get('median', '-')} ms, max {dt.get('max', '-')} ms; "
          f"at most {seen['most-at-once']} at once (cap {spec.fleet.parallel_migrations}); "
          f"census {'clean' if result['census-ok'] else 'NOT clean'}")
    for step in result["steps"]:
        if step["error"]:
            print(f"pvmig: step {step['step']} ({step['action']}): {step['error']}",
                  file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED

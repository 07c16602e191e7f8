"""`pvmig migrate` and what goes with a migration: status, cancel, recover."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.cli.common import EXIT_FAILED, EXIT_OK, run
from pvmig.coordinator import migrate as coordinator
from pvmig.coordinator.progress import for_stream
from pvmig.coordinator.summary import print_summary
from pvmig.migration import injector, policy, recovery
from pvmig.migration.policy import (
    Compression,
    GrantMode,
    PersistentGrants,
    PostcopyDom0,
    Quiesce,
    Recovery,
    StorageMode,
    Transport,
    choices,
)
from pvmig.rpc.client import AgentClient


def register(sub, auth) -> None:
    m = sub.add_parser("migrate", help="live-migrate a domain from one agent to another",
                       parents=[auth])
    m.add_argument("--source", required=True, metavar="HOST:PORT")
    m.add_argument("--dest", required=True, metavar="HOST:PORT")
    m.add_argument("--domain", required=True)
    m.add_argument("--downtime-limit", type=float, default=policy.DOWNTIME_LIMIT_MS, metavar="MS")
    m.add_argument("--max-rounds", type=int, default=policy.MAX_ROUNDS, metavar="N")
    m.add_argument("--no-progress-rounds", type=int, default=policy.NO_PROGRESS_ROUNDS, metavar="N",
                   help="stop iterating when this many rounds in a row did not shrink "
                   "(0: never)")
    m.add_argument("--streams", type=int, default=0, metavar="N",
                   help=f"parallel page streams between the agents (default {policy.STREAMS})")
    m.add_argument("--batch-pages", type=int, default=0, metavar="N",
                   help=f"pages per batch (default {policy.DATA_BATCH_PAGES} on data channels, "
                   f"{policy.BATCH_PAGES} over gRPC)")
    m.add_argument("--verify-timeout", type=float, default=policy.VERIFY_TIMEOUT_S, metavar="S",
                   help="how long the resumed guest may take to check all its memory")
    m.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here")
    m.add_argument("--max-bandwidth", type=float, default=0.0, metavar="MBIT",
                   help="cap the page streams at this many Mbit/s in all (default: none)")
    m.add_argument("--auto-converge", action="store_true",
                   help="when rounds stop shrinking, throttle the guest's vCPU (20%%, then "
                   "+10%% each time, up to 99%%) until what is left fits the downtime limit")
    m.add_argument("--postcopy", action="store_true",
                   help="post-copy: suspend after setup, resume the guest at the "
                   "destination at once, and send its memory after it (each page once; a "
                   "page the guest touches first is asked for and sent ahead). Until every "
                   "page is there neither host holds the whole guest: a crash of either "
                   "loses it")
    m.add_argument("--postcopy-after-precopy", action="store_true",
                   help="hybrid: one pre-copy round (every page while the guest runs), "
                   "then the switch: only what the guest dirtied since follows it")
    m.add_argument("--postcopy-on-stall", action="store_true",
                   help="pre-copy, switching to post-copy where it would stop without "
                   "converging (the round cap, or no progress)")
    m.add_argument("--postcopy-dom0", choices=choices(PostcopyDom0), default="demand",
                   help="after the switch, dom0 (blkback, netback) reaching a frame that "
                   "has not arrived: demand waits for it (asked for first, as Xen's paging "
                   "makes a backend retry); unsafe goes through dom0's own mapping, where "
                   "the frame is a hole: a zero page the guest then sees (default: demand)")
    m.add_argument("--allow-postcopy", action="store_true",
                   help="prepare the destination for a switch asked later with pvmig "
                   "migrate-postcopy (as QEMU's postcopy-ram capability)")
    m.add_argument("--copy-storage", action="store_true",
                   help="copy the domain's disks to the destination's --storage-dir beside "
                   "its memory (no shared storage): every block, then the blocks blkback "
                   "writes meanwhile; the last of them in the final pass")
    m.add_argument("--storage-mode", choices=choices(StorageMode),
                   default=StorageMode.BACKGROUND.value,
                   help="with --copy-storage: background (rounds of the blocks written) or "
                   "write-blocking (once the first copy is done, a guest write is answered "
                   "only after both copies hold it)")
    m.add_argument("--storage-with-memory", action="store_true",
                   help="with --copy-storage: no storage phase first; the disks' first copy "
                   "goes with memory's round 0 and their written blocks with each round "
                   "(QEMU's old migrate -b), where libvirt's order copies them first")
    m.add_argument("--remove-source-storage", action="store_true",
                   help="with --copy-storage: remove the source's images once the migration "
                   "is complete (the default keeps them)")
    m.add_argument("--transport", choices=choices(Transport), default=None,
                   help="how pages travel: tcp, data channels the agents open beside gRPC "
                   "(binary records, from and into guest RAM), or grpc, the PageStream "
                   "service on the agent's port only; default: the source agent's "
                   f"setting ({policy.TRANSPORT})")
    m.add_argument("--compress", choices=choices(Compression), default=Compression.NONE.value,
                   help="zstd: page batches travel compressed where that makes them smaller "
                   "(pays on a slow link, costs CPU on a fast one)")
    m.add_argument("--quiesce", choices=choices(Quiesce), default=Quiesce.NONE.value,
                   help="backend: backends stop and unmap every grant before the final "
                   "pass (default none, as Xen)")
    m.add_argument("--backend-log", choices=["off", "on"], default="off",
                   help="backends log every write into the dirty bitmap, as vhost does")
    m.add_argument("--recovery", choices=choices(Recovery), default=Recovery.REPLAY.value,
                   help="naive: after resume, frontends trust the responses left in the "
                   "old ring instead of re-queuing from their shadow")
    m.add_argument("--persistent-grants", choices=choices(PersistentGrants), default=None,
                   help="off: blkback drops its persistent mappings and maps per request "
                   "for this migration; on: keep them (the disk must have negotiated them "
                   "at `domain create --persistent-grants`); default: as negotiated")
    m.add_argument("--grant-mode", choices=choices(GrantMode), default=None,
                   help="how blkback reaches the guest's data from this migration on "
                   "(default: as the disk was created)")
    m.add_argument("--inject", action="append", default=[], metavar="POINT",
                   choices=injector.NAMES,
                   help="force a hazard (repeatable): response-before-final (after suspend "
                   "the backends answer what is in flight; the ring is logged, the data "
                   "is not), write-after-final (they answer after the final pass copied "
                   "the buffers, before it copies the rings), torn-copy (a read lands in "
                   "its buffer while the final pass copies that frame), "
                   "xenstore-after-final (xenstored writes the guest's ring after the "
                   "final pass)")
    m.add_argument("--save-images", type=Path, metavar="DIR",
                   help="both agents write the memories they compare into DIR (a directory "
                   "both reach): ID.source.ram at the end, ID.dest.ram at resume (a copy "
                   "inside the downtime); `pvmig verify` reads them")
    m.add_argument("--xenstore-track", choices=["off", "on"], default="off",
                   help="xenstored's writes into the guest's ring page are logged")
    m.add_argument("--net-peer-stats", type=Path, metavar="FILE",
                   help="a running `pvmig peer --stats FILE`: its loss, duplicates and "
                   "longest outage go into the report")
    m.add_argument("--net-peer-wait", type=float, default=2.0, metavar="S",
                   help="how long after the migration to let the peer catch up first")
    m.set_defaults(func=migrate)

    st = sub.add_parser("status", help="what runs where: each agent's domains, their "
                        "state, migrations under way and their guests' checks", parents=[auth])
    st.add_argument("--agent", required=True, action="append", metavar="HOST:PORT")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)

    x = sub.add_parser("cancel", help="stop a migration before its commit; the guest "
                       "goes on where it was", parents=[auth])
    x.add_argument("--migration", required=True, metavar="ID")
    x.add_argument("--agent", required=True, action="append", metavar="HOST:PORT",
                   help="an agent taking part (give both)")
    x.set_defaults(func=cancel)

    sp = sub.add_parser("migrate-postcopy", help="switch a running pre-copy migration to "
                        "post-copy after its current round (it must have been started with "
                        "--allow-postcopy or --postcopy-on-stall)", parents=[auth])
    sp.add_argument("--migration", required=True, metavar="ID")
    sp.add_argument("--source", required=True, metavar="HOST:PORT",
                    help="the source agent (the coordinator hears it from there)")
    sp.set_defaults(func=migrate_postcopy)

    rc = sub.add_parser("recover", help="finish a migration whose coordinator died: "
                        "from the source's durable decision, the guest ends up running on "
                        "exactly one host", parents=[auth])
    rc.add_argument("--migration", required=True, metavar="ID")
    rc.add_argument("--source", required=True, metavar="HOST:PORT")
    rc.add_argument("--dest", required=True, metavar="HOST:PORT")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=recover)


def migrate(args) -> int:
    if args.no_progress_rounds < 0:
        raise errors.InvalidArgument("--no-progress-rounds must be >= 0")
    options = coordinator.Options(downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                      no_progress_rounds=args.no_progress_rounds, quiesce=args.quiesce,
                      backend_log=args.backend_log == "on",
                      xenstore_track=args.xenstore_track == "on", recovery=args.recovery,
                      inject=tuple(args.inject),
                      persistent_grants=args.persistent_grants, grant_mode=args.grant_mode,
                      compress=args.compress, transport=args.transport,
                      max_bandwidth_mbps=args.max_bandwidth, auto_converge=args.auto_converge,
                      save_images=str(args.save_images or ""),
                      batch_pages=args.batch_pages, streams=args.streams,
                      verify_timeout_s=args.verify_timeout, postcopy=args.postcopy,
                      postcopy_after_precopy=args.postcopy_after_precopy,
                      postcopy_on_stall=args.postcopy_on_stall,
                      allow_postcopy=args.allow_postcopy,
                      postcopy_dom0=args.postcopy_dom0, copy_storage=args.copy_storage,
                      storage_mode=args.storage_mode,
                      remove_source_storage=args.remove_source_storage,
                      storage_with_memory=args.storage_with_memory)
    if options.downtime_limit_ms <= 0 or options.max_rounds < 1:
        raise errors.InvalidArgument("--downtime-limit must be > 0 ms and --max-rounds >= 1")
    if options.max_bandwidth_mbps < 0:
        raise errors.InvalidArgument("--max-bandwidth must be >= 0 Mbit/s")
    if not 0 <= options.streams <= policy.MAX_STREAMS:
        raise errors.InvalidArgument(f"--streams must be within 1..{policy.MAX_STREAMS}")
    if not 0 <= options.batch_pages <= policy.MAX_BATCH_PAGES:
        raise errors.InvalidArgument(f"--batch-pages must be within 1..{policy.MAX_BATCH_PAGES}")
    if sum((options.postcopy, options.postcopy_after_precopy)) > 1:
        raise errors.InvalidArgument("--postcopy and --postcopy-after-precopy: give one")
    if options.copy_storage and options.transport is Transport.GRPC:
        raise errors.InvalidArgument("--copy-storage runs over the data channels: not with "
                                     "--transport grpc")
    if options.may_postcopy and options.transport is Transport.GRPC:
        raise errors.InvalidArgument("--postcopy runs over the data channels: not with "
                                     "--transport grpc")
    if args.report:
        check_writable(args.report)
    if options.may_postcopy:
        print("warning: post-copy: once the guest resumes at the destination and until "
              "every page has arrived, neither host holds the whole guest; a crash of "
              "either agent, or of either host, loses it", file=sys.stderr)
    reporter = for_stream(sys.stdout)
    try:
        report = run(coordinator.migrate(args.source, args.dest, args.domain, options, reporter))
    finally:
        reporter.close()
    if args.net_peer_stats:
        report.net_peer = read_peer(args.net_peer_stats, args.net_peer_wait)
    if args.report:
        report.write(args.report)
    print_summary(report, sys.stdout.isatty())
    return EXIT_OK if report.verified else EXIT_FAILED


def read_peer(path: Path, wait_s: float) -> dict:
    time.sleep(wait_s)  # retransmissions in flight at resume land first
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"cannot read the peer's figures from {path}: {e}"}


def check_writable(path: Path) -> None:
    """Before a migration, not after it: a report that cannot be written is lost."""
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise errors.InvalidArgument(f"cannot write the report to {path}: {e.strerror}") from None


def status(args) -> int:
    async def go():
        out = {}
        for address in args.agent:
            async with AgentClient(address) as agent:
                hello = await agent.hello()
                reply = await agent.call(agent.agent.ListDomains, pb.ListDomainsRequest())
                ledger = await agent.call(agent.agent.ListMigrations,
                                          pb.ListMigrationsRequest())
                out[address] = (hello.agent_name, list(reply.domains),
                                list(ledger.migrations))
        return out
    result = run(go())
    as_dict = lambda m: MessageToDict(m, preserving_proto_field_name=True)  # noqa: E731
    if args.json:
        print(json.dumps({addr: {"agent": name, "domains": [as_dict(d) for d in doms],
                                 "migrations": [as_dict(m) for m in ledger]}
                          for addr, (name, doms, ledger) in result.items()}))
        return EXIT_OK
    for address, (name, doms, ledger) in result.items():
        print(f"{name} ({address}): {len(doms)} domain(s)")
        for d in doms:
            g = d.guest
            line = (f"  {d.name:<16} {d.state:<10} {d.ram_bytes >> 20:>6} MiB  checks "
                    f"{g.checks_run} run, {g.checks_failed} failed")
            if d.migration_id:
                line += f"  migrating: {d.migration_id}"
            if d.postcopy:
                line += f"  {d.postcopy}: {d.missing_frames} frame(s) to come"
            for s in d.device_stats:
                line += f"  {s.kind}{s.devid}: {s.served} served"
            print(line)
        ended = [m for m in ledger if m.ended_unix_ns]
        print(f"  migrations since its start: {len(ended)} ended ("
              + ", ".join(f"{o} {sum(m.outcome == o for m in ended)}"
                          for o in ("completed", "failed", "aborted")) + f"), "
              f"{len(ledger) - len(ended)} under way")
    return EXIT_OK


def cancel(args) -> int:
    ref = pb.MigrationRef(migration_id=args.migration, reason=policy.CANCEL_REASON,
                          cancelled=True)

    async def go():
        found = []
        for address in args.agent:
            async with AgentClient(address) as agent:
                for half in (agent.source, agent.dest):
                    try:
                        await agent.call(half.Abort, ref, timeout=90.0)
                        found.append(address)
                    except errors.NotFound:
                        pass
        return found
    found = run(go())
    if not found:
        raise errors.NotFound(f"no agent given has migration {args.migration}")
    print(f"cancelled migration {args.migration} on {', '.join(found)}")
    return EXIT_OK


def migrate_postcopy(args) -> int:
    async def go():
        async with AgentClient(args.source, "the source agent") as agent:
            await agent.call(agent.source.StartPostcopy,
                             pb.MigrationRef(migration_id=args.migration))
    run(go())
    print(f"migration {args.migration}: post-copy asked for; it switches after its "
          "current round")
    return EXIT_OK


def recover(args) -> int:
    async def go():
        async with AgentClient(args.source, "the source agent") as source, \
                AgentClient(args.dest, "the destination agent") as dest:
            await asyncio.gather(source.hello("pvmig recover"), dest.hello("pvmig recover"))
            return await recovery.recover(recovery.RemoteSource(source), recovery.RemoteDest(dest),
                                          args.migration)
    outcome = run(go())
    if args.json:
        print(json.dumps(dataclasses.asdict(outcome)))
    else:
        print(outcome.describe())
    return EXIT_OK

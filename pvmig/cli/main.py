"""The `pvmig` command: agent, domain, migrate, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from pathlib import Path

import uvloop

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.host.host import DEFAULT_WORKLOAD, default_max_ram
from pvmig.rpc import security
from pvmig.rpc.client import AgentClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(getattr(args, "log_level", None) or "INFO").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if hasattr(args, "tls_ca") and args.command != "agent":
            security.set_default(_security(vars(args)))
        return args.func(args)
    except errors.PvmigError as e:
        print(f"pvmig: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pvmig: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvmig", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    auth = argparse.ArgumentParser(add_help=False)
    g = auth.add_argument_group("authentication (mutual TLS, or a token; default from "
                                "PVMIG_TLS_CA, PVMIG_TLS_CERT, PVMIG_TLS_KEY, PVMIG_TOKEN_FILE)")
    g.add_argument("--tls-ca", metavar="PEM", help="the cluster's CA certificate")
    g.add_argument("--tls-cert", metavar="PEM", help="this host's or coordinator's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="its private key")
    g.add_argument("--token-file", metavar="FILE",
                   help="a shared token (authenticates, does not encrypt: for one machine)")

    a = sub.add_parser("agent", help="run a host agent", parents=[auth])
    a.add_argument("--config", type=Path, metavar="TOML",
                   help="settings for this host (the flags' names, with _ for -; a [tls] "
                   "table with ca, cert, key); flags given as well win")
    a.add_argument("--listen", metavar="HOST:PORT",
                   help="address to serve gRPC on (port 0: pick one)")
    a.add_argument("--name", help="this host's name")
    a.add_argument("--data-dir", type=Path, help="logs and durable migration records")
    a.add_argument("--mem-dir", type=Path,
                   help="where guest RAM files live (default /dev/shm/pvmig/NAME)")
    a.add_argument("--storage-dir", type=Path,
                   help="where disks named by a relative path live on this host (the shared "
                   "storage's mount point here)")
    a.add_argument("--max-ram-mb", type=int, help="guest RAM this host allows in all "
                   "(default: half of the host's memory)")
    a.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address other agents reach this one at (default: --listen)")
    a.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    a.add_argument("--session-timeout", type=float, metavar="S",
                   help="abort a migration whose coordinator is silent this long before "
                   "commit (default 120)")
    a.add_argument("--log-level")
    a.set_defaults(func=_agent)

    cert = sub.add_parser("certs", help="a small CA and certificates for a cluster's "
                          "agents and coordinators (mutual TLS)")
    csub = cert.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="make the CA: DIR/ca.pem and DIR/ca-key.pem")
    ci.add_argument("--dir", required=True, type=Path)
    ci.add_argument("--days", type=int, default=3650)
    ci.set_defaults(func=_certs_init)
    cs = csub.add_parser("issue", help="a certificate signed by the CA: DIR/NAME.pem and "
                         "DIR/NAME-key.pem, good as a server and as a client")
    cs.add_argument("name", help="the agent's or coordinator's name")
    cs.add_argument("--dir", required=True, type=Path, help="where the CA is")
    cs.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                    help="a name or address the agent is dialled at (repeat; default: NAME)")
    cs.add_argument("--out", type=Path, help="where to write (default: --dir)")
    cs.add_argument("--days", type=int, default=825)
    cs.set_defaults(func=_certs_issue)

    d = sub.add_parser("domain", help="create, list, show or destroy domains on an agent")
    dsub = d.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("create", help="create a domain and boot its guest", parents=[auth])
    c.add_argument("name")
    c.add_argument("--agent", required=True, metavar="HOST:PORT")
    c.add_argument("--ram-mb", type=int, default=64)
    c.add_argument("--dirty-rate", type=float, default=DEFAULT_WORKLOAD["dirty_rate"],
                   help="pages the guest writes per second")
    c.add_argument("--hot-fraction", type=float, default=DEFAULT_WORKLOAD["hot_fraction"],
                   help="fraction of memory forming the hot set")
    c.add_argument("--hot-share", type=float, default=DEFAULT_WORKLOAD["hot_share"],
                   help="share of writes landing in the hot set")
    c.add_argument("--fill", type=float, default=DEFAULT_WORKLOAD["fill"],
                   help="fraction of memory written at boot (the rest stays zero)")
    c.add_argument("--seed", type=int, default=DEFAULT_WORKLOAD["seed"])
    c.add_argument("--disk", metavar="PATH", help="give the guest a PV disk: this image "
                   "(created empty; on shared storage both hosts reach: an absolute path "
                   "is the same on both, a relative one lies under each agent's "
                   "--storage-dir)")
    c.add_argument("--disk-blocks", type=int, default=256, metavar="N",
                   help="disk size in 4 KiB blocks")
    c.add_argument("--disk-latency-ms", type=float, default=0.0, metavar="MS",
                   help="delay blkback adds to every request (a slow disk)")
    c.add_argument("--disk-io-rate", type=float, default=200.0, metavar="N",
                   help="block requests per second the guest issues")
    c.add_argument("--persistent-grants", action="store_true",
                   help="blkback offers feature-persistent")
    c.add_argument("--grant-mode", choices=["map", "copy"], default="map",
                   help="how blkback reaches the guest's buffers")
    c.add_argument("--vif", action="store_true",
                   help="give the guest a PV network device bridged to a UDP port of its "
                   "host (its address: `pvmig domain show`); talk to it with `pvmig peer`")
    c.set_defaults(func=_domain_create)
    for name, func, help_ in (("list", _domain_list, "list domains"),
                              ("show", _domain_show, "show one domain and its guest's checks"),
                              ("destroy", _domain_destroy, "destroy a domain")):
        x = dsub.add_parser(name, help=help_, parents=[auth])
        if name != "list":
            x.add_argument("name")
        x.add_argument("--agent", required=True, metavar="HOST:PORT")
        x.set_defaults(func=func)

    m = sub.add_parser("migrate", help="live-migrate a domain from one agent to another",
                       parents=[auth])
    m.add_argument("--source", required=True, metavar="HOST:PORT")
    m.add_argument("--dest", required=True, metavar="HOST:PORT")
    m.add_argument("--domain", required=True)
    m.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS")
    m.add_argument("--max-rounds", type=int, default=30, metavar="N")
    m.add_argument("--no-progress-rounds", type=int, default=5, metavar="N",
                   help="stop iterating when this many rounds in a row did not shrink "
                   "(0: never)")
    m.add_argument("--streams", type=int, default=0, metavar="N",
                   help="parallel page streams between the agents (default 4)")
    m.add_argument("--batch-pages", type=int, default=0, metavar="N",
                   help="pages per batch on the stream (default 256: 1 MiB)")
    m.add_argument("--verify-timeout", type=float, default=60.0, metavar="S",
                   help="how long the resumed guest may take to check all its memory")
    m.add_argument("--report", type=Path, metavar="FILE", help="write the JSON report here")
    m.add_argument("--max-bandwidth", type=float, default=0.0, metavar="MBIT",
                   help="cap the page streams at this many Mbit/s in all (default: none)")
    m.add_argument("--auto-converge", action="store_true",
                   help="when rounds stop shrinking, throttle the guest's vCPU (20%%, then "
                   "+10%% each time, up to 99%%) until what is left fits the downtime limit")
    m.add_argument("--compress", choices=["none", "zstd"], default="none",
                   help="zstd: page batches travel compressed where that makes them smaller "
                   "(pays on a slow link, costs CPU on a fast one)")
    m.add_argument("--quiesce", choices=["none", "backend"], default="none",
                   help="backend: backends stop and unmap every grant before the final "
                   "pass (default none, as Xen)")
    m.add_argument("--backend-log", choices=["off", "on"], default="off",
                   help="backends log every write into the dirty bitmap, as vhost does")
    m.add_argument("--recovery", choices=["replay", "naive"], default="replay",
                   help="naive: after resume, frontends trust the responses left in the "
                   "old ring instead of re-queuing from their shadow")
    m.add_argument("--persistent-grants", choices=["on", "off"], default="",
                   help="off: blkback drops its persistent mappings and maps per request "
                   "for this migration; on: keep them (the disk must have negotiated them "
                   "at `domain create --persistent-grants`); default: as negotiated")
    m.add_argument("--grant-mode", choices=["map", "copy"], default="",
                   help="how blkback reaches the guest's data from this migration on "
                   "(default: as the disk was created)")
    m.add_argument("--inject", action="append", default=[], metavar="POINT",
                   choices=["response-before-final", "write-after-final", "torn-copy",
                            "xenstore-after-final"],
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
    m.set_defaults(func=_migrate)

    st = sub.add_parser("status", help="what runs where: each agent's domains, their "
                        "state, migrations under way and their guests' checks", parents=[auth])
    st.add_argument("--agent", required=True, action="append", metavar="HOST:PORT")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    x = sub.add_parser("cancel", help="stop a migration before its commit; the guest "
                       "goes on where it was", parents=[auth])
    x.add_argument("--migration", required=True, metavar="ID")
    x.add_argument("--agent", required=True, action="append", metavar="HOST:PORT",
                   help="an agent taking part (give both)")
    x.set_defaults(func=_cancel)

    rc = sub.add_parser("recover", help="finish a migration whose coordinator died: "
                        "from the source's durable decision, the guest ends up running on "
                        "exactly one host", parents=[auth])
    rc.add_argument("--migration", required=True, metavar="ID")
    rc.add_argument("--source", required=True, metavar="HOST:PORT")
    rc.add_argument("--dest", required=True, metavar="HOST:PORT")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=_recover)

    pe = sub.add_parser("peer", help="talk to a guest's network service from outside, "
                        "and measure loss, duplicates and the longest outage")
    pe.add_argument("--guest", required=True, metavar="HOST:PORT",
                    help="the guest's address (its vif's, from `pvmig domain show`)")
    pe.add_argument("--rate", type=float, default=200.0, help="requests per second")
    pe.add_argument("--duration", type=float, default=10.0, metavar="S")
    pe.add_argument("--stats", type=Path, metavar="FILE",
                    help="keep the running figures here (JSON, rewritten 5 times a second)")
    pe.set_defaults(func=_peer)

    v = sub.add_parser("verify", help="compare two saved memory images frame by frame "
                       "and say where they differ")
    v.add_argument("source", type=Path, help="the source's memory at the end")
    v.add_argument("dest", type=Path, help="the destination's memory at resume")
    v.add_argument("--report", type=Path, metavar="FILE",
                   help="the migration's JSON report: the frames the guest's checks named "
                   "after resume become the observed ones")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=_verify)

    mx = sub.add_parser("matrix", help="run the policies against each other on busy guests "
                        "and tabulate corruptions, undefined frames and downtime")
    mx.add_argument("--full", action="store_true",
                    help="every combination (default: a quick subset of 8 cells)")
    mx.add_argument("--runs", type=int, default=3, metavar="N", help="migrations per cell")
    mx.add_argument("--json", type=Path, metavar="FILE")
    mx.add_argument("--markdown", type=Path, metavar="FILE")
    mx.set_defaults(func=_matrix)

    be = sub.add_parser("bench", help="migrations over a grid (RAM, dirty rate, devices, "
                        "bandwidth cap), against the raw-TCP ceiling and QEMU, in one run")
    be.add_argument("--quick", action="store_true",
                    help="a 256 MiB guest, idle and busy, only (about a minute)")
    be.add_argument("--runs", type=int, default=3, metavar="N",
                    help="migrations per cell (the 1 GiB busy cell runs at least 10)")
    be.add_argument("--ram-mb", type=int, action="append", metavar="MIB",
                    help="only these RAM sizes of the grid (repeat)")
    be.add_argument("--peer", choices=["none", "qemu"], default="none",
                    help="qemu: QEMU's own migration of a paused guest of the same size "
                    "and content, beside pvmig's")
    be.add_argument("--json", type=Path, metavar="FILE")
    be.add_argument("--markdown", type=Path, metavar="FILE")
    be.add_argument("--plots", type=Path, metavar="DIR", help="write the comparison PNGs here")
    be.set_defaults(func=_bench)

    pl = sub.add_parser("plot", help="a migration's timeline as a PNG: pages and dirty rate "
                        "per round, bandwidth, throttle, the downtime window")
    pl.add_argument("report", type=Path, help="a `pvmig migrate --report` JSON")
    pl.add_argument("-o", "--output", type=Path, help="the PNG (default: REPORT.png)")
    pl.set_defaults(func=_plot)

    demo = sub.add_parser("demo", help="two agents on loopback, a busy guest, a migration")
    demo.add_argument("--ram-mb", type=int, default=256)
    demo.add_argument("--dirty-rate", type=float, default=5000.0)
    demo.add_argument("--report", type=Path, metavar="FILE")
    demo.set_defaults(func=_demo)
    return p


# ---- agent

AGENT_DEFAULTS = {"listen": None, "name": None, "data_dir": None, "mem_dir": None,
                  "storage_dir": None, "max_ram_mb": None, "advertise": "",
                  "ready_file": None, "session_timeout": 120.0, "log_level": "info",
                  "tls_ca": None, "tls_cert": None, "tls_key": None, "token_file": None}
PATHS = ("data_dir", "mem_dir", "storage_dir", "ready_file")


def agent_settings(args) -> dict:
    """Defaults, then the config file, then the flags given."""
    out = dict(AGENT_DEFAULTS)
    if args.config:
        out.update(_read_config(args.config))
    out.update({k: getattr(args, k) for k in AGENT_DEFAULTS if getattr(args, k) is not None})
    for key in ("listen", "name", "data_dir"):
        if not out[key]:
            flag = "--" + key.replace("_", "-")
            raise errors.InvalidArgument(f"the agent needs {flag} (or {key} in its --config)")
    for key in PATHS:
        if out[key] is not None:
            out[key] = Path(out[key])
    if out["max_ram_mb"] is not None and out["max_ram_mb"] <= 0:
        raise errors.InvalidArgument(f"--max-ram-mb must be > 0, not {out['max_ram_mb']}")
    if not out["session_timeout"] > 0:
        raise errors.InvalidArgument(
            f"--session-timeout must be > 0 s, not {out['session_timeout']}")
    return out


def _read_config(path: Path) -> dict:
    import tomllib
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise errors.InvalidArgument(f"config {path} is not valid TOML: {e}") from None
    tls = data.pop("tls", {})
    if not isinstance(tls, dict) or set(tls) - {"ca", "cert", "key"}:
        raise errors.InvalidArgument(f"config {path}: [tls] takes ca, cert and key")
    data.update({f"tls_{k}": v for k, v in tls.items()})
    unknown = set(data) - set(AGENT_DEFAULTS)
    if unknown:
        raise errors.InvalidArgument(
            f"config {path}: unknown setting(s) {sorted(unknown)}; known are "
            f"{sorted(k for k in AGENT_DEFAULTS if not k.startswith('tls_'))} and [tls]")
    return data


def _agent(args) -> int:
    from pvmig.agent.server import run
    cfg = agent_settings(args)
    logging.getLogger().setLevel(str(cfg["log_level"]).upper())
    sec = _security(cfg)
    max_ram = cfg["max_ram_mb"] << 20 if cfg["max_ram_mb"] else default_max_ram()
    mem_dir = cfg["mem_dir"] or Path("/dev/shm/pvmig") / cfg["name"]
    run(listen=cfg["listen"], name=cfg["name"], data_dir=cfg["data_dir"], mem_dir=mem_dir,
        max_ram_bytes=max_ram, advertise=cfg["advertise"], ready_file=cfg["ready_file"],
        session_timeout_s=cfg["session_timeout"], security=sec,
        storage_dir=cfg["storage_dir"])
    return EXIT_OK


def _security(given: dict):
    """Flags (or config), else the environment."""
    from pvmig.rpc.security import Security
    if any(given.get(k) for k in ("tls_ca", "tls_cert", "tls_key", "token_file")):
        return Security.load(ca=given.get("tls_ca"), cert=given.get("tls_cert"),
                             key=given.get("tls_key"), token_file=given.get("token_file"))
    return Security.from_env()


def _certs_init(args) -> int:
    from pvmig.rpc.security import init_ca
    path = init_ca(args.dir, days=args.days)
    print(f"CA certificate {path}; its key {args.dir / 'ca-key.pem'} (keep it private)")
    return EXIT_OK


def _certs_issue(args) -> int:
    from pvmig.rpc.security import issue
    cert, key = issue(args.dir, args.name, args.host, days=args.days, out=args.out)
    print(f"certificate {cert} and key {key} for {args.name} "
          f"({', '.join(args.host or [args.name])})")
    return EXIT_OK


# ---- domains

def _run(coro):
    return uvloop.run(coro)


def _agent_call(address: str, method: str, request, *, timeout: float = 30.0,
                hello: bool = False):
    """One call to the Agent service of the agent at `address`."""
    async def go():
        async with AgentClient(address) as agent:
            if hello:
                await agent.hello()
            return await agent.call(getattr(agent.agent, method), request, timeout=timeout)
    return _run(go())


def _domain_create(args) -> int:
    if args.ram_mb <= 0:
        raise errors.InvalidArgument(f"--ram-mb must be > 0, not {args.ram_mb}")
    if args.seed < 0:
        raise errors.InvalidArgument(f"--seed must be >= 0, not {args.seed}")
    workload = pb.WorkloadConfig(dirty_rate=args.dirty_rate, hot_fraction=args.hot_fraction,
                                 hot_share=args.hot_share, fill=args.fill, seed=args.seed)

    devices = []
    if args.disk and args.disk_blocks <= 0:
        raise errors.InvalidArgument(f"a vbd has 1..{1 << 20} blocks, not {args.disk_blocks}")
    if args.disk and (args.disk_latency_ms < 0 or args.disk_io_rate < 0):
        raise errors.InvalidArgument("--disk-latency-ms and --disk-io-rate must be >= 0")
    if args.disk:
        devices.append(pb.DeviceConfig(
            kind="vbd", devid=0, disk=args.disk, blocks=args.disk_blocks,
            latency_ms=args.disk_latency_ms, io_rate=args.disk_io_rate,
            persistent=args.persistent_grants, grant_mode=args.grant_mode))

    if args.vif:
        devices.append(pb.DeviceConfig(kind="vif", devid=0))

    info = _agent_call(args.agent, "CreateDomain", pb.CreateDomainRequest(
        name=args.name, ram_bytes=args.ram_mb << 20, workload=workload, devices=devices),
        timeout=600.0, hello=True)
    print(f"created {info.name} (domid {info.domid}, {info.ram_bytes >> 20} MiB, "
          f"guest pid {info.guest_pid}) on {args.agent}")
    return EXIT_OK


def _domain_list(args) -> int:
    reply = _agent_call(args.agent, "ListDomains", pb.ListDomainsRequest())
    print(f"{'NAME':<20} {'DOMID':>5} {'RAM MiB':>8} {'STATE':<10} {'CHECKS':>10} {'FAILED':>6}")
    for d in reply.domains:
        print(f"{d.name:<20} {d.domid:>5} {d.ram_bytes >> 20:>8} {d.state:<10} "
              f"{d.guest.checks_run:>10} {d.guest.checks_failed:>6}")
    return EXIT_OK


def _domain_show(args) -> int:
    from google.protobuf.json_format import MessageToDict

    info = _agent_call(args.agent, "QueryDomain", pb.DomainRef(name=args.name))
    print(json.dumps(MessageToDict(info), indent=2))
    return EXIT_OK


def _domain_destroy(args) -> int:
    _agent_call(args.agent, "DestroyDomain", pb.DomainRef(name=args.name))
    print(f"destroyed {args.name} on {args.agent}")
    return EXIT_OK


# ---- migrate

def _migrate(args) -> int:
    from pvmig.coordinator.migrate import Options, migrate
    from pvmig.coordinator.progress import for_stream
    from pvmig.coordinator.summary import print_summary

    if args.no_progress_rounds < 0:
        raise errors.InvalidArgument("--no-progress-rounds must be >= 0")
    options = Options(downtime_limit_ms=args.downtime_limit, max_rounds=args.max_rounds,
                      no_progress_rounds=args.no_progress_rounds, quiesce=args.quiesce,
                      backend_log=args.backend_log == "on",
                      xenstore_track=args.xenstore_track == "on", recovery=args.recovery,
                      inject=tuple(args.inject),
                      persistent_grants=args.persistent_grants, grant_mode=args.grant_mode,
                      compress="" if args.compress == "none" else args.compress,
                      max_bandwidth_mbps=args.max_bandwidth, auto_converge=args.auto_converge,
                      save_images=str(args.save_images or ""),
                      batch_pages=args.batch_pages, streams=args.streams,
                      verify_timeout_s=args.verify_timeout)
    if options.downtime_limit_ms <= 0 or options.max_rounds < 1:
        raise errors.InvalidArgument("--downtime-limit must be > 0 ms and --max-rounds >= 1")
    if options.max_bandwidth_mbps < 0:
        raise errors.InvalidArgument("--max-bandwidth must be >= 0 Mbit/s")
    if not 0 <= options.streams <= 16 or not 0 <= options.batch_pages <= 1024:
        raise errors.InvalidArgument("--streams must be within 1..16 and --batch-pages 1..1024")
    if args.report:
        _check_writable(args.report)
    reporter = for_stream(sys.stdout)
    try:
        report = _run(migrate(args.source, args.dest, args.domain, options, reporter))
    finally:
        reporter.close()
    if args.net_peer_stats:
        report.net_peer = _read_peer(args.net_peer_stats, args.net_peer_wait)
    if args.report:
        report.write(args.report)
    print_summary(report, sys.stdout.isatty())
    return EXIT_OK if report.verified else EXIT_FAILED


def _read_peer(path: Path, wait_s: float) -> dict:
    import time
    time.sleep(wait_s)  # retransmissions in flight at resume land first
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"cannot read the peer's figures from {path}: {e}"}


def _check_writable(path: Path) -> None:
    """Before a migration, not after it: a report that cannot be written is lost."""
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise errors.InvalidArgument(f"cannot write the report to {path}: {e.strerror}") from None


def _status(args) -> int:
    from google.protobuf.json_format import MessageToDict

    async def go():
        out = {}
        for address in args.agent:
            async with AgentClient(address) as agent:
                hello = await agent.hello()
                reply = await agent.call(agent.agent.ListDomains, pb.ListDomainsRequest())
                out[address] = (hello.agent_name, list(reply.domains))
        return out
    result = _run(go())
    if args.json:
        print(json.dumps({addr: {"agent": name, "domains": [
            MessageToDict(d, preserving_proto_field_name=True) for d in doms]}
            for addr, (name, doms) in result.items()}))
        return EXIT_OK
    for address, (name, doms) in result.items():
        print(f"{name} ({address}): {len(doms)} domain(s)")
        for d in doms:
            g = d.guest
            line = (f"  {d.name:<16} {d.state:<10} {d.ram_bytes >> 20:>6} MiB  checks "
                    f"{g.checks_run} run, {g.checks_failed} failed")
            if d.migration_id:
                line += f"  migrating: {d.migration_id}"
            for s in d.device_stats:
                line += f"  {s.kind}{s.devid}: {s.served} served"
            print(line)
    return EXIT_OK


def _cancel(args) -> int:
    ref = pb.MigrationRef(migration_id=args.migration, reason="cancelled by pvmig cancel")

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
    found = _run(go())
    if not found:
        raise errors.NotFound(f"no agent given has migration {args.migration}")
    print(f"cancelled migration {args.migration} on {', '.join(found)}")
    return EXIT_OK


def _recover(args) -> int:
    from pvmig.migration.recovery import RemoteDest, RemoteSource, settle

    async def go():
        async with AgentClient(args.source, "the source agent") as source, \
                AgentClient(args.dest, "the destination agent") as dest:
            await asyncio.gather(source.hello("pvmig recover"), dest.hello("pvmig recover"))
            return await settle(RemoteSource(source), RemoteDest(dest), args.migration)
    outcome = _run(go())
    if args.json:
        print(json.dumps(dataclasses.asdict(outcome)))
    else:
        print(outcome.describe())
    return EXIT_OK


def _peer(args) -> int:
    from pvmig.tools.peer import run_peer
    if not args.rate > 0 or not args.duration > 0:
        raise errors.InvalidArgument("--rate and --duration must be > 0")
    stats = _run(run_peer(args.guest, rate=args.rate, duration_s=args.duration,
                          stats_file=args.stats))
    print(json.dumps(stats))
    return EXIT_OK if stats["lost"] == 0 else EXIT_FAILED


def _verify(args) -> int:
    from pvmig.migration.verify import verify_images
    observed = _observed_frames(args.report) if args.report else ()
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


def _observed_frames(path: Path) -> list[int]:
    try:
        report = json.loads(path.read_text())
        return [int(f) for f in report["verification"]["observed-frames"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.InvalidArgument(
            f"{path}: not a pvmig migrate report with observed frames ({e})") from None


def _matrix(args) -> int:
    from pvmig.tools.matrix import run_matrix
    if args.runs < 1:
        raise errors.InvalidArgument("--runs must be >= 1")
    logging.getLogger().setLevel(logging.WARNING)
    command = "pvmig matrix" + (" --full" if args.full else "") + f" --runs {args.runs}"
    return run_matrix(full=args.full, runs=args.runs, json_path=args.json,
                      md_path=args.markdown, command=command)


def _bench(args) -> int:
    from pvmig.tools.bench import run_bench
    if args.runs < 1:
        raise errors.InvalidArgument("--runs must be >= 1")
    logging.getLogger().setLevel(logging.WARNING)
    command = "pvmig bench" + (" --quick" if args.quick else "") + f" --runs {args.runs}" + \
        "".join(f" --ram-mb {m}" for m in args.ram_mb or []) + \
        (" --peer qemu" if args.peer == "qemu" else "")
    out = run_bench(quick=args.quick, runs=args.runs, peer_qemu=args.peer == "qemu",
                    json_path=args.json, md_path=args.markdown, plots=args.plots,
                    command=command, ram_sizes=args.ram_mb)
    failed = [c for s in out["sizes"] for c in s["cells"] if c["errors"]]
    return EXIT_FAILED if failed else EXIT_OK


def _plot(args) -> int:
    from pvmig.tools.plot import load, timeline
    out = timeline(load(args.report), args.output or args.report.with_suffix(".png"))
    print(f"wrote {out}")
    return EXIT_OK


def _demo(args) -> int:
    from pvmig.tools.demo import run_demo
    return run_demo(ram_mb=args.ram_mb, dirty_rate=args.dirty_rate, report_path=args.report)

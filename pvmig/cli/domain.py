"""`pvmig domain`: create, list, show and destroy domains on an agent, and change a
running guest's workload."""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from pvmig import errors, labels
from pvmig._proto import pvmig_pb2 as pb
from pvmig.cli.common import EXIT_OK, agent_call
from pvmig.host.host import DEFAULT_WORKLOAD
from pvmig.migration.policy import GrantMode, choices


def register(sub, auth) -> None:
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
    c.add_argument("--disk-fill", type=float, default=0.0, metavar="F",
                   help="the fraction of the disk's blocks created with content (the rest "
                   "zero): a disk with data on it, to copy")
    c.add_argument("--disk-latency-ms", type=float, default=0.0, metavar="MS",
                   help="delay blkback adds to every request (a slow disk)")
    c.add_argument("--disk-io-rate", type=float, default=200.0, metavar="N",
                   help="block requests per second the guest issues")
    c.add_argument("--persistent-grants", action="store_true",
                   help="blkback offers feature-persistent")
    c.add_argument("--grant-mode", choices=choices(GrantMode), default=GrantMode.MAP.value,
                   help="how blkback reaches the guest's buffers")
    c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label the domain carries from host to host (repeatable): the "
                   "fleet's policies select domains by them (pvmig evacuate)")
    c.add_argument("--vif", action="store_true",
                   help="give the guest a PV network device bridged to a UDP port of its "
                   "host (its address: `pvmig domain show`); talk to it with `pvmig peer`")
    c.set_defaults(func=domain_create)
    for name, func, help_ in (("list", domain_list, "list domains"),
                              ("show", domain_show, "show one domain and its guest's checks"),
                              ("destroy", domain_destroy, "destroy a domain")):
        x = dsub.add_parser(name, help=help_, parents=[auth])
        if name != "list":
            x.add_argument("name")
        x.add_argument("--agent", required=True, metavar="HOST:PORT")
        x.set_defaults(func=func)
    w = dsub.add_parser("workload", help="change a running guest's dirty rate or disk I/O "
                        "rate (the guest keeps them in its memory: they move with it)",
                        parents=[auth])
    w.add_argument("name")
    w.add_argument("--agent", required=True, metavar="HOST:PORT")
    w.add_argument("--dirty-rate", type=float, metavar="N", help="pages written per second")
    w.add_argument("--io-rate", type=float, metavar="N",
                   help="block requests issued per second (a domain with a disk)")
    w.set_defaults(func=domain_workload)


def domain_create(args) -> int:
    if args.ram_mb <= 0:
        raise errors.InvalidArgument(f"--ram-mb must be > 0, not {args.ram_mb}")
    if args.seed < 0:
        raise errors.InvalidArgument(f"--seed must be >= 0, not {args.seed}")
    given_labels = labels.parse(args.label)
    workload = pb.WorkloadConfig(dirty_rate=args.dirty_rate, hot_fraction=args.hot_fraction,
                                 hot_share=args.hot_share, fill=args.fill, seed=args.seed)

    devices = []
    if args.disk and args.disk_blocks <= 0:
        raise errors.InvalidArgument(f"a vbd has 1..{1 << 20} blocks, not {args.disk_blocks}")
    if args.disk and (args.disk_latency_ms < 0 or args.disk_io_rate < 0):
        raise errors.InvalidArgument("--disk-latency-ms and --disk-io-rate must be >= 0")
    if args.disk and not 0.0 <= args.disk_fill <= 1.0:
        raise errors.InvalidArgument(f"--disk-fill is a fraction, 0..1, not {args.disk_fill}")
    if args.disk:
        devices.append(pb.DeviceConfig(
            kind="vbd", devid=0, disk=args.disk, blocks=args.disk_blocks,
            latency_ms=args.disk_latency_ms, io_rate=args.disk_io_rate, fill=args.disk_fill,
            persistent=args.persistent_grants, grant_mode=args.grant_mode))

    if args.vif:
        devices.append(pb.DeviceConfig(kind="vif", devid=0))

    info = agent_call(args.agent, "CreateDomain", pb.CreateDomainRequest(
        name=args.name, ram_bytes=args.ram_mb << 20, workload=workload, devices=devices,
        labels=given_labels),
        timeout=600.0, hello=True)
    print(f"created {info.name} (domid {info.domid}, {info.ram_bytes >> 20} MiB, "
          f"guest pid {info.guest_pid}) on {args.agent}")
    return EXIT_OK


def domain_list(args) -> int:
    reply = agent_call(args.agent, "ListDomains", pb.ListDomainsRequest())
    print(f"{'NAME':<20} {'DOMID':>5} {'RAM MiB':>8} {'STATE':<10} {'CHECKS':>10} {'FAILED':>6}"
          "  LABELS")
    for d in reply.domains:
        shown = ",".join(f"{k}={v}" for k, v in sorted(d.labels.items()))
        print(f"{d.name:<20} {d.domid:>5} {d.ram_bytes >> 20:>8} {d.state:<10} "
              f"{d.guest.checks_run:>10} {d.guest.checks_failed:>6}  {shown}")
    return EXIT_OK


def domain_show(args) -> int:
    info = agent_call(args.agent, "QueryDomain", pb.DomainRef(name=args.name))
    print(json.dumps(MessageToDict(info), indent=2))
    return EXIT_OK


def domain_destroy(args) -> int:
    agent_call(args.agent, "DestroyDomain", pb.DomainRef(name=args.name))
    print(f"destroyed {args.name} on {args.agent}")
    return EXIT_OK


def domain_workload(args) -> int:
    if args.dirty_rate is None and args.io_rate is None:
        raise errors.InvalidArgument("give --dirty-rate or --io-rate (or both)")
    request = pb.SetWorkloadRequest(name=args.name)
    if args.dirty_rate is not None:
        request.dirty_rate = args.dirty_rate
    if args.io_rate is not None:
        request.io_rate = args.io_rate
    info = agent_call(args.agent, "SetWorkload", request)
    vbd = [d for d in info.devices if d.kind == "vbd"]
    print(f"{info.name}: dirty rate {info.workload.dirty_rate:g} pages/s"
          + (f", disk I/O {vbd[0].io_rate:g} requests/s" if vbd else ""))
    return EXIT_OK

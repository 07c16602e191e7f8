"""`pvmig agent` (a host agent, from flags and a config file) and `pvmig certs`."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

from pvmig import errors
from pvmig.agent.data_server import OFF
from pvmig.agent.server import run as run_agent
from pvmig.cli.common import EXIT_OK, security_of
from pvmig.host.host import default_max_ram
from pvmig.migration import policy
from pvmig.rpc.channel import parse_address
from pvmig.rpc.security import init_ca, issue

AGENT_DEFAULTS = {"listen": None, "name": None, "data_dir": None, "mem_dir": None,
                  "storage_dir": None, "max_ram_mb": None, "advertise": "",
                  "ready_file": None, "session_timeout": policy.SESSION_TIMEOUT_S,
                  "log_level": "info", "data_listen": "", "transport": policy.TRANSPORT.value,
                  "metrics_listen": "",
                  "tls_ca": None, "tls_cert": None, "tls_key": None, "token_file": None}
PATHS = ("data_dir", "mem_dir", "storage_dir", "ready_file")


def register(sub, auth) -> None:
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
                   f"commit (default {policy.SESSION_TIMEOUT_S:g})")
    a.add_argument("--data-listen", metavar="HOST:PORT|off",
                   help="address the data channels (transport tcp) arrive at, for firewalls "
                   "(port 0: pick one; default: --listen's host, port 0; off: no data "
                   "listener, only transport grpc reaches this agent)")
    a.add_argument("--transport", choices=policy.choices(policy.Transport),
                   help="how pages travel in migrations this agent sends, unless pvmig "
                   "migrate says: tcp, data channels beside gRPC (default), or grpc, the "
                   "agent's port only")
    a.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics (GET /metrics) here (port 0: pick one; "
                   "the ready file says which); default: none")
    a.add_argument("--log-level")
    a.set_defaults(func=agent)

    cert = sub.add_parser("certs", help="a small CA and certificates for a cluster's "
                          "agents and coordinators (mutual TLS)")
    csub = cert.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="make the CA: DIR/ca.pem and DIR/ca-key.pem")
    ci.add_argument("--dir", required=True, type=Path)
    ci.add_argument("--days", type=int, default=3650)
    ci.set_defaults(func=certs_init)
    cs = csub.add_parser("issue", help="a certificate signed by the CA: DIR/NAME.pem and "
                         "DIR/NAME-key.pem, good as a server and as a client")
    cs.add_argument("name", help="the agent's or coordinator's name")
    cs.add_argument("--dir", required=True, type=Path, help="where the CA is")
    cs.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                    help="a name or address the agent is dialled at (repeat; default: NAME)")
    cs.add_argument("--out", type=Path, help="where to write (default: --dir)")
    cs.add_argument("--days", type=int, default=825)
    cs.set_defaults(func=certs_issue)


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
    if out["data_listen"] and out["data_listen"] != OFF:
        parse_address(out["data_listen"], listen=True)
    if out["metrics_listen"]:
        parse_address(out["metrics_listen"], listen=True)
    if out["transport"] not in policy.choices(policy.Transport):
        raise errors.InvalidArgument(f"transport must be one of "
                                     f"{policy.choices(policy.Transport)}, not "
                                     f"{out['transport']!r}")
    if not out["session_timeout"] > 0:
        raise errors.InvalidArgument(
            f"--session-timeout must be > 0 s, not {out['session_timeout']}")
    return out


def _read_config(path: Path) -> dict:
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


def agent(args) -> int:
    cfg = agent_settings(args)
    logging.getLogger().setLevel(str(cfg["log_level"]).upper())
    sec = security_of(cfg)
    max_ram = cfg["max_ram_mb"] << 20 if cfg["max_ram_mb"] else default_max_ram()
    mem_dir = cfg["mem_dir"] or Path("/dev/shm/pvmig") / cfg["name"]
    run_agent(listen=cfg["listen"], name=cfg["name"], data_dir=cfg["data_dir"],
              mem_dir=mem_dir, max_ram_bytes=max_ram, advertise=cfg["advertise"],
              ready_file=cfg["ready_file"], session_timeout_s=cfg["session_timeout"],
              security=sec, storage_dir=cfg["storage_dir"], data_listen=cfg["data_listen"],
              transport=policy.Transport(cfg["transport"]),
              metrics_listen=cfg["metrics_listen"] or "")
    return EXIT_OK


def certs_init(args) -> int:
    path = init_ca(args.dir, days=args.days)
    print(f"CA certificate {path}; its key {args.dir / 'ca-key.pem'} (keep it private)")
    return EXIT_OK


def certs_issue(args) -> int:
    cert, key = issue(args.dir, args.name, args.host, days=args.days, out=args.out)
    print(f"certificate {cert} and key {key} for {args.name} "
          f"({', '.join(args.host or [args.name])})")
    return EXIT_OK

"""The `pvmig` command: agent, domain, migrate, evacuate, rebalance, demo."""

from __future__ import annotations

import argparse
import logging
import sys

from pvmig import errors
from pvmig.cli import agent, common, domain, experiments, fleet, migrate
from pvmig.rpc import security

GROUPS = (agent, domain, migrate, fleet, experiments)  # each adds its commands, in this order


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(getattr(args, "log_level", None) or "INFO").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if hasattr(args, "tls_ca") and args.command != "agent":
            security.set_default(common.security_of(vars(args)))
        return args.func(args)
    except errors.PvmigError as e:
        print(f"pvmig: error: {e}", file=sys.stderr)
        return common.EXIT_FAILED
    except KeyboardInterrupt:
        print("pvmig: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvmig", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    auth = common.auth_parser()
    for group in GROUPS:
        group.register(sub, auth)
    return p

"""What every command group shares: exit codes, the authentication flags, running a
coroutine, one call to an agent."""

from __future__ import annotations

import argparse

import uvloop

from pvmig.rpc.client import AgentClient
from pvmig.rpc.security import Security

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def auth_parser() -> argparse.ArgumentParser:
    """The authentication flags, for every command that calls an agent (a parent)."""
    auth = argparse.ArgumentParser(add_help=False)
    g = auth.add_argument_group("authentication (mutual TLS, or a token; default from "
                                "PVMIG_TLS_CA, PVMIG_TLS_CERT, PVMIG_TLS_KEY, PVMIG_TOKEN_FILE)")
    g.add_argument("--tls-ca", metavar="PEM", help="the cluster's CA certificate")
    g.add_argument("--tls-cert", metavar="PEM", help="this host's or coordinator's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="its private key")
    g.add_argument("--token-file", metavar="FILE",
                   help="a shared token (authenticates, does not encrypt: for one machine)")
    return auth


def security_of(given: dict) -> Security:
    """Flags (or config), else the environment."""
    if any(given.get(k) for k in ("tls_ca", "tls_cert", "tls_key", "token_file")):
        return Security.load(ca=given.get("tls_ca"), cert=given.get("tls_cert"),
                             key=given.get("tls_key"), token_file=given.get("token_file"))
    return Security.from_env()


def run(coro):
    return uvloop.run(coro)


def agent_call(address: str, method: str, request, *, timeout: float = 30.0,
               hello: bool = False):
    """One call to the Agent service of the agent at `address`."""
    async def go():
        async with AgentClient(address) as agent:
            if hello:
                await agent.hello()
            return await agent.call(getattr(agent.agent, method), request, timeout=timeout)
    return run(go())

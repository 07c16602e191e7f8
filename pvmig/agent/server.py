"""The host agent: one gRPC server per machine (pvmig.agent.servicers), its watchdog, and
its start and stop: domains a crash or a clean stop left are back before it serves, and
its migrations are settled and its idle domains parked before it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
import prometheus_client
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dest_host import storage
from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.agent.data_server import OFF, DataServer
from pvmig.agent.servicers import (
    IN_FLIGHT,
    AgentServicer,
    MigrationDestServicer,
    MigrationSourceServicer,
    PageStreamServicer,
)
from pvmig.agent.watchdog import Watchdog
from pvmig.host import parking, revival
from pvmig.host.host import Host
from pvmig.migration import policy
from pvmig.rpc import channel

log = logging.getLogger("pvmig.agent")


def advertised(bind_host: str, port: int) -> str:
    """The address peers are told to use when none was given: the bound one, unless it
    is a wildcard nobody can dial, then this host's name."""
    if bind_host in ("0.0.0.0", "::", ""):
        name = socket.getfqdn()
        log.warning("listening on all addresses and no --advertise: telling peers %s:%d; "
                    "give --advertise if they cannot reach that name", name, port)
        return f"{name}:{port}"
    return f"{bind_host}:{port}" if ":" not in bind_host else f"[{bind_host}]:{port}"


def dump_tasks() -> None:
    """SIGUSR1: where each of the agent's tasks and calls waits, into its log (an agent
    that seems stuck says on what; py-spy sees only an idle event loop)."""
    tasks = asyncio.all_tasks()
    log.warning("SIGUSR1: %d task(s), %d call(s) being served", len(tasks), len(IN_FLIGHT))
    for task in tasks:
        log.warning("%s\n%s", task.get_name(), "\n".join(_awaiting(task.get_coro())))
    for work, method in list(IN_FLIGHT.items()):
        log.warning("call %s\n%s", method, "\n".join(_awaiting(work)))


def _awaiting(coro) -> list[str]:
    """The chain of awaits down from a coroutine, one line a frame. Followed by hand:
    Task.get_stack stops at grpc's compiled frames, above the servicer's."""
    lines = []
    while coro is not None and len(lines) < 64:
        frame = next((getattr(coro, a) for a in ("cr_frame", "ag_frame", "gi_frame")
                      if getattr(coro, a, None) is not None), None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} "
                         f"in {frame.f_code.co_name}")
        coro = next((getattr(coro, a) for a in ("cr_await", "ag_await", "gi_yieldfrom")
                     if getattr(coro, a, None) is not None), None)
    return lines or ["  (no frame)"]


async def serve(host: Host, listen: str, *, ready_file: Path | None = None,
                data_listen: str = "", metrics_listen: str = "") -> None:
    bind_host, _ = channel.parse_address(listen, listen=True)
    server = grpc.aio.server(options=channel.SERVER_OPTIONS,
                             interceptors=host.security.server_interceptors())
    services = pb.DESCRIPTOR.services_by_name
    server.add_generic_rpc_handlers([
        channel.handler(AgentServicer(host), services["Agent"]),
        channel.handler(MigrationSourceServicer(host), services["MigrationSource"]),
        channel.handler(MigrationDestServicer(host), services["MigrationDest"]),
        channel.handler(PageStreamServicer(host), services["PageStream"])])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        creds = host.security.server_credentials()
        port = (server.add_secure_port(listen, creds) if creds is not None
                else server.add_insecure_port(listen))
    except RuntimeError as e:
        raise errors.Unavailable(
            f"cannot listen on {listen}: {e} (is the port in use, or the address not "
            "one of this host's?)") from None
    bound = f"{bind_host}:{port}" if ":" not in bind_host else f"[{bind_host}]:{port}"
    data = None
    if data_listen != OFF:
        host_part = bind_host if ":" not in bind_host else f"[{bind_host}]"
        data = DataServer(host, data_listen or f"{host_part}:0", asyncio.get_running_loop())
        host.data_endpoint = data.endpoint
    host.listen_host = bind_host
    if not host.advertise or host.advertise.endswith(":0"):
        host.advertise = advertised(bind_host, port)
    # (a stop asked for while they come back waits for them, then parks them again)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    # Domains a crash left and parked ones are back before anyone can ask: a recovery
    # must not be told a domain is lost while it is being resumed here.
    revived = await revival.revive_all(host)
    if revived:
        log.info("revived domains left by a crash: %s", ", ".join(revived))
    resumed = await parking.unpark_all(host)
    if resumed:
        log.info("resumed parked domains: %s", ", ".join(resumed))
    storage.discard_partial(host)  # (after the revival: a committed one's are kept)
    await server.start()
    if data is not None:
        data.start()
    metrics = serve_metrics(host, metrics_listen) if metrics_listen else None
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("pvmig.v1.Agent", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s listening on %s (advertised as %s), data channels on %s, guest RAM "
             "under %s; callers need %s", host.name, bound, host.advertise,
             f"port {data.port}" + (" (TLS)" if data.tls else "") if data else "none (off)",
             host.mem_dir, host.security.describe())
    if not host.security.tls and not host.security.token:
        log.warning("this agent accepts any caller, in plain text: keep it on loopback or a "
                    "private network, or give it --tls-* or --token-file")
    watchdog = asyncio.create_task(Watchdog(host).run())
    if ready_file is not None:
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(json.dumps({"address": bound, "pid": os.getpid(),
                                   "data_port": data.port if data else None,
                                   "metrics": metrics}))
        tmp.replace(ready_file)
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        await _end_migrations(host)
        if data is not None:
            data.stop()
        await parking.park_all(host)
        for name in list(host.domains):
            session = host.restores.get(host.domains[name].migration_id)
            if session is not None and session.committed:
                # committed here, not resumed in time: its record and RAM stay, and the
                # next start resumes it (pvmig.host.parking)
                await host.domains.pop(name).destroy(keep_ram=True)
                continue
            await host.drop(name)


STOP_SETTLE_S = 15.0


async def _end_migrations(host: Host) -> None:
    """Migrations end before the agent does, so that their domains can be parked. Not
    committed at the source, or not whole at the destination: aborted (the guest stays,
    the incoming copy goes). Committed, or whole (the source may have committed): settled
    with the peer as recovery does; if the peer does not answer in time, left to its
    recovery (this side's records say what it did)."""
    for session in [*host.saves, *host.restores]:
        try:
            if not session.decided:
                await session.abort("the agent is stopping")
            else:
                await asyncio.wait_for(session.expire(), STOP_SETTLE_S)
        except (errors.PvmigError, asyncio.TimeoutError) as e:
            log.error("migration %s left to its peer's recovery: %s",
                      session.migration_id, e or "no answer in time")


def serve_metrics(host: Host, listen: str) -> str:
    """Prometheus's text format over HTTP (GET /metrics), in a thread of its own; the
    address it serves at."""
    bind, port = channel.parse_address(listen, listen=True)
    try:
        httpd, _thread = prometheus_client.start_http_server(
            port, addr=bind, registry=host.metrics.registry)
    except OSError as e:
        raise errors.Unavailable(f"cannot serve metrics on {listen}: {e.strerror}") from None
    where = f"{bind}:{httpd.server_port}" if ":" not in bind else f"[{bind}]:{httpd.server_port}"
    log.info("metrics on http://%s/metrics", where)
    return where


def run(*, listen: str, name: str, data_dir: Path, mem_dir: Path, max_ram_bytes: int,
        advertise: str = "", ready_file: Path | None = None,
        session_timeout_s: float = policy.SESSION_TIMEOUT_S, security=None,
        storage_dir: Path | None = None, data_listen: str = "",
        transport: policy.Transport = policy.TRANSPORT, metrics_listen: str = "") -> None:
    host = Host(name=name, data_dir=data_dir, mem_dir=mem_dir, max_ram_bytes=max_ram_bytes,
                advertise=advertise, session_timeout_s=session_timeout_s, security=security,
                storage_dir=storage_dir, transport=transport)
    uvloop.run(serve(host, listen, ready_file=ready_file, data_listen=data_listen,
                     metrics_listen=metrics_listen))

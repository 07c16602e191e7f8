"""The host agent: one gRPC server per machine, one thin servicer per service.

Servicers translate messages to calls on Host, SaveSession and RestoreSession and
errors.PvmigError back to a status with its message; the work lives there.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.host import parking
from pvmig.host.host import Host
from pvmig.rpc import channel, status

log = logging.getLogger("pvmig.agent.server")
CAPABILITIES = ["precopy", "zero-pages", "xxh3-batches", "zstd", "auto-converge"]


def _status(fn):
    """Turn a PvmigError raised by the work into a precise status with its message."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                if isinstance(request, channel.Malformed):
                    raise request.error()
                async for item in fn(self, request, context):
                    yield item
            except errors.PvmigError as e:
                await context.abort(status.code_of(e), str(e))
            except Exception as e:  # a bug: say so in one line, keep the trace in the log
                log.exception("%s failed", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"internal error in {fn.__name__}: {type(e).__name__}: {e}")
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            if isinstance(request, channel.Malformed):
                raise request.error()
            return await fn(self, request, context)
        except errors.PvmigError as e:
            await context.abort(status.code_of(e), str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in {fn.__name__}: {type(e).__name__}: {e}")
    return unary


def _workload_msg(w: dict) -> pb.WorkloadConfig:
    return pb.WorkloadConfig(**w) if w else pb.WorkloadConfig()


def _device_msgs(devices: list[dict]) -> list[pb.DeviceConfig]:
    return [pb.DeviceConfig(**d) for d in devices]


def _domain_msg(info: dict) -> pb.DomainInfo:
    g = dict(info["guest"])
    failures = [pb.GuestFailure(frame=f["frame"], expected_generation=f["expected"],
                                found_generation=f["found"]) for f in g.pop("failures", [])]
    return pb.DomainInfo(name=info["name"], domid=info["domid"], ram_bytes=info["ram_bytes"],
                         state=info["state"], guest_pid=info["guest_pid"] or 0,
                         migration_id=info["migration_id"],
                         guest=pb.GuestStats(**g, failures=failures),
                         workload=_workload_msg(info["workload"]),
                         devices=_device_msgs(info["devices"]),
                         device_stats=[pb.DeviceStats(kind=s["kind"], devid=s["devid"],
                                                      served=s["served"], refused=s["refused"],
                                                      guest=s["guest"],
                                                      address=s.get("address", ""),
                                                      failed_frames=s.get("failed_frames", []))
                                       for s in info["device_stats"]],
                         shared_frames=[pb.FrameRange(area=a, first=f, count=n)
                                        for a, f, n in info["shared_frames"]])


class AgentServicer(pb_grpc.AgentServicer):
    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Hello(self, request, context):
        if request.protocol_version != channel.PROTOCOL_VERSION:
            raise errors.FailedPrecondition(
                f"{request.client or 'the caller'} speaks protocol version "
                f"{request.protocol_version}, agent {self.host.name} speaks "
                f"{channel.PROTOCOL_VERSION}: run the same pvmig release on both")
        return pb.HelloReply(protocol_version=channel.PROTOCOL_VERSION, agent_name=self.host.name,
                             instance_id=self.host.instance_id, capabilities=CAPABILITIES,
                             advertise=self.host.advertise,
                             max_ram_bytes=self.host.max_ram_bytes)

    @_status
    async def Clock(self, request, context):
        return pb.ClockReply(monotonic_ns=time.monotonic_ns())

    @_status
    async def CreateDomain(self, request, context):
        fields = {f.name: v for f, v in request.workload.ListFields()}
        devices = [{f.name: v for f, v in d.ListFields()} for d in request.devices]
        dom = await self.host.create_domain(request.name, request.ram_bytes, fields, devices)
        return _domain_msg(dom.info())

    @_status
    async def ListDomains(self, request, context):
        return pb.ListDomainsReply(
            domains=[_domain_msg(d.info()) for d in self.host.domains.values()])

    @_status
    async def QueryDomain(self, request, context):
        return _domain_msg(self.host.domain(request.name).info())

    @_status
    async def DestroyDomain(self, request, context):
        await self.host.destroy_domain(request.name)
        return pb.DestroyDomainReply()


class MigrationSourceServicer(pb_grpc.MigrationSourceServicer):
    """The save half; every call on a session renews its lease (see host.Lease)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Begin(self, request, context):
        from source_host.save import SaveSession
        session = await SaveSession.begin(self.host, request)
        mem = session.domain.mem
        return pb.BeginReply(ram_bytes=mem.ram_bytes, nr_frames=mem.nr_frames)

    @_status
    async def Round(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            async for progress in session.round(request.round, request.final):
                yield progress

    @_status
    async def Suspend(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            return await session.suspend()

    @_status
    async def Throttle(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            session.throttle(request.percent)
        return pb.DoneReply()

    @_status
    async def Quiesce(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            return await session.quiesce()

    @_status
    async def Commit(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            session.commit()
        return pb.DoneReply()

    @_status
    async def FrameHashes(self, request, context):
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            async for chunk in session.frame_hashes():
                yield chunk

    @_status
    async def Complete(self, request, context):
        if (request.migration_id not in self.host.saves
                and await parking.complete_held(self.host, request.migration_id)):
            return pb.DoneReply()  # a copy its crash left, held for the settling
        session = self.host.save(request.migration_id)
        with session.lease.hold():
            await session.complete()
        return pb.DoneReply()

    @_status
    async def Abort(self, request, context):
        await self.host.save(request.migration_id).abort(request.reason)
        return pb.DoneReply()

    @_status
    async def Resolve(self, request, context):
        from source_host.save import resolve
        return await resolve(self.host, request.migration_id,
                             request.reason or "resolved: its coordinator is gone",
                             request.domain, request.source_instance)

    @_status
    async def Rollback(self, request, context):
        reason = request.reason or "rolled back"
        if (request.migration_id not in self.host.saves
                and await parking.roll_back_held(self.host, request.migration_id, reason)):
            return pb.DoneReply()
        await self.host.save(request.migration_id).rollback(reason)
        return pb.DoneReply()


class MigrationDestServicer(pb_grpc.MigrationDestServicer):
    """The restore half; every call on a session renews its lease (see host.Lease)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Prepare(self, request, context):
        from dest_host.restore import RestoreSession
        session = await RestoreSession.prepare(self.host, request)
        return pb.PrepareReply(guest_pid=session.domain.proc.pid)

    @_status
    async def Settle(self, request, context):
        await self.host.restore(request.migration_id).settle()
        return pb.DoneReply()

    @_status
    async def Ready(self, request, context):
        session = self.host.restore(request.migration_id)
        with session.lease.hold():
            session.ready()
        return pb.DoneReply()

    @_status
    async def Commit(self, request, context):
        session = self.host.restore(request.migration_id)
        with session.lease.hold():
            session.commit()
        return pb.DoneReply()

    @_status
    async def Resume(self, request, context):
        return pb.ResumeReply(resumed_ns=await self.host.restore(request.migration_id).resume())

    @_status
    async def CommitAndResume(self, request, context):
        session = self.host.restores.get(request.migration_id)
        if session is None:
            if self.host.commit_record(request.migration_id, "destination"):
                return pb.ResumeReply()  # committed and resumed here already (recovery)
            session = self.host.restore(request.migration_id)  # NotFound, by name
        with session.lease.hold():
            return pb.ResumeReply(resumed_ns=await session.commit_and_resume())

    @_status
    async def FrameHashes(self, request, context):
        session = self.host.restore(request.migration_id)
        try:
            with session.lease.hold():
                async for chunk in session.frame_hashes():
                    yield chunk
        finally:
            session.finish()

    @_status
    async def Abort(self, request, context):
        if (request.migration_id not in self.host.restores
                and self.host.commit_record(request.migration_id, "destination")):
            raise errors.FailedPrecondition(
                f"migration {request.migration_id} is committed on {self.host.name}: it "
                "cannot be discarded")
        await self.host.restore(request.migration_id).abort(request.reason)
        return pb.DoneReply()

    @_status
    async def State(self, request, context):
        from dest_host.restore import incoming_state
        return incoming_state(self.host, request.migration_id)


class PageStreamServicer(pb_grpc.PageStreamServicer):
    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Transfer(self, request_iterator, context):
        from dest_host.restore import receive_stream
        async for ack in receive_stream(self.host, request_iterator):
            yield ack


def advertised(bind_host: str, port: int) -> str:
    """The address peers are told to use when none was given: the bound one, unless it
    is a wildcard nobody can dial, then this host's name."""
    if bind_host in ("0.0.0.0", "::", ""):
        name = socket.getfqdn()
        log.warning("listening on all addresses and no --advertise: telling peers %s:%d; "
                    "give --advertise if they cannot reach that name", name, port)
        return f"{name}:{port}"
    return f"{bind_host}:{port}" if ":" not in bind_host else f"[{bind_host}]:{port}"


async def serve(host: Host, listen: str, *, ready_file: Path | None = None) -> None:
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
    host.listen_host = bind_host
    if not host.advertise or host.advertise.endswith(":0"):
        host.advertise = advertised(bind_host, port)
    # (a stop asked for while they come back waits for them, then parks them again)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Domains a crash left and parked ones are back before anyone can ask: a recovery
    # must not be told a domain is lost while it is being resumed here.
    revived = await parking.revive_all(host)
    if revived:
        log.info("revived domains left by a crash: %s", ", ".join(revived))
    resumed = await parking.unpark_all(host)
    if resumed:
        log.info("resumed parked domains: %s", ", ".join(resumed))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("pvmig.v1.Agent", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s listening on %s (advertised as %s), guest RAM under %s; callers "
             "need %s", host.name, bound, host.advertise, host.mem_dir,
             host.security.describe())
    if not host.security.tls and not host.security.token:
        log.warning("this agent accepts any caller, in plain text: keep it on loopback or a "
                    "private network, or give it --tls-* or --token-file")
    watchdog = asyncio.create_task(host.watchdog())
    if ready_file is not None:
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(json.dumps({"address": bound, "pid": os.getpid()}))
        tmp.replace(ready_file)
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        await _settle_for_stop(host)
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


async def _settle_for_stop(host: Host) -> None:
    """Migrations end before the agent does, so that their domains can be parked. Not
    committed at the source, or not whole at the destination: aborted (the guest stays,
    the incoming copy goes). Committed, or whole (the source may have committed): settled
    with the peer as recovery does; if the peer does not answer in time, left to its
    recovery (this side's records say what it did)."""
    for session in [*host.saves.values(), *host.restores.values()]:
        undecided = not session.committed and not getattr(session, "ended", False)
        try:
            if undecided:
                await session.abort("the agent is stopping")
            else:
                await asyncio.wait_for(session.expire(), STOP_SETTLE_S)
        except (errors.PvmigError, asyncio.TimeoutError) as e:
            log.error("migration %s left to its peer's recovery: %s",
                      session.migration_id, e or "no answer in time")


def run(*, listen: str, name: str, data_dir: Path, mem_dir: Path, max_ram_bytes: int,
        advertise: str = "", ready_file: Path | None = None,
        session_timeout_s: float = 120.0, security=None, storage_dir: Path | None = None) -> None:
    host = Host(name=name, data_dir=data_dir, mem_dir=mem_dir, max_ram_bytes=max_ram_bytes,
                advertise=advertise, session_timeout_s=session_timeout_s, security=security,
                storage_dir=storage_dir)
    uvloop.run(serve(host, listen, ready_file=ready_file))

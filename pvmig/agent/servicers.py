"""The agent's gRPC servicers, one per service, thin: they translate messages to calls
on Host, SaveSession and RestoreSession, and errors.PvmigError back to a status with its
message (pvmig.rpc.status); the work lives there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time

import grpc

from dest_host.restore import RestoreSession, incoming_state, receive_stream
from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.host import parking
from pvmig.host.commit_log import Role
from pvmig.host.host import Host
from pvmig.migration import policy
from pvmig.rpc import channel, status
from source_host.save import SaveSession, resolve

log = logging.getLogger("pvmig.agent.server")
CAPABILITIES = ["precopy", "zero-pages", "xxh3-batches", "zstd", "auto-converge",
                "data-channels"]


IN_FLIGHT: dict[object, str] = {}
"""The work of each call being served (its coroutine or async generator) and the
method's name: where a stuck call waits is read from here (agent.server.dump_tasks;
grpc's compiled frames hide it from the task's own stack)."""


def _status(fn):
    """Turn a PvmigError raised by the work into a precise status with its message."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            async with _answered(fn.__name__, context):
                if isinstance(request, channel.Malformed):
                    raise request.error()
                async for item in _in_flight(fn(self, request, context), fn.__name__):
                    yield item
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        async with _answered(fn.__name__, context):
            if isinstance(request, channel.Malformed):
                raise request.error()
            work = fn(self, request, context)
            IN_FLIGHT[work] = fn.__name__
            try:
                return await work
            finally:
                del IN_FLIGHT[work]
    return unary


async def _in_flight(work, name: str):
    IN_FLIGHT[work] = name
    try:
        async for item in work:
            yield item
    finally:
        del IN_FLIGHT[work]


@contextlib.asynccontextmanager
async def _answered(name: str, context):
    """Whatever the work raises, the caller gets a status: a PvmigError's own, a bug's
    INTERNAL (its trace in the log), never a call left open."""
    try:
        yield
    except errors.PvmigError as e:
        await context.abort(status.code_of(e), str(e))
    except asyncio.CancelledError:
        if status.own_cancel():
            raise
        # Something inside was cancelled under the work (a call whose channel was
        # closed): ended silently, the handler would send no status, and its caller
        # would wait for ever.
        log.error("%s: cancelled from within", name, exc_info=True)
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"internal error in {name}: cancelled from within")
    except Exception as e:  # a bug: said in one line, the trace kept in the log
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"internal error in {name}: {type(e).__name__}: {e}")


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
                                        for a, f, n in info["shared_frames"]],
                         postcopy=info.get("postcopy", ""),
                         missing_frames=info.get("missing_frames", 0),
                         labels=info.get("labels", {}))


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
        dom = await self.host.create_domain(request.name, request.ram_bytes, fields, devices,
                                            labels=dict(request.labels))
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

    @_status
    async def SetWorkload(self, request, context):
        dom = await self.host.set_workload(
            request.name,
            request.dirty_rate if request.HasField("dirty_rate") else None,
            request.io_rate if request.HasField("io_rate") else None)
        return _domain_msg(dom.info())

    @_status
    async def ListMigrations(self, request, context):
        return pb.ListMigrationsReply(migrations=[
            pb.MigrationEntry(migration_id=e.migration_id, domain=e.domain, role=e.role,
                              began_unix_ns=e.began_unix_ns, ended_unix_ns=e.ended_unix_ns,
                              outcome=e.outcome) for e in self.host.ledger.entries()])


class MigrationSourceServicer(pb_grpc.MigrationSourceServicer):
    """The save half; every call on a session renews its lease (see host.Lease)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Begin(self, request, context):
        session = await SaveSession.begin(self.host, request)
        mem = session.domain.mem
        return pb.BeginReply(ram_bytes=mem.ram_bytes, nr_frames=mem.nr_frames,
                             transport=policy.to_wire(session.transport))

    @_status
    async def Round(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            async for progress in session.round(request.round, request.final,
                                                request.postcopy, request.storage):
                yield progress

    @_status
    async def StartPostcopy(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        session.ask_postcopy()
        return pb.DoneReply()

    @_status
    async def RecoverPostcopy(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            return await session.recover_postcopy()

    @_status
    async def Postcopy(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            async for progress in session.postcopy():
                yield progress

    @_status
    async def Suspend(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            return await session.suspend()

    @_status
    async def Throttle(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            session.throttle(request.percent)
        return pb.DoneReply()

    @_status
    async def Quiesce(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            return await session.quiesce()

    @_status
    async def Commit(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            session.commit()
        return pb.DoneReply()

    @_status
    async def FrameHashes(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            async for chunk in session.frame_hashes():
                yield chunk

    @_status
    async def BlockHashes(self, request, context):
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            async for chunk in session.block_hashes():
                yield chunk

    @_status
    async def Complete(self, request, context):
        if (request.migration_id not in self.host.saves
                and await parking.complete_held(self.host, request.migration_id)):
            return pb.DoneReply()  # a copy its crash left, held for the settling
        session = self.host.saves.lookup(request.migration_id)
        with session.lease.hold():
            await session.complete(abandon=request.abandon, downtime_ns=request.downtime_ns)
        return pb.DoneReply()

    @_status
    async def Abort(self, request, context):
        await self.host.saves.lookup(request.migration_id).abort(
            request.reason, cancelled=request.cancelled)
        return pb.DoneReply()

    @_status
    async def Resolve(self, request, context):
        state = await resolve(self.host, request.migration_id,
                               request.reason or "resolved: its coordinator is gone",
                               request.domain, request.source_instance)
        return state.to_pb()

    @_status
    async def Rollback(self, request, context):
        reason = request.reason or "rolled back"
        if (request.migration_id not in self.host.saves
                and await parking.roll_back_held(self.host, request.migration_id, reason)):
            return pb.DoneReply()
        await self.host.saves.lookup(request.migration_id).rollback(reason)
        return pb.DoneReply()


class MigrationDestServicer(pb_grpc.MigrationDestServicer):
    """The restore half; every call on a session renews its lease (see host.Lease)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Prepare(self, request, context):
        session = await RestoreSession.prepare(self.host, request)
        return pb.PrepareReply(guest_pid=session.domain.proc.pid)

    @_status
    async def HashReceived(self, request, context):
        await self.host.restores.lookup(request.migration_id).hash_received()
        return pb.DoneReply()

    @_status
    async def OpenData(self, request, context):
        return await self.host.restores.lookup(request.migration_id).open_data(request.recover)

    @_status
    async def Ready(self, request, context):
        session = self.host.restores.lookup(request.migration_id)
        with session.lease.hold():
            session.ready()
        return pb.DoneReply()

    @_status
    async def Commit(self, request, context):
        session = self.host.restores.lookup(request.migration_id)
        with session.lease.hold():
            session.commit()
        return pb.DoneReply()

    @_status
    async def Resume(self, request, context):
        session = self.host.restores.lookup(request.migration_id)
        return pb.ResumeReply(resumed_ns=await session.resume())

    @_status
    async def PostcopyState(self, request, context):
        session = self.host.restores.lookup(request.migration_id)
        with session.lease.hold():
            return session.postcopy_state()

    @_status
    async def CommitAndResume(self, request, context):
        session = self.host.restores.get(request.migration_id)
        if session is None:
            if self.host.commits.read(request.migration_id, Role.DESTINATION):
                return pb.ResumeReply()  # committed and resumed here already (recovery)
            session = self.host.restores.lookup(request.migration_id)  # NotFound, by name
        with session.lease.hold():
            return pb.ResumeReply(resumed_ns=await session.commit_and_resume())

    @_status
    async def FrameHashes(self, request, context):
        session = self.host.restores.lookup(request.migration_id)
        try:
            with session.lease.hold():
                async for chunk in session.frame_hashes():
                    yield chunk
        finally:
            session.finish()

    @_status
    async def BlockHashes(self, request, context):  # (before FrameHashes, which ends it)
        session = self.host.restores.lookup(request.migration_id)
        with session.lease.hold():
            async for chunk in session.block_hashes():
                yield chunk

    @_status
    async def Abort(self, request, context):
        if (request.migration_id not in self.host.restores
                and self.host.commits.read(request.migration_id, Role.DESTINATION)):
            raise errors.FailedPrecondition(
                f"migration {request.migration_id} is committed on {self.host.name}: it "
                "cannot be discarded")
        await self.host.restores.lookup(request.migration_id).abort(
            request.reason, cancelled=request.cancelled)
        return pb.DoneReply()

    @_status
    async def State(self, request, context):
        return incoming_state(self.host, request.migration_id).to_pb()


class PageStreamServicer(pb_grpc.PageStreamServicer):
    def __init__(self, host: Host) -> None:
        self.host = host

    @_status
    async def Transfer(self, request_iterator, context):
        try:
            async for ack in receive_stream(self.host, request_iterator):
                yield ack
        except errors.PvmigError as e:  # bad input is the agent's to say, not only the peer's
            log.error("page stream refused: %s", e)
            raise



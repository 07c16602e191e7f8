"""PvmigError <-> gRPC status: the one place that knows both."""

from __future__ import annotations

import asyncio

import grpc

from pvmig import errors


def code_of(err: errors.PvmigError) -> grpc.StatusCode:
    """The status a PvmigError travels as."""
    return grpc.StatusCode[err.code]


def from_rpc(err: grpc.RpcError, where: str) -> errors.PvmigError:
    """The PvmigError for a failed call to `where` ("the destination agent at HOST:PORT")."""
    return from_status(err.code(), err.details(), where)


def from_status(code: grpc.StatusCode | None, details: str | None,
                where: str) -> errors.PvmigError:
    code = code or grpc.StatusCode.UNKNOWN
    details = details or code.name
    if code == grpc.StatusCode.CANCELLED:
        return errors.Unavailable(f"lost {where}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and "agent" not in details:
        details = f"cannot reach {where}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Unavailable(f"{where} did not answer in time")
    elif code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        details = f"{where} failed: {details}"
    return errors.BY_CODE.get(code.name, errors.PvmigError)(details)


def own_cancel() -> bool:
    """The running task is being cancelled. grpc.aio also raises CancelledError in a
    call whose channel was closed under it: that one is a failure of the call, and
    must not pass for a cancel (see AgentClient.call, agent.servicers)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

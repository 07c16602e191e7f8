"""Errors that cross a process boundary, each with the gRPC status it travels as.

Agents raise these from plain functions; the servicers turn them into a status with
the same message, and the clients turn the status back into the same class, so that
the coordinator prints one line that says what failed and where.
"""

from __future__ import annotations

import grpc


class PvmigError(Exception):
    code = grpc.StatusCode.UNKNOWN


class NotFound(PvmigError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PvmigError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(PvmigError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(PvmigError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PvmigError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(PvmigError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(PvmigError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(PvmigError):
    code = grpc.StatusCode.ABORTED


class GuestError(PvmigError):
    """The guest process did not do what the hypervisor asked (crashed, no reply)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (NotFound, AlreadyExists, InvalidArgument,
                                      FailedPrecondition, ResourceExhausted, DataLoss,
                                      Unavailable, Aborted, GuestError)}


def from_rpc(err: grpc.RpcError, where: str) -> PvmigError:
    """The PvmigError for a failed call to `where` ("the destination agent at HOST:PORT")."""
    return from_status(err.code(), err.details(), where)


def from_status(code: grpc.StatusCode | None, details: str | None, where: str) -> PvmigError:
    code = code or grpc.StatusCode.UNKNOWN
    details = details or code.name
    if code == grpc.StatusCode.CANCELLED:
        return Unavailable(f"lost {where}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and "agent" not in details:
        details = f"cannot reach {where}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"{where} did not answer in time")
    elif code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        details = f"{where} failed: {details}"
    return _BY_CODE.get(code, PvmigError)(details)

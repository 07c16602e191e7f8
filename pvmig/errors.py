"""Errors that cross a process boundary, each named by the status it travels as.

Agents raise these from plain functions; the servicers turn them into a gRPC status
with the same message, and the clients turn the status back into the same class
(pvmig.rpc.status), so that the coordinator prints one line that says what failed and
where. This module imports nothing: the guest raises these too, and has no gRPC.
"""

from __future__ import annotations


class PvmigError(Exception):
    code = "UNKNOWN"  # the name of its grpc.StatusCode


class NotFound(PvmigError):
    code = "NOT_FOUND"


class AlreadyExists(PvmigError):
    code = "ALREADY_EXISTS"


class InvalidArgument(PvmigError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(PvmigError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(PvmigError):
    code = "RESOURCE_EXHAUSTED"


class DataLoss(PvmigError):
    code = "DATA_LOSS"


class Unavailable(PvmigError):
    code = "UNAVAILABLE"


class Aborted(PvmigError):
    code = "ABORTED"


class Unauthenticated(PvmigError):
    code = "UNAUTHENTICATED"


class GuestError(PvmigError):
    """The guest process did not do what the hypervisor asked (crashed, no reply)."""

    code = "INTERNAL"


BY_CODE = {cls.code: cls for cls in (NotFound, AlreadyExists, InvalidArgument,
                                     FailedPrecondition, ResourceExhausted, DataLoss,
                                     Unavailable, Aborted, Unauthenticated, GuestError)}

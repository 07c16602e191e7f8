"""The vocabulary of a migration: its policies, their names, and every default, once.
(Recovery and GrantMode are defined in the layers that act on them, pvmig.pv.recovery and
pvmig.hv.grant_table, and named here with the rest.)

The CLI's choices and defaults, the coordinator's Options and the agents' checks all
read them from here; the wire carries the policies as proto enums (`to_wire`,
`from_wire`), 0 meaning "the default" or "as the domain was set up".

Policies of the experiment (docs/DESIGN.md, "Experiment matrix"):
    quiesce            none: backends go on after suspend (today's Xen); backend: each
                       stops, finishes or abandons what is in flight, unmaps every grant
    recovery           replay: frontends re-queue from their shadow (blkif_recover);
                       naive: they trust the old ring after resume
    persistent-grants  on | off; unset: as the domain's disks negotiated them
    grant-mode         map | copy; unset: as the domain's disks were created
    compress           none | zstd: page data on the wire
    postcopy-dom0      demand: after a post-copy switch, dom0's grant map or copy of a
                       frame that has not arrived waits for it (asked for first), as
                       Xen's paging makes a foreign map fail and the backend retry;
                       unsafe: it reads or writes dom0's own mapping of the RAM file,
                       where the frame is a hole: a zero page the guest then sees
    storage-mode       (migrate --copy-storage) background: rounds of the blocks blkback
                       wrote, the last of them in the final pass; write-blocking: once
                       the first copy is done, a write is acknowledged only after both
                       copies hold it (QEMU's copy-mode=write-blocking)
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.grant_table import GrantMode
from pvmig.pv.recovery import Recovery

# (Recovery and GrantMode: their layers')
__all__ = ["Quiesce", "Recovery", "PersistentGrants", "GrantMode", "Compression", "Transport",
           "PostcopyDom0", "StorageMode", "choices", "to_wire", "from_wire"]


class Quiesce(StrEnum):
    NONE = "none"
    BACKEND = "backend"


class PersistentGrants(StrEnum):
    ON = "on"
    OFF = "off"


class Compression(StrEnum):
    NONE = "none"
    ZSTD = "zstd"


class PostcopyDom0(StrEnum):
    DEMAND = "demand"
    UNSAFE = "unsafe"


class StorageMode(StrEnum):
    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


class TimeoutAction(StrEnum):
    """What a fleet does with a migration past its completion timeout, or stalled:
    abort it (the guest stays), pause the guest and copy the rest (Nova's
    force-complete: a longer downtime, but done), or switch to post-copy."""
    ABORT = "abort"
    PAUSE = "pause"
    POSTCOPY = "postcopy"


class Transport(StrEnum):
    TCP = "tcp"  # data channels: binary records on plain (or TLS) connections
    GRPC = "grpc"  # the PageStream service: for networks where only the agent's port is open


# ---- defaults and limits

DOWNTIME_LIMIT_MS = 300.0  # QEMU's default
MAX_ROUNDS = 30
NO_PROGRESS_ROUNDS = 5  # 0: never stop for lack of progress
BATCH_PAGES = 256  # 1 MiB of page data: a gRPC message each
# 4 MiB on data channels: fewer per-batch costs on both sides (headers, checks, the GIL
# changing hands); 1 GiB round 0 here, 4 streams: 1.7 GiB/s with 1 MiB, 2.1-2.4 with
# 4 MiB, no better with 8 or 16 (docs/PERFORMANCE.md)
DATA_BATCH_PAGES = 1024
MAX_BATCH_PAGES = 1024  # 4 MiB: well under the 16 MiB message limit
# Several streams keep one packing while another waits on the transport. 1 GiB round 0
# on 2 cores: 2.4 s (1 stream), 2.1 s (2), 1.3-1.6 s (4), 1.25 s (8) once; since the
# copies went down, 1-4 are within noise of each other (docs/PERFORMANCE.md).
STREAMS = 4
MAX_STREAMS = 16
TRANSPORT = Transport.TCP
SESSION_TIMEOUT_S = 120.0  # a session's lease: silence this long means no coordinator
VERIFY_TIMEOUT_S = 60.0  # for the resumed guest to sweep its memory once
# Post-copy: once the source's push has ended, the last pages have this long to be
# placed before the destination says frames are lost.
POSTCOPY_END_S = 60.0
# Storage migration: rounds of the disk alone (before memory's) at most; the rest of
# what blkback writes goes with memory's rounds
MAX_STORAGE_ROUNDS = 10
# Room the destination keeps free beside a copied disk (its own logs and records)
STORAGE_HEADROOM_BYTES = 16 << 20


# pvmig cancel's reason: an abort asked for, not a failure (the agents' metrics)
CANCEL_REASON = "cancelled by pvmig cancel"


def batch_pages(transport: Transport) -> int:
    """A transport's default batch."""
    return DATA_BATCH_PAGES if transport is Transport.TCP else BATCH_PAGES


def choices(policy: type[StrEnum]) -> list[str]:
    """The names a user may give (argparse's `choices`)."""
    return [p.value for p in policy]


# ---- on the wire

_WIRE = {  # policy -> (its proto enum, the prefix of its value names)
    Quiesce: (pb.Quiesce, "QUIESCE_"),
    Recovery: (pb.Recovery, "RECOVERY_"),
    PersistentGrants: (pb.PersistentGrants, "PERSISTENT_GRANTS_"),
    GrantMode: (pb.GrantMode, "GRANT_MODE_"),
    Compression: (pb.Compression, "COMPRESSION_"),
    Transport: (pb.Transport, "TRANSPORT_"),
    PostcopyDom0: (pb.PostcopyDom0, "POSTCOPY_DOM0_"),
    StorageMode: (pb.StorageMode, "STORAGE_MODE_"),
}
P = TypeVar("P", bound=StrEnum)


def to_wire(value: StrEnum | None, policy: type[StrEnum] | None = None) -> int:
    """The proto enum number of a policy's value; None (the default) is 0."""
    if value is None or value == "":
        return 0
    policy = policy or type(value)
    enum, prefix = _WIRE[policy]
    return enum.Value(prefix + policy(value).name)


def from_wire(policy: type[P], number: int, default: P | None = None) -> P | None:
    """The value a proto enum number stands for; 0 is `default`. A number this release
    does not know is refused by name, not taken for the default."""
    if number == 0:
        return default
    enum, prefix = _WIRE[policy]
    try:
        name = enum.Name(number)
    except ValueError:
        name = ""
    if not name.startswith(prefix) or name[len(prefix):] not in policy.__members__:
        raise errors.InvalidArgument(
            f"unknown {policy.__name__} policy number {number}: known are "
            f"{', '.join(choices(policy))}")
    return policy[name[len(prefix):]]

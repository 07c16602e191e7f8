"""The device state record: what the final pass carries besides memory (Xen's
X86_PV_VCPU_BASIC and the toolstack's records).

The vCPU context is the guest's own (msgpack, taken at suspend); the backend records are
what backends learnt that the destination's need (the peers a vif has learnt); the
recovery policy says how the frontends come back on the destination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.migration.policy import Recovery, from_wire, to_wire


@dataclass(frozen=True)
class DeviceState:
    vcpu: bytes
    backends: dict = field(default_factory=dict)
    recovery: Recovery = Recovery.REPLAY

    def to_pb(self) -> pb.DeviceState:
        return pb.DeviceState(vcpu=self.vcpu, devices=msgpack.packb(self.backends),
                              recovery=to_wire(self.recovery))

    @classmethod
    def from_pb(cls, msg: pb.DeviceState) -> "DeviceState":
        if not msg.vcpu:
            raise errors.InvalidArgument("device state without a vCPU context")
        try:
            backends = msgpack.unpackb(msg.devices) if msg.devices else {}
        except (ValueError, msgpack.UnpackException) as e:
            raise errors.InvalidArgument(
                f"device state: backend records unreadable: {e}") from None
        if not isinstance(backends, dict):
            raise errors.InvalidArgument("device state: backend records are not a map")
        return cls(msg.vcpu, backends, from_wire(Recovery, msg.recovery, Recovery.REPLAY))

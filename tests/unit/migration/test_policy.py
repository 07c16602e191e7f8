"""The policies' names, defaults and their proto enums (pvmig.migration.policy)."""

from __future__ import annotations

import pytest

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.migration import policy
from pvmig.migration.device_state import DeviceState
from pvmig.migration.policy import (
    Compression,
    GrantMode,
    PersistentGrants,
    Quiesce,
    Recovery,
    from_wire,
    to_wire,
)

POLICIES = [Quiesce, Recovery, PersistentGrants, GrantMode, Compression]


@pytest.mark.parametrize("kind", POLICIES)
def test_every_value_crosses_the_wire_and_back(kind):
    for value in kind:
        number = to_wire(value)
        assert number != 0  # 0 is "the default", never a value given
        assert from_wire(kind, number) is value
    assert to_wire(None, kind) == 0 and from_wire(kind, 0) is None
    assert from_wire(kind, 0, next(iter(kind))) is next(iter(kind))


@pytest.mark.parametrize("kind", POLICIES)
def test_a_number_this_release_does_not_know_is_refused_by_name(kind):
    with pytest.raises(errors.InvalidArgument, match=f"unknown {kind.__name__} policy number 77"):
        from_wire(kind, 77)


def test_names_are_what_users_type():
    assert policy.choices(Quiesce) == ["none", "backend"]
    assert policy.choices(Recovery) == ["replay", "naive"]
    assert to_wire("backend", Quiesce) == pb.QUIESCE_BACKEND


def test_limits_are_consistent():
    assert 0 < policy.BATCH_PAGES <= policy.MAX_BATCH_PAGES
    assert 0 < policy.STREAMS <= policy.MAX_STREAMS
    assert policy.DOWNTIME_LIMIT_MS > 0 and policy.MAX_ROUNDS >= 1


def test_device_state_round_trip_and_refusals():
    state = DeviceState(b"ctx", {"vif0": {"peers": [["127.0.0.1", 5]]}}, Recovery.NAIVE)
    assert DeviceState.from_pb(state.to_pb()) == state
    with pytest.raises(errors.InvalidArgument, match="without a vCPU context"):
        DeviceState.from_pb(pb.DeviceState())
    with pytest.raises(errors.InvalidArgument, match="backend records unreadable"):
        DeviceState.from_pb(pb.DeviceState(vcpu=b"x", devices=b"\xc1"))
    with pytest.raises(errors.InvalidArgument, match="not a map"):
        DeviceState.from_pb(pb.DeviceState(vcpu=b"x", devices=b"\x01"))

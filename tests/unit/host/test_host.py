"""The host's bookkeeping: commit records, sessions' leases, and the watchdog that
settles migrations whose coordinator has gone silent, on a clock the test moves."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from pvmig import errors
from pvmig.agent.watchdog import Watchdog
from pvmig.host.commit_log import Decision, Role, check_migration_id
from pvmig.host.host import Host
from pvmig.host.sessions import Lease


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def host(tmp_path, clock):
    return Host(name="h", data_dir=tmp_path / "data", mem_dir=tmp_path / "mem",
                max_ram_bytes=1 << 30, advertise="127.0.0.1:0", session_timeout_s=10.0,
                clock=clock)


def test_commit_records_are_durable_and_old_ones_pruned(host):
    host.commits.record("m-old", Role.SOURCE, "vm")
    host.commits.record("m-new", Role.DESTINATION, "vm")
    assert host.commits.read("m-old", Role.SOURCE).state is Decision.COMMITTED
    assert host.commits.read("m-old", Role.DESTINATION) is None  # another role's
    old = host.data_dir / "migrations" / "m-old.json"
    a_year_ago = time.time() - 365 * 86400
    os.utime(old, (a_year_ago, a_year_ago))
    assert host.commits.prune() == 1
    assert host.commits.read("m-old", Role.SOURCE) is None
    assert host.commits.read("m-new", Role.DESTINATION).domain == "vm"


def test_an_unreadable_commit_record_is_data_loss_by_name(host):
    (host.data_dir / "migrations" / "m-bad.json").write_text("{not json")
    with pytest.raises(errors.DataLoss, match="commit record of migration m-bad"):
        host.commits.read("m-bad", Role.SOURCE)


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 65, "abc\n", "é"])
def test_bad_migration_ids_are_refused(bad):
    with pytest.raises(errors.InvalidArgument, match="bad migration id"):
        check_migration_id(bad)


def test_a_lease_runs_out_only_when_nobody_holds_it(clock):
    lease = Lease(10.0, clock)
    clock.now += 9
    assert not lease.expired()
    with lease.hold():
        clock.now += 100  # a long round: held all the while
        assert not lease.expired()
    clock.now += 10
    assert not lease.expired()
    clock.now += 0.5
    assert lease.expired()
    lease.renew()
    assert not lease.expired()


def test_sessions_are_found_by_id_or_not_found_by_name(host, clock):
    session = _Session("m-1", clock)
    host.saves.add(session)
    assert host.saves.lookup("m-1") is session and "m-1" in host.saves
    with pytest.raises(errors.AlreadyExists):
        host.saves.add(_Session("m-1", clock))
    with pytest.raises(errors.NotFound, match="no incoming migration 'm-1' on host h"):
        host.restores.lookup("m-1")
    host.saves.remove("m-1")
    assert host.saves.get("m-1") is None and len(host.saves) == 0


class _Session:
    def __init__(self, mid: str, clock, gate: asyncio.Event | None = None) -> None:
        self.migration_id, self.gate, self.expired = mid, gate, 0
        self.lease = Lease(10.0, clock)
        self.decided = False

    async def expire(self) -> None:
        self.expired += 1
        if self.gate is not None:
            await self.gate.wait()  # a peer that does not answer
        else:
            raise errors.Unavailable("the peer is down")  # tried again after a lease

    async def abort(self, reason: str) -> None:
        pass


def test_one_silent_peer_holds_up_no_other_migration(host, clock):
    async def main():
        stuck = _Session("m-stuck", clock, asyncio.Event())
        fine = _Session("m-fine", clock)
        host.saves.add(stuck)
        host.restores.add(fine)
        dog = Watchdog(host)
        dog.tick()
        await asyncio.sleep(0)
        assert stuck.expired == fine.expired == 0  # nobody's lease has run out
        for _ in range(3):
            clock.now += 10.5  # a lease
            dog.tick()
            for _ in range(3):
                await asyncio.sleep(0)  # the settling tasks run to their first wait
        dog.cancel()
        return stuck, fine
    stuck, fine = asyncio.run(main())
    assert stuck.expired == 1  # once: not again while its first settling waits
    assert fine.expired == 3   # each time its lease has run out again

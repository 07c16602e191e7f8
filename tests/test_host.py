"""The host's bookkeeping (host.py): commit records and the watchdog that settles
migrations whose coordinator has gone silent."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from pvmig import errors
from pvmig.host.host import Host, Lease, check_migration_id


@pytest.fixture
def host(tmp_path):
    return Host(name="h", data_dir=tmp_path / "data", mem_dir=tmp_path / "mem",
                max_ram_bytes=1 << 30, advertise="127.0.0.1:0")


def test_commit_records_are_durable_and_old_ones_pruned(host):
    host.record_commit("m-old", "source", "vm")
    host.record_commit("m-new", "destination", "vm")
    assert host.commit_record("m-old", "source")["state"] == "committed"
    assert host.commit_record("m-old", "destination") is None  # another role's
    old = host.data_dir / "migrations" / "m-old.json"
    a_year_ago = time.time() - 365 * 86400
    os.utime(old, (a_year_ago, a_year_ago))
    assert host.prune_records() == 1
    assert host.commit_record("m-old", "source") is None
    assert host.commit_record("m-new", "destination")["domain"] == "vm"


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 65, "abc\n", "é"])
def test_bad_migration_ids_are_refused(bad):
    with pytest.raises(errors.InvalidArgument, match="bad migration id"):
        check_migration_id(bad)


class _Session:
    def __init__(self, mid: str, gate: asyncio.Event | None = None) -> None:
        self.migration_id, self.gate, self.expired = mid, gate, 0
        self.lease = Lease(0.0)

    async def expire(self) -> None:
        self.expired += 1
        if self.gate is not None:
            await self.gate.wait()  # a peer that does not answer


def test_one_silent_peer_holds_up_no_other_migration(host):
    async def main():
        stuck, fine = _Session("m-stuck", asyncio.Event()), _Session("m-fine")
        host.saves = {"m-stuck": stuck}
        host.restores = {"m-fine": fine}
        dog = asyncio.create_task(host.watchdog(every_s=0.01))
        await asyncio.sleep(0.2)
        dog.cancel()
        await asyncio.gather(dog, return_exceptions=True)
        return stuck, fine
    stuck, fine = asyncio.run(main())
    assert stuck.expired == 1  # once: not again while its first settling waits
    assert fine.expired > 1    # settled, and again each time its lease has run out

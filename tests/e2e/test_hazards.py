"""End to end: each hazard forced by its injection point, and what the verifier says.

For each: an unsafe configuration, where the verifier must name the class and cause of
the frames that differ, and the safe ones (backends quiesced; frontends that replay)
with zero corruptions the guest observes under the same injection. Two guests share
one pair of agents: "vm" (grant map) and "pg" (persistent grants); each test moves
one of them from wherever it is to the other host.
"""

from __future__ import annotations

import time

import pytest
from support import local_cluster, migrate, pvmig, query, wait_running_and_checking


class Hosts:
    def __init__(self, cluster) -> None:
        self.addresses = [cluster["a"].address, cluster["b"].address]
        self.where = {"vm": 0, "pg": 0}

    def move(self, name: str, report, *flags: str) -> tuple[int, dict]:
        i = self.where[name]
        r, data = migrate(self.addresses[i], self.addresses[1 - i], name, report, *flags)
        assert data is not None, r.stderr
        if data["committed"]:
            self.where[name] = 1 - i
            wait_running_and_checking(self.addresses[1 - i], name)
        return r.returncode, data


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    base = tmp_path_factory.mktemp("hazards")
    with local_cluster(base) as c:
        for name, extra in (("vm", ()), ("pg", ("--persistent-grants",))):
            r = pvmig("domain", "create", name, "--agent", c["a"].address, "--ram-mb", "16",
                      "--dirty-rate", "300", "--disk", str(base / f"{name}.img"),
                      "--disk-blocks", "64", "--disk-latency-ms", "30",
                      "--disk-io-rate", "300", *extra)
            assert r.returncode == 0, r.stderr
        time.sleep(1.0)  # the disks get busy
        yield Hosts(c)


def verdict(data: dict) -> tuple[dict, dict, list]:
    v = data["verification"]
    return v["differing-by-class"], v["differing-by-cause"], v["differing-detail"]


@pytest.mark.quick
def test_write_after_final_corrupts_a_frontend_that_trusts_the_old_ring(hosts, tmp_path):
    """Backends answer after the final pass copied the buffers: the responses reach the
    destination, the read data does not. A naive frontend reads the stale buffers."""
    for i in range(4):
        code, data = hosts.move("vm", tmp_path / f"r{i}.json", "--recovery", "naive",
                                "--inject", "write-after-final")
        classes, causes, detail = verdict(data)
        assert data["injected"]["write-after-final"] > 0
        assert set(causes) <= {"post-suspend-write"}, detail
        if classes.get("observed"):
            break
    assert classes["observed"] >= 1 and code == 1, detail
    observed = {f["frame"] for f in detail if f["class"] == "observed"}
    assert observed <= set(data["verification"]["observed-frames"])
    assert all(f["area"] == "vbd0-buffers" and f["cause"] == "post-suspend-write"
               for f in detail if f["class"] == "observed")
    assert data["verification"]["passed"] is False


@pytest.mark.quick
def test_write_after_final_with_replay_leaves_only_undefined_frames(hosts, tmp_path):
    code, data = hosts.move("vm", tmp_path / "r.json", "--inject", "write-after-final")
    classes, causes, detail = verdict(data)
    assert code == 0 and data["verification"]["passed"] is True, detail
    assert data["injected"]["write-after-final"] > 0
    assert set(classes) <= {"undefined"} and set(causes) <= {"post-suspend-write"}, detail
    (blk,) = [d for d in data["devices"] if d["kind"] == "vbd"]
    assert blk["guest-checks"]["read-failures"] == 0 and blk["failed-frames"] == []


@pytest.mark.parametrize("hazard", ["write-after-final", "torn-copy"])
def test_quiesced_backends_leave_nothing_to_force(hosts, tmp_path, hazard):
    """quiesce=backend: nothing is in flight at the final pass, so neither hazard can
    happen, even with a frontend that trusts the old ring."""
    code, data = hosts.move("vm", tmp_path / "r.json", "--quiesce", "backend",
                            "--recovery", "naive", "--inject", hazard)
    assert code == 0, data["error"]
    assert data["injected"][hazard] == 0
    assert data["verification"]["memory"] == "identical"
    assert data["verification"]["observed-frames"] == []


def test_torn_copy_is_reported_torn(hosts, tmp_path):
    """A read lands in its buffer while the final pass copies that frame: the
    destination gets half of each. Replay re-reads it, so the guest never uses it."""
    for i in range(4):  # a read of what its buffer already held tears nothing visible
        code, data = hosts.move("vm", tmp_path / f"r{i}.json", "--inject", "torn-copy")
        classes, causes, detail = verdict(data)
        assert code == 0 and data["injected"]["torn-copy"] == 1, detail
        if causes.get("copy-race"):
            break
    assert causes["copy-race"] == 1 and classes["torn"] == 1, detail
    assert data["injected"]["torn-copy"] == 1
    (torn,) = [f for f in detail if f["cause"] == "copy-race"]
    assert torn["class"] == "torn" and torn["area"] == "vbd0-buffers"
    assert data["verification"]["observed-frames"] == []


def test_response_with_untracked_data_is_observed_and_caused_by_the_grant_map(hosts, tmp_path):
    """Persistent grants: the backend answers before the final read and the ring page is
    logged, but the data behind the grant is not. Naive: observed, cause grant-map."""
    for i in range(4):
        code, data = hosts.move("pg", tmp_path / f"r{i}.json", "--recovery", "naive",
                                "--inject", "response-before-final")
        classes, causes, detail = verdict(data)
        assert data["policies"]["persistent-grants"] is True
        if classes.get("observed"):
            break
    assert code == 1 and classes["observed"] >= 1, detail
    assert all(f["cause"] == "grant-map" for f in detail if f["class"] == "observed")


def test_response_with_untracked_data_is_harmless_with_replay(hosts, tmp_path):
    code, data = hosts.move("pg", tmp_path / "r.json", "--inject", "response-before-final")
    classes, causes, detail = verdict(data)
    assert code == 0 and data["injected"]["response-before-final"] > 0
    assert "observed" not in classes and set(classes) <= {"undefined"}, detail
    assert causes.get("grant-map", 0) >= 1, detail


def test_persistent_grants_off_for_a_migration_logs_the_data(hosts, tmp_path):
    """--persistent-grants off: blkback drops its persistent mappings (each unmap logs
    its frame) and maps per request, so the same injection leaves no data behind; the
    destination then serves the disk without them."""
    code, data = hosts.move("pg", tmp_path / "r.json", "--recovery", "naive",
                            "--persistent-grants", "off", "--inject", "response-before-final")
    classes, causes, detail = verdict(data)
    assert data["policies"]["persistent-grants"] is False
    assert code == 0 and "observed" not in classes and "grant-map" not in causes, detail
    dest = hosts.addresses[hosts.where["pg"]]
    (cfg,) = [d for d in query(dest, "pg").devices if d.kind == "vbd"]
    assert cfg.persistent is False
    # now they cannot be had back: the frontend negotiates them only at connect
    code, data = hosts.move("pg", tmp_path / "r2.json", "--persistent-grants", "on")
    assert code == 1 and "created without persistent grants" in data["error"]
    wait_running_and_checking(dest, "pg")


def test_xenstore_write_after_the_final_pass_is_undefined(hosts, tmp_path):
    code, data = hosts.move("vm", tmp_path / "r.json", "--quiesce", "backend",
                            "--inject", "xenstore-after-final")
    classes, causes, detail = verdict(data)
    assert code == 0 and data["injected"]["xenstore-after-final"] == 1
    assert detail == [{"frame": 1, "area": "xenstore", "class": "undefined",
                       "cause": "xenstore-ring"}]

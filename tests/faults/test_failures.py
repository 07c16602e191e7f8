"""End to end: what the destination refuses, aborts, and bad input. After each, the
guest on the source runs on, checking itself, unharmed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from support import create, domains, local_cluster, migrate, pvmig, wait_running_and_checking

from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.migration import pages
from pvmig.tools.cluster import LocalAgent

MIB = 1 << 20


def _assert_unharmed(address: str, name: str, before: pb.DomainInfo | None = None) -> None:
    info = wait_running_and_checking(address, name)
    assert info.state == "running" and info.migration_id == ""
    assert info.guest.checks_failed == 0, list(info.guest.failures)
    if before is not None:
        assert info.guest.steps > before.guest.steps
        assert info.guest.pages_written > before.guest.pages_written


# ---- the destination refuses bad batches with a clear status


def _prepared(address: str, migration_id: str, ram: int = 4 * MIB) -> grpc.Channel:
    ch = grpc.insecure_channel(address)
    pb_grpc.MigrationDestStub(ch).Prepare(pb.PrepareRequest(
        migration_id=migration_id, domain="incoming", ram_bytes=ram, source_agent="test"),
        timeout=60)
    return ch


def _batch(frames: list[int], seq: int = 0) -> pb.PageBatch:
    data = np.full((len(frames), 4096), 0x5A, dtype=np.uint8).tobytes()
    fbytes = np.array(frames, dtype="<u4").tobytes()
    return pb.PageBatch(seq=seq, round=0, frames=fbytes, data=data,
                        checksum=pages.checksum(seq, 0, fbytes, b"", data))


def _send(ch: grpc.Channel, *records: pb.StreamRecord) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.PageStreamStub(ch).Transfer(iter(records), timeout=30))
    return info.value


@pytest.mark.quick
def test_destination_refuses_bad_batches(cluster):
    b = cluster["b"].address
    with _prepared(b, "m-good") as ch:
        # A frame outside the domain (4 MiB: frames 0..1023).
        err = _send(ch, pb.StreamRecord(migration_id="m-good", pages=_batch([1, 1024])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "frame 1024 is outside the domain (1024 frames)" in err.details()

        # A batch whose bytes do not match its checksum.
        bad = _batch([1, 2], seq=7)
        bad.data = b"\x00" + bad.data[1:]
        err = _send(ch, pb.StreamRecord(migration_id="m-good", pages=bad))
        assert err.code() == grpc.StatusCode.DATA_LOSS
        assert "batch 7: checksum mismatch" in err.details()

        # Batches for a migration this agent does not have.
        err = _send(ch, pb.StreamRecord(migration_id="m-other", pages=_batch([1])))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "no incoming migration 'm-other'" in err.details()

        # ... or for another migration, in the middle of this one's stream.
        err = _send(ch, pb.StreamRecord(migration_id="m-good", pages=_batch([1])),
                    pb.StreamRecord(migration_id="m-other", pages=_batch([2])))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "record for migration 'm-other'" in err.details()

        # The agent is up, the incoming domain waits, and it cannot be committed.
        assert domains(b)["incoming"].state == "incoming"
        dest = pb_grpc.MigrationDestStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            dest.Commit(pb.MigrationRef(migration_id="m-good"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        dest.Abort(pb.MigrationRef(migration_id="m-good", reason="test"), timeout=10)
        assert "incoming" not in domains(b)


def test_destination_refuses_a_guest_larger_than_it_allows(tmp_path):
    with local_cluster(tmp_path, ["a", "small"]) as c:
        small = LocalAgent("small2", tmp_path, extra_args=["--max-ram-mb", "32"]).start()
        try:
            a = c["a"].address
            create(a, "big", ram_mb=64)
            before = wait_running_and_checking(a, "big")
            r, data = migrate(a, small.address, "big", tmp_path / "r.json")
            assert r.returncode != 0
            assert "a 64 MiB guest is larger than host small2 allows (32 MiB" in r.stderr
            assert data["status"] == "failed"
            assert "big" not in domains(small.address)
            _assert_unharmed(a, "big", before)
        finally:
            small.stop()
            small.cleanup()


# ---- aborts: the guest goes on where it was


def test_destination_agent_killed_mid_migration(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=128, dirty_rate=30000, hot_fraction=0.9)
    before = wait_running_and_checking(a, "vm")
    # A downtime limit no round can meet keeps it iterating until the cap.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain", "vm",
         "--downtime-limit", "0.001", "--max-rounds", "1000", "--no-progress-rounds", "0",
         "--report", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill once pre-copy has gone past round 1
        event = json.loads(line)
        if event["event"] == "round" and event["round"] >= 1:
            cluster["b"].kill()
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "FAILED" in err and "destination" in err and "aborted, the guest runs on the source" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "failed" and report["verification"]["passed"] is False
    _assert_unharmed(a, "vm", before)
    # Pre-copy can start again, to another destination, and completes.
    c2 = LocalAgent("c", tmp_path).start()
    try:
        r, data = migrate(a, c2.address, "vm", tmp_path / "again.json")
        assert r.returncode == 0, r.stderr
        assert data["verification"]["passed"] is True
    finally:
        c2.stop()
        c2.cleanup()


# ---- bad input: one clear line, a non-zero exit, the guest untouched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown-domain", "unreachable", "same-host", "bad-address",
                                  "bad-limit"])
def test_bad_input_to_migrate(cluster, tmp_path, case):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16)
    before = wait_running_and_checking(a, "vm")
    args = {"unknown-domain": ("--source", a, "--dest", b, "--domain", "nope"),
            "unreachable": ("--source", a, "--dest", f"127.0.0.1:{_free_port()}", "--domain", "vm"),
            "same-host": ("--source", a, "--dest", a, "--domain", "vm"),
            "bad-address": ("--source", a, "--dest", "no-port-here", "--domain", "vm"),
            "bad-limit": ("--source", a, "--dest", b, "--domain", "vm", "--downtime-limit", "0"),
            }[case]
    expected = {"unknown-domain": "no domain 'nope' on host a",
                "unreachable": "cannot reach the destination agent at 127.0.0.1:",
                "same-host": "are the same agent (a): a migration needs two hosts",
                "bad-address": "bad address 'no-port-here': expected HOST:PORT",
                "bad-limit": "--downtime-limit must be > 0 ms",
                }[case]
    r = pvmig("migrate", *args, timeout=60)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr
    _assert_unharmed(a, "vm", before)
    assert set(domains(b)) == set()


def test_bad_input_to_domain_create(cluster):
    a = cluster["a"].address
    for args, expected in [
            (("--ram-mb", str(1 << 30)), "larger than host a allows"),
            (("--hot-share", "2"), "hot_share must be within 0..1"),
            (("--dirty-rate", "-5"), "dirty rate must be >= 0"),
    ]:
        r = pvmig("domain", "create", "x", "--agent", a, *args)
        assert r.returncode == 1 and r.stderr.startswith("pvmig: error: "), r.stderr
        assert expected in r.stderr
    create(a, "dup", ram_mb=8)
    r = pvmig("domain", "create", "dup", "--agent", a, "--ram-mb", "8")
    assert r.returncode == 1 and "domain 'dup' already exists on host a" in r.stderr
    r = pvmig("domain", "create", "bad/name", "--agent", a)
    assert r.returncode == 1 and "bad domain name 'bad/name'" in r.stderr
    assert set(domains(a)) == {"dup"}


def test_agent_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = pvmig("agent", "--listen", f"127.0.0.1:{port}", "--name", "x",
                  "--data-dir", str(tmp_path / "d"), "--mem-dir", str(tmp_path / "m"), timeout=30)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr

"""End to end: what running agents on real hosts needs. A config file per host, shared
storage mounted at a different place on each, and clear errors for what is wrong: a
port in use, an address nobody answers at, a peer of another protocol version."""

from __future__ import annotations

import grpc
import pytest
from support import local_cluster, migrate, pvmig

from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.tools.cluster import LocalAgent


def test_config_files_and_storage_mounted_apart(tmp_path):
    shared = tmp_path / "nfs-export"
    shared.mkdir()
    (tmp_path / "mnt-b").symlink_to(shared)  # host b mounts the same storage elsewhere
    for name, mount in (("a", shared), ("b", tmp_path / "mnt-b")):
        (tmp_path / f"{name}.toml").write_text(
            f'storage_dir = "{mount}"\nsession_timeout = 60.0\nlog_level = "info"\n')
    with local_cluster(tmp_path, ["a", "b"],
                      extra_args=lambda n: ["--config", str(tmp_path / f"{n}.toml")]) as c:
        a, b = c["a"].address, c["b"].address
        r = pvmig("domain", "create", "vm", "--agent", a, "--ram-mb", "16", "--disk", "vm.img",
                  "--disk-latency-ms", "5")
        assert r.returncode == 0, r.stderr
        assert (shared / "vm.img").stat().st_size > 0
        r, data = migrate(a, b, "vm", tmp_path / "r.json")
        assert r.returncode == 0, r.stderr
        (blk,) = [d for d in data["devices"] if d["kind"] == "vbd"]
        assert blk["served-on-dest"] > 0 and blk["guest-checks"]["read-failures"] == 0


def test_a_relative_disk_needs_a_storage_dir(tmp_path):
    with local_cluster(tmp_path, ["a"]) as c:
        r = pvmig("domain", "create", "vm", "--agent", c["a"].address, "--disk", "vm.img")
        assert r.returncode == 1 and "has no --storage-dir" in r.stderr, r.stderr
        r = pvmig("domain", "list", "--agent", c["a"].address)
        assert r.returncode == 0 and "vm" not in r.stdout


def test_a_port_in_use_is_named(tmp_path):
    with local_cluster(tmp_path, ["a"]) as c:
        r = pvmig("agent", "--listen", c["a"].address, "--name", "x",
                  "--data-dir", str(tmp_path / "x"), timeout=30)
        assert r.returncode == 1 and f"cannot listen on {c['a'].address}" in r.stderr
        assert "port in use" in r.stderr


def test_bad_addresses(tmp_path):
    r = pvmig("domain", "list", "--agent", "no-port-here")
    assert r.returncode == 1 and "bad address 'no-port-here': expected HOST:PORT" in r.stderr
    agent = LocalAgent("a", tmp_path).start()
    try:
        port = int(agent.address.rpartition(":")[2])
    finally:
        agent.stop()
        agent.cleanup()
    r = pvmig("domain", "list", "--agent", f"127.0.0.1:{port}", timeout=60)
    assert r.returncode == 1 and f"cannot reach agent at 127.0.0.1:{port}" in r.stderr


@pytest.mark.quick
def test_a_peer_of_another_protocol_version_is_told_which(tmp_path):
    with local_cluster(tmp_path, ["a"]) as c, grpc.insecure_channel(c["a"].address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.AgentStub(ch).Hello(pb.HelloRequest(protocol_version=99, client="pvmig 9"),
                                        timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "pvmig 9 speaks protocol version 99" in e.value.details()
        assert "run the same pvmig release on both" in e.value.details()

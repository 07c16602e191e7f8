"""End to end over a real link: hosts in network namespaces on one switch, each uplink
shaped by tc tbf (deploy/netns-cluster.sh). A busy guest with a disk on shared storage
and a NIC moves a -> b and back while a net peer on host b talks to it; a guest whose
disk only its host has moves with the disk (--copy-storage), there and back; a host of
three is evacuated (pvmig evacuate) of four busy guests through its one uplink.

The root namespace cannot reach the hosts' addresses (the links live entirely in the
cluster's namespaces), so every pvmig command runs on one of the hosts through
`ip netns exec`, as a toolstack runs on a host: a -> b is driven from a, b -> a from b.
Needs root and iproute2 (veth, tbf); skipped without them, failed without them in CI.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support import FleetProbe, check_fleet_result, device, netns_cluster_up

RATE_MBIT = 200
RAM_MB = 64


@pytest.fixture
def netns_cluster(tmp_path):
    with netns_cluster_up(tmp_path, f"{RATE_MBIT}mbit") as cluster:
        yield cluster


def migrate_on(cluster, host: str, source: str, dest: str, report, *extra: str) -> dict:
    r = cluster["on"][host].pvmig("migrate", "--source", cluster[source],
                                  "--dest", cluster[dest], "--domain", "vm",
                                  "--report", str(report), *extra, timeout=180)
    assert r.returncode == 0, f"migrate {source} -> {dest} failed:\n{r.stdout[-3000:]}{r.stderr}"
    data = json.loads(report.read_text())
    assert data["status"] == "completed" and data["verification"]["passed"] is True, data
    assert data["verification"]["guest-checks"]["failed"] == 0, data["verification"]
    # The shaped link, not loopback, carried the pages: under the cap (a little slack for
    # tbf's bucket and for the clock that bounds pre-copy) ...
    assert 20 < data["mbps"] < RATE_MBIT * 1.3, data["mbps"]
    # ... and no faster than the cap allows for what was sent.
    floor_s = data["transferred-bytes"] * 8 / (RATE_MBIT * 1e6)
    assert data["total-time-ms"] / 1000 > 0.9 * floor_s, (data["total-time-ms"], floor_s)
    assert data["rounds"][0]["pages"] == RAM_MB * 256  # round 0 sends every frame
    assert 0 < data["downtime-ms"] < 3000, data["downtime-ms"]
    return data


def test_migrate_busy_guest_over_shaped_link_and_back(netns_cluster, tmp_path):
    c = netns_cluster
    on_a, on_b = c["on"]["a"], c["on"]["b"]
    # Shared storage: both hosts see the root namespace's file system at the same paths.
    disk = tmp_path / "vm.img"
    r = on_a.pvmig("domain", "create", "vm", "--agent", c["a"], "--ram-mb", str(RAM_MB),
                   "--dirty-rate", "2000", "--disk", str(disk), "--disk-blocks", "256",
                   "--disk-latency-ms", "5", "--disk-io-rate", "200", "--vif")
    assert r.returncode == 0, r.stderr
    booted = on_a.wait_checking(c["a"], "vm")
    guest_on_a = device(booted, "vif")["address"]
    assert guest_on_a.startswith(c["a"].split(":")[0] + ":")  # netback binds the host's address

    # The peer lives on host b: until the move its requests cross the shaped link.
    peer = subprocess.Popen(on_b.argv("peer", "--guest", guest_on_a, "--rate", "100",
                                      "--duration", "0",
                                      "--until-announced", "2", "--give-up", "30"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        on_a.wait_domain(c["a"], "vm",
                         lambda d: int(device(d, "vif")["guest"].get("requests", 0)) > 0,
                         "the guest answering the peer")
        there = migrate_on(c, "a", "a", "b", tmp_path / "there.json")
        assert on_a.domains(c["a"]) == []
        on_b.wait_checking(c["b"], "vm")
        back = migrate_on(c, "b", "b", "a", tmp_path / "back.json")
        assert on_b.domains(c["b"]) == []
        out, err = peer.communicate(timeout=180)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    print(f"a -> b: {there['mbps']} Mbit/s, downtime {there['downtime-ms']} ms, "
          f"{there['dirty-sync-count']} rounds; b -> a: {back['mbps']} Mbit/s, downtime "
          f"{back['downtime-ms']} ms, {back['dirty-sync-count']} rounds")

    assert peer.returncode == 0, (out, err)
    final = json.loads(out)
    assert final["sent"] > 0 and final["lost"] == 0 and final["answered"] == final["sent"]
    home = on_a.wait_checking(c["a"], "vm")
    # The peer followed the guest there and home (a new netback, a new port on a).
    assert final["announcements"] >= 2 and final["target"] == device(home, "vif")["address"], final
    assert int(home["guest"].get("checks_failed", 0)) == 0
    blk = device(home, "vbd")["guest"]
    assert int(blk.get("reads_checked", 0)) > 0 and int(blk.get("read_failures", 0)) == 0


def test_disk_only_one_host_has_moves_there_and_back(netns_cluster, tmp_path):
    """Each host's own storage dir (BASE/HOST/storage); a 4 MiB disk half full, written
    all along, copied across the shaped link beside memory, the source's image removed
    once each move is complete: one image at the end, where the guest is, and every
    write the guest saw acknowledged on it (its reads check each block's last one)."""
    c = netns_cluster
    on_a = c["on"]["a"]
    stores = {h: c["base"] / h / "storage" for h in ("a", "b")}
    r = on_a.pvmig("domain", "create", "vm", "--agent", c["a"], "--ram-mb", str(RAM_MB),
                   "--dirty-rate", "2000", "--disk", "vm.img", "--disk-blocks", "1024",
                   "--disk-fill", "0.5", "--disk-latency-ms", "5", "--disk-io-rate", "300")
    assert r.returncode == 0, r.stderr
    on_a.wait_checking(c["a"], "vm")
    assert (stores["a"] / "vm.img").exists() and not (stores["b"] / "vm.img").exists()
    for host, source, dest in (("a", "a", "b"), ("b", "b", "a")):
        on_dest = c["on"][dest]
        (vm,) = c["on"][source].domains(c[source])
        before = int(device(vm, "vbd")["guest"].get("writes_acked", 0))
        data = migrate_on(c, host, source, dest, tmp_path / f"{source}-{dest}.json",
                          "--copy-storage", "--remove-source-storage")
        s = data["storage"]
        assert s["verdict"]["unexplained"] == 0 and s["source-image"] == "removed", s
        assert s["storage-rounds"][0]["blocks"] == 1024 and s["bytes-ratio"] >= 0.5, s
        assert (stores[dest] / "vm.img").exists() and not (stores[source] / "vm.img").exists()
        (vbd,) = [d for d in data["devices"] if d["kind"] == "vbd"]
        assert vbd["guest-checks"]["read-failures"] == 0 and vbd["guest-checks"]["errors"] == 0
        on_dest.wait_domain(c[dest], "vm", lambda d: int(device(d, "vbd")["guest"].get(
            "writes_acked", 0)) > before + 30, "the guest writing its disk at " + dest)
    home = on_a.wait_checking(c["a"], "vm")
    blk = device(home, "vbd")["guest"]
    assert int(blk["resumes"]) == 2 and int(blk.get("read_failures", 0)) == 0
    assert int(blk.get("reads_checked", 0)) > 0 and int(home["guest"].get("checks_failed", 0)) == 0


def test_evacuate_a_host_of_three_through_its_shaped_uplink(tmp_path):
    """Four busy guests leave a through its one uplink (500 Mbit/s, shared by the
    migrations under way): at most 2 at once, as the fleet file says; each runs once,
    clean, at the end; each agent's metrics say what the report says."""
    with netns_cluster_up(tmp_path, "500mbit", hosts=3,
                          agent_args=("--metrics-listen", "0.0.0.0:9100",
                                      "--max-ram-mb", "320")) as c:
        on_a = c["on"]["a"]
        for i in range(4):
            r = on_a.pvmig("domain", "create", f"vm{i}", "--agent", c["a"], "--ram-mb",
                           str(RAM_MB), "--dirty-rate", "2000", "--disk",
                           str(tmp_path / f"vm{i}.img"), "--disk-io-rate", "100")
            assert r.returncode == 0, r.stderr
        fleet = c["base"] / "fleet.toml"
        text = fleet.read_text()
        assert text.count("[[agents]]") == 3, text
        fleet.write_text(text.replace("[fleet]", "[fleet]\nparallel_migrations = 2\n"
                                      "parallel_outbound_per_host = 2"))
        report = tmp_path / "evacuate.json"
        r = on_a.pvmig("evacuate", "a", "--fleet", str(fleet), "--report", str(report),
                       timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        result = json.loads(report.read_text())
        assert result["status"] == "completed" and result["census-ok"], result
        assert {row["dest"] for row in result["migrations"]} == {"b", "c"}
        metrics = {h: json.loads((c["base"] / h / "ready.json").read_text())["metrics"]
                   for h in c["hosts"]}
        probe = FleetProbe(on_a, {h: (c[h], metrics[h].replace("0.0.0.0", c[h].split(":")[0]))
                                  for h in c["hosts"]})
        check_fleet_result(result, probe, cluster_cap=2, outbound_cap=2)

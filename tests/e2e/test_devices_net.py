"""End to end: a guest with a busy disk AND a busy NIC migrates A to B and back while a
net peer talks to it from outside: the peer follows the guest (the announcement), its
retransmissions cover what netfront dropped, nothing is lost."""

from __future__ import annotations

import json

import pytest
from support import (
    eventually,
    migrate,
    peer_stats,
    pvmig,
    query,
    start_peer,
    wait_running_and_checking,
)


def _vif_address(address: str) -> str:
    (vif,) = [s for s in query(address, "vm").device_stats if s.kind == "vif"]
    return vif.address


@pytest.mark.quick
def test_disk_and_nic_busy_there_and_back(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    r = pvmig("domain", "create", "vm", "--agent", a, "--ram-mb", "32", "--dirty-rate", "2000",
              "--disk", str(tmp_path / "vm.img"), "--disk-blocks", "128",
              "--disk-latency-ms", "30", "--disk-io-rate", "300", "--vif")
    assert r.returncode == 0, r.stderr
    wait_running_and_checking(a, "vm")
    stats = tmp_path / "peer.json"
    # The peer ends by itself once it has followed the guest there and home again.
    peer = start_peer(_vif_address(a), stats, "--duration", "0", "--until-announced", "2",
                      rate=200)
    try:
        eventually(lambda: peer_stats(stats).get("answered", 0) >= 100,
                   what="the guest answering the peer (its netback has learnt it)")
        r, there = migrate(a, b, "vm", tmp_path / "there.json",
                           "--net-peer-stats", str(stats), "--net-peer-wait", "1")
        assert r.returncode == 0, r.stderr
        assert there["verification"]["passed"] is True
        blk, vif = sorted(there["devices"], key=lambda d: d["kind"])
        assert blk["inflight-at-suspend"] > 0 and blk["replayed-on-dest"] == blk["inflight-at-suspend"]
        assert blk["guest-checks"]["read-failures"] == 0
        assert vif["packets-in-on-dest"] > 0 and vif["address-on-dest"] == _vif_address(b)
        assert vif["guest-checks"]["requests"] > 0
        assert there["net-peer"]["announcements"] >= 1
        assert there["net-peer"]["target"] == _vif_address(b)  # the peer followed the guest

        answered_there = peer_stats(stats)["answered"]
        eventually(lambda: peer_stats(stats)["answered"] >= answered_there + 100,
                   what="the guest answering the peer on b")
        r, back = migrate(b, a, "vm", tmp_path / "back.json")
        assert r.returncode == 0, r.stderr
        assert back["verification"]["passed"] is True
        out, err = peer.communicate(timeout=120)
    finally:
        if peer.poll() is None:
            peer.kill()
    final = json.loads(out)
    assert peer.returncode == 0, (out, err)
    assert final["sent"] > 200 and final["lost"] == 0 and final["outstanding"] == 0
    assert final["answered"] == final["sent"]
    assert final["announcements"] >= 2 and final["target"] == _vif_address(a)
    assert final["longest-outage-ms"] > 0
    home = wait_running_and_checking(a, "vm")
    vif_guest = dict([s for s in home.device_stats if s.kind == "vif"][0].guest)
    assert vif_guest["resumes"] == 2 and vif_guest["requests"] >= final["sent"]
    assert home.guest.checks_failed == 0

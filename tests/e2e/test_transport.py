"""End to end: the two transports. Data channels (tcp, the default) and gRPC's
PageStream move the same guest, the report says which ran; a batch damaged on the way
aborts before the destination's copy runs, on either; an agent without a data listener
is reached over gRPC only, and says so."""

from __future__ import annotations

import pytest
from support import create, domains, migrate, wait_running_and_checking


@pytest.mark.quick
def test_both_transports_there_and_back(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=64, dirty_rate=3000, fill=0.9)
    before = wait_running_and_checking(a, "vm")
    r, there = migrate(a, b, "vm", tmp_path / "there.json")
    assert r.returncode == 0, r.stderr
    assert there["transport"] == "tcp" and there["verification"]["passed"] is True
    assert "data connection 3 (epoch 1)" in cluster["b"].log_file.read_text()
    r, back = migrate(b, a, "vm", tmp_path / "back.json", "--transport", "grpc")
    assert r.returncode == 0, r.stderr
    assert back["transport"] == "grpc" and back["verification"]["passed"] is True
    home = wait_running_and_checking(a, "vm")
    assert home.guest.resumes == 2 and home.guest.checks_failed == 0
    assert home.guest.steps > before.guest.steps
    # the same pages either way: what the guest never wrote (fill 0.9: a tenth of it)
    # goes as frame numbers only, on both
    for data in (there, back):
        assert data["rounds"][0]["zero-pages"] > 0
        assert data["rounds"][0]["normal-pages"] + data["rounds"][0]["zero-pages"] == \
            (64 << 20) // 4096


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_damaged_batch_aborts_before_the_destination_runs(cluster, tmp_path, transport):
    """corrupt-batch: round 0's second batch leaves with its checksum one off. Nothing
    wrote its frames (an idle guest), so nothing explains it: the migration aborts, the
    guest goes on at home, and the destination holds nothing."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=0, fill=1.0)
    before = wait_running_and_checking(a, "vm")
    r, data = migrate(a, b, "vm", tmp_path / "r.json", "--transport", transport,
                      "--inject", "corrupt-batch")
    assert r.returncode == 1
    assert data["status"] == "failed" and data["committed"] is False
    assert "aborted, the guest runs on the source" in data["error"]
    if transport == "tcp":  # the destination's report, whole, then the source's verdict
        assert "batch 1: checksum mismatch" in data["error"], data["error"]
        assert "nothing wrote its frames" in data["error"]
    else:  # gRPC may fail the next write ("Internal error from Core") before the status
        assert "batch 1: checksum mismatch" in cluster["b"].log_file.read_text()
    assert "vm" not in domains(b)
    after = wait_running_and_checking(a, "vm")
    assert after.state == "running" and after.guest.checks_failed == 0
    assert after.guest.steps > before.guest.steps and after.guest.resumes == 0


def test_an_agent_without_a_data_listener_takes_grpc_only(make_cluster, tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('transport = "grpc"\n')
    c = make_cluster(extra_args=lambda n: ["--data-listen", "off"] if n == "b"
                     else ["--config", str(config)])
    a, b = c["a"].address, c["b"].address
    assert c["b"].data_port is None and c["a"].data_port
    create(a, "vm", ram_mb=32, dirty_rate=2000)
    wait_running_and_checking(a, "vm")
    r, data = migrate(a, b, "vm", tmp_path / "tcp.json", "--transport", "tcp")
    assert r.returncode == 1
    assert "no data listener (--data-listen off)" in data["error"], data["error"]
    assert "--transport grpc" in data["error"]
    assert wait_running_and_checking(a, "vm").guest.checks_failed == 0
    # a's own setting (its config file) is grpc: a migration that names none takes it
    r, data = migrate(a, b, "vm", tmp_path / "grpc.json")
    assert r.returncode == 0, r.stderr
    assert data["transport"] == "grpc" and data["verification"]["passed"] is True
    assert "vm" in domains(b)

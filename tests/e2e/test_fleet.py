"""End to end: a fleet of three agents (pvmig evacuate, pvmig rebalance), with busy
guests, the caps checked from the agents' own ledgers, every guest running once and
clean at the end, and each agent's metrics matching the reports. Then bad input: each
refused by name, nothing lost or doubled."""

from __future__ import annotations

import json

import pytest
from support import (
    FleetProbe,
    Via,
    check_fleet_result,
    create,
    domains,
    interrupted,
    metric,
    pvmig,
    scrape,
)

NAMES = ("a", "b", "c")


@pytest.fixture
def fleet3(make_cluster, tmp_path):
    return make_cluster(NAMES, extra_args=lambda name: [
        "--metrics-listen", "127.0.0.1:0", "--max-ram-mb", "320"])


def agents_of(cluster) -> FleetProbe:
    return FleetProbe(Via([]), {n: (cluster[n].address, cluster[n].metrics) for n in NAMES})


def write_fleet(cluster, tmp_path, body: str = "", **caps) -> str:
    path = tmp_path / "fleet.toml"
    path.write_text(cluster.fleet_toml(labels={"b": {"disk": "ssd"}}, **caps) + body)
    return str(path)


def evacuate(fleet: str, tmp_path, host: str = "a", *extra: str):
    report = tmp_path / "evacuate.json"
    r = pvmig("evacuate", host, "--fleet", fleet, "--report", str(report), *extra,
              timeout=300)
    return r, (json.loads(report.read_text()) if report.exists() else None)


DB_POLICY = """
[[policies]]
name = "db"
selector = { tier = "db" }
hosts = { disk = "ssd" }
bandwidth_mbps = 2000
"""


def test_evacuate_a_host_of_three_under_the_caps(fleet3, tmp_path):
    """Four busy guests (memory written at 2000 pages/s, a disk on shared storage under
    I/O) leave a; the one labelled tier=db may go only to the ssd host, b, although c
    has more room; at most 2 at once."""
    a = fleet3["a"].address
    create(fleet3["b"].address, "resident", ram_mb=64)  # b is fuller than c
    for i in range(4):
        create(a, f"vm{i}", ram_mb=64, disk=str(tmp_path / f"vm{i}.img"),
               disk_io_rate=100, label=f"tier={'db' if i == 3 else 'web'}")
    fleet = write_fleet(fleet3, tmp_path, DB_POLICY, parallel_migrations=2,
                        parallel_outbound_per_host=2)
    r, result = evacuate(fleet, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert result["status"] == "completed" and result["census-ok"], result
    assert not domains(a), "a is empty"
    rows = {row["domain"]: row for row in result["migrations"]}
    assert rows["vm3"]["dest"] == "b" and rows["vm3"]["policy"] == "db"
    assert {row["dest"] for row in rows.values()} == {"b", "c"}
    assert all(len(row["attempts"]) == 1 for row in rows.values())
    assert all(row["attempts"][0]["verified"] for row in rows.values())
    assert dict(domains(fleet3["b"].address)["vm3"].labels) == {"tier": "db"}
    # the queue: never more than the cap migrating, and it drained
    assert max(q["migrating"] for q in result["queue"]) <= 2
    assert result["queue"][-1] == {**result["queue"][-1], "queued": 0, "migrating": 0}
    check_fleet_result(result, agents_of(fleet3), cluster_cap=2, outbound_cap=2)


def test_rebalance_evens_ram(fleet3, tmp_path):
    a = fleet3["a"].address
    for i in range(4):
        create(a, f"vm{i}", ram_mb=64)
    fleet = write_fleet(fleet3, tmp_path, parallel_migrations=1,
                        parallel_outbound_per_host=1)
    report = tmp_path / "rebalance.json"
    r = pvmig("rebalance", "--fleet", fleet, "--report", str(report), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(report.read_text())
    # 4, 0, 0 domains of 64 MiB: two moves leave 2, 1, 1 (no third narrows it)
    assert len(result["migrations"]) == 2
    assert sorted(len(domains(fleet3[n].address)) for n in NAMES) == [1, 1, 2]
    assert result["spread-planned"] < result["spread-before"]
    check_fleet_result(result, agents_of(fleet3), cluster_cap=1, outbound_cap=1)


# ---- bad input: refused by name, nothing lost or doubled


def test_a_fleet_file_with_unknown_keys_or_impossible_limits_is_refused(fleet3, tmp_path):
    create(fleet3["a"].address, "vm0", ram_mb=32)
    for body, said in (("\n[defaults]\nbandwith_mbps = 100\n", "'bandwith_mbps'"),
                       ("\n[defaults]\nbandwidth_mbps = 8\ncompletion_timeout_per_gib_s = 60\n",
                        "cannot be met"),
                       ("\n[[policies]]\nname = \"x\"\nhosts = { zone = \"mars\" }\n",
                        "matches no agent")):
        fleet = write_fleet(fleet3, tmp_path, body)
        r, result = evacuate(fleet, tmp_path)
        assert r.returncode == 1 and said in r.stderr, r.stderr
        assert result is None
    r, _ = evacuate(write_fleet(fleet3, tmp_path, parallel_migrations=1,
                                parallel_outbound_per_host=2), tmp_path)
    assert r.returncode == 1 and "can never be reached" in r.stderr, r.stderr
    r, _ = evacuate(write_fleet(fleet3, tmp_path), tmp_path, "z")
    assert r.returncode == 1 and "no agent 'z' in the fleet" in r.stderr, r.stderr
    assert "vm0" in domains(fleet3["a"].address)


def test_an_unreachable_agent_is_named_and_nothing_moves(fleet3, tmp_path):
    create(fleet3["a"].address, "vm0", ram_mb=32)
    fleet3["c"].stop()
    r, result = evacuate(write_fleet(fleet3, tmp_path), tmp_path)
    assert r.returncode == 1 and "not: c (" in r.stderr, r.stderr
    assert result is None and "vm0" in domains(fleet3["a"].address)
    assert not domains(fleet3["b"].address)


def test_a_domain_that_fits_nowhere_stays_and_is_named(fleet3, tmp_path):
    a = fleet3["a"].address
    create(fleet3["b"].address, "big-b", ram_mb=256)
    create(fleet3["c"].address, "big-c", ram_mb=256)
    create(a, "huge", ram_mb=128)  # b and c have 64 MiB left each
    create(a, "small", ram_mb=32)
    r, result = evacuate(write_fleet(fleet3, tmp_path), tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not moved: huge (128 MiB): needs 128 MiB; the most free" in r.stdout
    assert result["status"] == "partial" and result["census-ok"]
    assert [u["domain"] for u in result["unplaced"]] == ["huge"]
    assert set(domains(a)) == {"huge"}
    check_fleet_result(result, agents_of(fleet3), cluster_cap=5, outbound_cap=2)


def test_a_completion_timeout_aborts_or_pauses_as_its_policy_says(fleet3, tmp_path):
    """The deadline (a millisecond per GiB) has passed at the first round boundary,
    always: `abort` leaves the guest at a, counted as aborted; `pause` stops iterating
    there and completes (a longer downtime, but done)."""
    a = fleet3["a"].address
    create(a, "stays", ram_mb=64, label="action=abort")
    create(a, "goes", ram_mb=64, label="action=pause")
    body = "".join(f"""
[[policies]]
name = "{action}"
selector = {{ action = "{action}" }}
completion_timeout_per_gib_s = 0.001
timeout_action = "{action}"
""" for action in ("abort", "pause"))
    r, result = evacuate(write_fleet(fleet3, tmp_path, body, parallel_migrations=1,
                                     parallel_outbound_per_host=1), tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {row["domain"]: row for row in result["migrations"]}
    stays, goes = rows["stays"], rows["goes"]
    assert stays["state"] == "aborted" and len(stays["attempts"]) == 1, stays
    assert stays["attempts"][0]["intervention"]["action"] == "abort"
    assert "completion timeout" in stays["attempts"][0]["intervention"]["reason"]
    assert goes["state"] == "completed", goes
    assert goes["attempts"][0]["stop-reason"].startswith("forced (completion timeout")
    assert goes["attempts"][0]["intervention"]["round"] == 0
    assert set(domains(a)) == {"stays"} and result["census-ok"]
    m = scrape(fleet3["a"].metrics)
    assert metric(m, "pvmig_migrations_ended_total", role="source", outcome="aborted") == 1
    assert metric(m, "pvmig_migrations_ended_total", role="source", outcome="completed") == 1


def test_an_evacuation_cancelled_halfway_leaves_each_guest_once(fleet3, tmp_path):
    """SIGINT while the first of three migrations runs (capped at 100 Mbit/s: seconds
    for 64 MiB; one at a time): it aborts, the rest never start, each guest runs
    on exactly one host."""
    a = fleet3["a"].address
    for i in range(3):
        create(a, f"vm{i}", ram_mb=64)
    body = "\n[defaults]\nbandwidth_mbps = 100\n"
    report = tmp_path / "cancelled.json"
    code, out, err = interrupted(
        ["evacuate", "a", "--fleet", write_fleet(fleet3, tmp_path, body, parallel_migrations=1,
                                                 parallel_outbound_per_host=1),
         "--report", str(report)], when=" migrating precopy")
    assert code == 1, out + err
    assert "evacuate cancelled (SIGINT received)" in err, err
    result = json.loads(report.read_text())
    assert result["status"] == "cancelled" and result["census-ok"], result
    states = sorted(row["state"] for row in result["migrations"])
    assert states == ["cancelled"] * 3, states
    assert set(domains(a)) == {"vm0", "vm1", "vm2"}
    check_fleet_result(result, agents_of(fleet3), cluster_cap=1, outbound_cap=1,
                       metrics=False)
    assert metric(scrape(fleet3["a"].metrics), "pvmig_migrations_ended_total",
                  role="source", outcome="aborted") == 1

"""End to end: `pvmig scenario run` plays a timeline on three real agents (creations,
workload changes that move with their guests, a migration, an evacuation, a rebalance
when idle, a destroy), under the fleet's caps; its report accounts for every step and
every migration against the agents' own records, and its plots are written. A wrong
scenario is refused whole, before anything runs."""

from __future__ import annotations

import json

import pytest
from support import FleetProbe, Via, check_fleet_result, create, domains, interrupted, pvmig

NAMES = ("a", "b", "c")


@pytest.fixture
def fleet3(make_cluster):
    return make_cluster(NAMES, extra_args=lambda name: [
        "--metrics-listen", "127.0.0.1:0", "--max-ram-mb", "320"])


SCENARIO = """
fleet = "fleet.toml"
name = "play"

[[step]]
at = 0
create = { domain = "d1", host = "a", ram_mb = 64, dirty_rate = 2000, labels = { tier = "web" } }

[[step]]
at = 0
create = { domain = "d2", host = "a", ram_mb = 48, dirty_rate = 1000 }

[[step]]
at = 0
create = { domain = "d3", host = "b", ram_mb = 32 }

[[step]]
at = 0
create = { domain = "gone", host = "c", ram_mb = 16 }

[[step]]
at = 0.2
workload = { domain = "d1", dirty_rate = 6000 }

[[step]]
at = 0.2
migrate = { domain = "d3", to = "c" }

[[step]]
at = 0.2
evacuate = { host = "a" }

[[step]]
at = 0.2
destroy = { domain = "gone" }

[[step]]
at = 0.5
when_idle = true
workload = { domain = "d2", dirty_rate = 300 }

[[step]]
at = 0.5
rebalance = {}
"""


def write(tmp_path, cluster, scenario: str = SCENARIO, **caps) -> str:
    (tmp_path / "fleet.toml").write_text(cluster.fleet_toml(**caps))
    path = tmp_path / "play.toml"
    path.write_text(scenario)
    return str(path)


def test_a_scenario_plays_its_timeline_under_the_caps(fleet3, tmp_path):
    path = write(tmp_path, fleet3, parallel_migrations=2, parallel_outbound_per_host=1)
    out = tmp_path / "out"
    r = pvmig("scenario", "run", path, "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "report.json").read_text())
    assert result["status"] == "completed" and result["census-ok"], result
    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(1, 11))
    assert all(s["ok"] for s in steps), steps
    # every step at its time or later, in order
    assert all(s["started-ms"] >= s["at-ms"] for s in steps)
    assert [s["started-ms"] for s in steps] == sorted(s["started-ms"] for s in steps)

    # d3 b->c; the evacuation: d1 (the largest) to the emptiest host, b, then d2 to c;
    # the rebalance when idle (a empty, b 64 MiB, c 80 of 320) moved d2 back to a
    moves = [(row["origin"], row["domain"], row["source"], row["dest"])
             for row in result["migrations"]]
    assert moves == [("step 6", "d3", "b", "c"), ("step 7", "d1", "a", "b"),
                     ("step 7", "d2", "a", "c"), ("step 10", "d2", "c", "a")], moves
    assert steps[6]["detail"]["moves"] == ["d1 a->b", "d2 a->c"]
    assert all(row["state"] == "completed" and row["attempts"][-1]["verified"]
               for row in result["migrations"])
    # the destroyed domain is nowhere; the rest run once each (the census)
    assert result["census"]["gone"] == []
    assert all(len(where) == 1 for name, where in result["census"].items()
               if name != "gone")

    # step 9 waited for the queue to drain, and reached d2 where it went, c
    assert steps[8]["started-ms"] >= max(
        row["ended-ms"] for row in result["migrations"] if row["origin"] != "step 10")
    assert steps[8]["detail"]["host"] == "c"
    # each workload change went with its guest: d1's, made on a, to b; d2's, made on
    # c, back to a
    assert domains(fleet3["b"].address)["d1"].workload.dirty_rate == 6000
    assert domains(fleet3["a"].address)["d2"].workload.dirty_rate == 300

    # the caps, from the agents' ledgers, and the metrics against the report
    check_fleet_result(result, FleetProbe(Via([]), {
        n: (fleet3[n].address, fleet3[n].metrics) for n in NAMES}),
        cluster_cap=2, outbound_cap=1)
    assert (out / "timeline.png").stat().st_size > 0
    assert (out / "migrations.png").stat().st_size > 0


@pytest.mark.parametrize("bad,expect", [
    ('fleet = "fleet.toml"\n[[step]]\nat = 0\nlaunch = { domain = "x" }\n',
     "unknown key(s) 'launch'"),
    ('fleet = "fleet.toml"\n[[step]]\nat = 1\ncreate = { domain = "x", host = "z" }\n',
     "create host: no agent 'z' in the fleet"),
    ('fleet = "fleet.toml"\n[[step]]\nat = 2\nrebalance = {}\n[[step]]\nat = 1\n'
     'evacuate = { host = "a" }\n', "step 2: at = 1 is before step 1's 2"),
    ('fleet = "fleet.toml"\n[[step]]\nat = 0\nworkload = { domain = "x" }\n',
     "workload needs dirty_rate or io_rate"),
    ('fleet = "nofleet.toml"\n[[step]]\nat = 0\nrebalance = {}\n',
     "cannot read the fleet file"),
])
def test_a_wrong_scenario_is_refused_whole(fleet3, tmp_path, bad, expect):
    path = write(tmp_path, fleet3, scenario=bad)
    r = pvmig("scenario", "run", path, "--out", str(tmp_path / "out"), timeout=60)
    assert r.returncode != 0 and expect in r.stderr, r.stderr
    assert not (tmp_path / "out" / "report.json").exists()
    assert all(not domains(fleet3[n].address) for n in NAMES), "nothing ran"


def test_pvmig_domain_workload_changes_a_running_guest(cluster):
    a = cluster["a"].address
    create(a, "w", ram_mb=16, dirty_rate=100)
    r = pvmig("domain", "workload", "w", "--agent", a, "--dirty-rate", "4000")
    assert r.returncode == 0 and "w: dirty rate 4000 pages/s" in r.stdout, r.stderr
    assert domains(a)["w"].workload.dirty_rate == 4000
    for args, expect in ((["--dirty-rate", "-1"], "dirty_rate must be a finite number >= 0"),
                         (["--io-rate", "5"], "domain 'w' has no disk"),
                         ([], "give --dirty-rate or --io-rate")):
        r = pvmig("domain", "workload", "w", "--agent", a, *args)
        assert r.returncode != 0 and expect in r.stderr, r.stderr
    r = pvmig("domain", "workload", "nope", "--agent", a, "--dirty-rate", "1")
    assert r.returncode != 0 and "no domain 'nope'" in r.stderr, r.stderr
    info = domains(a)["w"]
    assert info.state == "running" and info.workload.dirty_rate == 4000
    assert info.guest.checks_failed == 0


CANCELLED = """
fleet = "fleet.toml"
name = "cancelled"

[[step]]
at = 0
create = { domain = "vm0", host = "a", ram_mb = 64 }

[[step]]
at = 0
create = { domain = "vm1", host = "a", ram_mb = 64 }

[[step]]
at = 0
evacuate = { host = "a" }

[[step]]
at = 0
when_idle = true
create = { domain = "late", host = "b", ram_mb = 16 }
"""


def test_a_scenario_cancelled_halfway_leaves_each_guest_once(fleet3, tmp_path):
    """SIGINT while the first of two moves runs (100 Mbit/s, one at a time): it aborts,
    the other never starts, the step still waiting is skipped, each guest runs once."""
    (tmp_path / "fleet.toml").write_text(
        fleet3.fleet_toml(parallel_migrations=1, parallel_outbound_per_host=1)
        + "\n[defaults]\nbandwidth_mbps = 100\n")
    (tmp_path / "c.toml").write_text(CANCELLED)
    out = tmp_path / "out"
    code, stdout, err = interrupted(
        ["scenario", "run", str(tmp_path / "c.toml"), "--out", str(out)],
        when=" migrating precopy")
    assert code == 1, stdout + err
    assert "step 4 (create): skipped: SIGINT received" in err, err
    result = json.loads((out / "report.json").read_text())
    assert result["status"] == "cancelled" and result["census-ok"], result
    assert [s["ok"] for s in result["steps"]] == [True, True, True, False]
    assert sorted(row["state"] for row in result["migrations"]) == ["cancelled"] * 2
    assert set(domains(fleet3["a"].address)) == {"vm0", "vm1"}
    assert not domains(fleet3["b"].address) and not domains(fleet3["c"].address)


def test_a_scenario_with_an_agent_down_runs_nothing(fleet3, tmp_path):
    (tmp_path / "fleet.toml").write_text(fleet3.fleet_toml().replace(
        fleet3["c"].address, "127.0.0.1:9"))  # (discard: nobody answers there)
    (tmp_path / "s.toml").write_text(
        'fleet = "fleet.toml"\n[[step]]\nat = 0\ncreate = { domain = "x", host = "a" }\n')
    r = pvmig("scenario", "run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"),
              timeout=120)
    assert r.returncode != 0 and "the fleet's agents must all answer; not: c" in r.stderr, \
        r.stderr
    assert not (tmp_path / "out" / "report.json").exists()
    assert not domains(fleet3["a"].address)

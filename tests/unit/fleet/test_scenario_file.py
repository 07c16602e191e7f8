"""The scenario file (pvmig.fleet.scenario): parsed and checked whole, against its
fleet file, before anything runs; each refusal names the step and what is wrong."""

from __future__ import annotations

import pytest

from pvmig import errors
from pvmig.cli import main
from pvmig.fleet import scenario

FLEET = """
[fleet]
parallel_migrations = 2
parallel_outbound_per_host = 1
[[agents]]
name = "a"
address = "127.0.0.1:7001"
[[agents]]
name = "b"
address = "127.0.0.1:7002"
"""


def load(tmp_path, body: str, fleet: str = FLEET):
    (tmp_path / "fleet.toml").write_text(fleet)
    path = tmp_path / "s.toml"
    path.write_text('fleet = "fleet.toml"\n' + body)
    return scenario.load(path)


def refused(tmp_path, body: str, *needles: str) -> str:
    with pytest.raises(errors.InvalidArgument) as e:
        load(tmp_path, body)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_a_scenario_reads_as_its_steps(tmp_path):
    spec = load(tmp_path, """
name = "study"
[[step]]
at = 0
create = { domain = "d1", host = "a", ram_mb = 128, dirty_rate = 3000, labels = { t = "db" } }
[[step]]
at = 1.5
workload = { domain = "d1", dirty_rate = 10 }
[[step]]
at = 1.5
migrate = { domain = "d1", to = "127.0.0.1:7002" }
[[step]]
at = 2
when_idle = true
evacuate = { host = "b" }
[[step]]
at = 3
rebalance = {}
[[step]]
at = 3
destroy = { domain = "d1" }
""")
    assert spec.name == "study" and spec.fleet.parallel_migrations == 2
    assert [(s.number, s.at, s.action) for s in spec.steps] == [
        (1, 0.0, "create"), (2, 1.5, "workload"), (3, 1.5, "migrate"), (4, 2.0, "evacuate"),
        (5, 3.0, "rebalance"), (6, 3.0, "destroy")]
    assert spec.steps[0].args == {"domain": "d1", "host": "a", "ram_mb": 128,
                                  "dirty_rate": 3000.0, "labels": {"t": "db"}}
    assert spec.steps[2].args["to"] == "b"  # an agent named by its address: by its name
    assert spec.steps[3].when_idle and not spec.steps[4].when_idle
    assert spec.steps[2].title == "step 3: migrate domain=d1 to=b"


def test_the_name_defaults_to_the_files(tmp_path):
    assert load(tmp_path, "[[step]]\nat = 0\nrebalance = {}\n").name == "s"


@pytest.mark.parametrize("body,needles", [
    ("[[step]]\nat = 0\nrebalance = {}\nextra = 1\n", ["step 1", "unknown key(s) 'extra'"]),
    ("[[step]]\nat = 0\n", ["step 1", "one action of", "none"]),
    ("[[step]]\nat = 0\nrebalance = {}\nevacuate = { host = 'a' }\n",
     ["this one has evacuate, rebalance"]),
    ("[[step]]\nat = -1\nrebalance = {}\n", ["at is the step's time", "-1"]),
    ("[[step]]\nat = 'soon'\nrebalance = {}\n", ["at is the step's time"]),
    ("[[step]]\nat = nan\nrebalance = {}\n", ["at is the step's time"]),
    ("[[step]]\nat = 0\nwhen_idle = 1\nrebalance = {}\n", ["when_idle is true or false"]),
    ("[[step]]\nat = 0\nevacuate = 'a'\n", ["evacuate is a table"]),
    ("[[step]]\nat = 0\nevacuate = {}\n", ["evacuate needs host"]),
    ("[[step]]\nat = 0\nevacuate = { host = 'z' }\n", ["evacuate host: no agent 'z'"]),
    ("[[step]]\nat = 0\nmigrate = { domain = 'd', to = 'z' }\n", ["migrate to: no agent"]),
    ("[[step]]\nat = 0\nmigrate = { domain = 'd', dest = 'b' }\n",
     ["migrate: unknown key(s) 'dest'", "known: domain, to"]),
    ("[[step]]\nat = 0\ncreate = { domain = 'd', host = 'a', ram_mb = 0 }\n",
     ["ram_mb must be > 0"]),
    ("[[step]]\nat = 0\ncreate = { domain = 'd', host = 'a', ram_mb = 1.5 }\n",
     ["create ram_mb is a whole number"]),
    ("[[step]]\nat = 0\ncreate = { domain = 'd', host = 'a', dirty_rate = -5 }\n",
     ["create dirty_rate is a number >= 0"]),
    ("[[step]]\nat = 0\ncreate = { domain = 'd', host = 'a', io_rate = 5 }\n",
     ["io_rate is a disk's: give disk_blocks"]),
    ("[[step]]\nat = 0\ncreate = { domain = 'd', host = 'a', labels = { 'a b' = 'x' } }\n",
     ["create labels", "bad label key"]),
    ("[[step]]\nat = 0\ncreate = { domain = '', host = 'a' }\n", ["create domain is a name"]),
    ("[[step]]\nat = 0\nworkload = { domain = 'd' }\n", ["workload needs dirty_rate"]),
    ("[[step]]\nat = 5\nrebalance = {}\n[[step]]\nat = 4\nrebalance = {}\n",
     ["step 2: at = 4 is before step 1's 5"]),
    ("", ["a scenario has steps"]),
    ("step = 3\n", ["a scenario has steps"]),
    ("title = 'x'\n[[step]]\nat = 0\nrebalance = {}\n", ["unknown key(s) 'title'"]),
])
def test_a_wrong_scenario_is_refused_by_name(tmp_path, body, needles):
    msg = refused(tmp_path, body, *needles)
    assert msg.startswith(str(tmp_path / "s.toml")), msg


def test_its_fleet_file_is_checked_too(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="unknown key 'speed' in \\[fleet\\]"):
        load(tmp_path, "[[step]]\nat = 0\nrebalance = {}\n",
             FLEET.replace("[fleet]\n", "[fleet]\nspeed = 1\n"))
    (tmp_path / "t.toml").write_text("[[step]]\nat = 0\nrebalance = {}\n")
    with pytest.raises(errors.InvalidArgument, match='fleet = "FILE" names the fleet file'):
        scenario.load(tmp_path / "t.toml")
    with pytest.raises(errors.InvalidArgument, match="cannot read the scenario"):
        scenario.load(tmp_path / "none.toml")
    (tmp_path / "u.toml").write_text("fleet = [")
    with pytest.raises(errors.InvalidArgument, match="not TOML"):
        scenario.load(tmp_path / "u.toml")


def test_pvmig_scenario_check_lists_the_steps_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "fleet.toml").write_text(FLEET)
    (tmp_path / "s.toml").write_text('fleet = "fleet.toml"\n[[step]]\nat = 0\n'
                                     'evacuate = { host = "a" }\n[[step]]\nat = 2.5\n'
                                     'when_idle = true\nrebalance = {}\n')
    assert main.main(["scenario", "check", str(tmp_path / "s.toml")]) == 0
    out = capsys.readouterr().out
    assert "2 steps over 2.5 s on 2 agents (a, b); caps 2 in all, 1 from one host" in out
    assert "    2.50 step 2: rebalance (when idle)" in out

"""The fleet file: parsed and checked whole before anything moves; every refusal names
what it refuses; and which policy (merged over the defaults) a domain gets."""

from __future__ import annotations

import copy
import math

import pytest

from pvmig import errors
from pvmig.fleet import config
from pvmig.fleet.config import Agent, Fleet, Settings
from pvmig.migration import policy as mpolicy
from pvmig.migration.policy import TimeoutAction

AGENTS = [
    {"name": "a", "address": "10.0.0.1:7000", "labels": {"zone": "left", "disk": "ssd"}},
    {"name": "b", "address": "10.0.0.2:7000", "labels": {"zone": "right"}},
]


def doc(**parts) -> dict:
    """A valid fleet document, with `parts` replacing its top-level tables."""
    d = {"agents": copy.deepcopy(AGENTS)}
    d.update(copy.deepcopy(parts))
    return d


def refused(d: dict, *needles: str) -> str:
    """parse(d) is refused; the message holds every needle. Returns the message."""
    with pytest.raises(errors.InvalidArgument) as e:
        config.parse(d, "fleet.toml")
    msg = str(e.value)
    assert msg.startswith("fleet.toml: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- what parses


def test_the_smallest_fleet_gets_every_default():
    f = config.parse(doc(), "fleet.toml")
    assert f.path == "fleet.toml"
    assert (f.parallel_migrations, f.parallel_outbound_per_host, f.retries) == (5, 2, 1)
    assert f.defaults == Settings()
    assert f.defaults.timeout_action is TimeoutAction.ABORT
    assert f.defaults.downtime_limit_ms == mpolicy.DOWNTIME_LIMIT_MS
    assert f.policies == ()
    assert list(f.agents) == ["a", "b"]
    assert f.agents["a"] == Agent("a", "10.0.0.1:7000", {"zone": "left", "disk": "ssd"})
    assert f.agents["b"].labels == {"zone": "right"}


def test_the_default_path_names_the_fleet():
    with pytest.raises(errors.InvalidArgument, match="^<fleet>: "):
        config.parse({})


def test_a_full_fleet():
    f = config.parse(doc(
        fleet={"parallel_migrations": 8, "parallel_outbound_per_host": 3, "retries": 0},
        defaults={"bandwidth_mbps": 1000, "completion_timeout_per_gib_s": 60,
                  "timeout_action": "pause", "progress_timeout_s": 0,
                  "downtime_limit_ms": 50.5, "copy_storage": True},
        policies=[{"name": "db", "selector": {"tier": "db"}, "hosts": {"disk": "ssd"},
                   "bandwidth_mbps": 400, "timeout_action": "abort"}],
    ))
    assert (f.parallel_migrations, f.parallel_outbound_per_host, f.retries) == (8, 3, 0)
    assert f.defaults == Settings(bandwidth_mbps=1000.0, completion_timeout_per_gib_s=60.0,
                                  timeout_action=TimeoutAction.PAUSE, progress_timeout_s=0.0,
                                  downtime_limit_ms=50.5, copy_storage=True)
    assert isinstance(f.defaults.bandwidth_mbps, float)
    (p,) = f.policies
    assert p.name == "db" and p.selector == {"tier": "db"} and p.hosts == {"disk": "ssd"}
    assert p.overrides == {"bandwidth_mbps": 400.0, "timeout_action": TimeoutAction.ABORT}
    assert p.specificity == 1


def test_agents_without_labels_have_none():
    d = doc()
    for a in d["agents"]:
        del a["labels"]
    assert all(a.labels == {} for a in config.parse(d).agents.values())


def test_outbound_may_equal_the_cluster_cap():
    f = config.parse(doc(fleet={"parallel_migrations": 1, "parallel_outbound_per_host": 1}))
    assert (f.parallel_migrations, f.parallel_outbound_per_host) == (1, 1)


def test_zero_disables_a_timeout_and_a_cap():
    f = config.parse(doc(defaults={"bandwidth_mbps": 0, "completion_timeout_per_gib_s": 0,
                                   "progress_timeout_s": 0}))
    assert f.defaults.bandwidth_mbps == 0 and f.defaults.completion_timeout_per_gib_s == 0


@pytest.mark.parametrize("action", ["abort", "pause", "postcopy"])
def test_every_timeout_action(action):
    assert config.parse(doc(defaults={"timeout_action": action})).defaults.timeout_action \
        is TimeoutAction(action)


def test_postcopy_without_copy_storage_is_fine():
    f = config.parse(doc(defaults={"timeout_action": "postcopy", "copy_storage": False}))
    assert f.defaults.timeout_action is TimeoutAction.POSTCOPY


def test_a_policy_without_hosts_goes_anywhere():
    f = config.parse(doc(policies=[{"name": "p", "selector": {"tier": "web"}}]))
    assert f.policies[0].hosts == {} and f.policies[0].overrides == {}


def test_policy_hosts_may_match_several_labels_of_one_agent():
    f = config.parse(doc(policies=[{"name": "p", "hosts": {"zone": "left", "disk": "ssd"}}]))
    assert f.policies[0].hosts == {"zone": "left", "disk": "ssd"}


# ---- load


FILE = """
[fleet]
parallel_migrations = 4
parallel_outbound_per_host = 1

[defaults]
bandwidth_mbps = 800
timeout_action = "pause"

[[agents]]
name = "a"
address = "10.0.0.1:7000"
labels = { zone = "left" }

[[agents]]
name = "b"
address = "host-b.example:7001"
labels = { zone = "right", disk = "ssd" }

[[policies]]
name = "db"
selector = { tier = "db" }
hosts = { disk = "ssd" }
bandwidth_mbps = 400
"""


def test_load_a_file(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(FILE)
    for given in (path, str(path)):
        f = config.load(given)
        assert f.path == str(path)
        assert (f.parallel_migrations, f.parallel_outbound_per_host, f.retries) == (4, 1, 1)
        assert f.defaults.bandwidth_mbps == 800 and f.defaults.timeout_action == "pause"
        assert f.agents["b"] == Agent("b", "host-b.example:7001",
                                      {"zone": "right", "disk": "ssd"})
        assert f.policies[0].overrides == {"bandwidth_mbps": 400.0}


def test_load_names_the_file_in_its_refusals(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(FILE.replace("parallel_migrations = 4", "parallel_migrations = 4\nspeed = 1"))
    with pytest.raises(errors.InvalidArgument) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ") and "'speed'" in str(e.value)


def test_load_a_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(errors.InvalidArgument, match="cannot read the fleet file") as e:
        config.load(path)
    assert str(path) in str(e.value) and "No such file" in str(e.value)


def test_load_a_directory(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="cannot read the fleet file"):
        config.load(tmp_path)


@pytest.mark.parametrize("text", [
    "[fleet\nparallel_migrations = 5\n",
    "parallel_migrations = = 5\n",
    "name = 'a'\nname = 'b'\n",
    "{\"agents\": []}\n",
])
def test_load_a_file_that_is_not_toml(tmp_path, text):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(errors.InvalidArgument, match="not TOML") as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ")


def test_load_an_empty_file_is_a_fleet_without_agents(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text("")
    with pytest.raises(errors.InvalidArgument, match="at least 2 agents, not 0"):
        config.load(path)


# ---- unknown keys, at every level


def test_an_unknown_top_level_key():
    msg = refused(doc(agent=[]), "unknown key 'agent'", "the file's top level")
    assert "agents" in msg  # (the known ones are listed)


def test_several_unknown_keys_are_all_named():
    refused(doc(zzz=1, aaa=2), "unknown keys 'aaa', 'zzz'")


def test_an_unknown_key_in_fleet():
    refused(doc(fleet={"parallel_migration": 3}), "unknown key 'parallel_migration'",
            "in [fleet]", "parallel_migrations")


def test_an_unknown_key_in_defaults():
    refused(doc(defaults={"bandwidth": 100}), "unknown key 'bandwidth'", "in [defaults]",
            "bandwidth_mbps")


def test_policy_is_not_a_key_of_defaults():
    refused(doc(defaults={"policy": "x"}), "unknown key 'policy'", "[defaults]")


def test_an_unknown_key_in_an_agent():
    d = doc()
    d["agents"][1]["port"] = 7000
    refused(d, "unknown key 'port'", "[[agents]] #2")


def test_an_unknown_key_in_a_policy():
    refused(doc(policies=[{"name": "p", "selectors": {"a": "b"}}]),
            "unknown key 'selectors'", "[[policies]] #1")
    refused(doc(policies=[{"name": "p"}, {"name": "q", "policy": "x"}]),
            "unknown key 'policy'", "[[policies]] #2")


# ---- the tables' shapes


@pytest.mark.parametrize("key", ["fleet", "defaults"])
def test_a_table_that_is_not_one(key):
    refused(doc(**{key: 5}), f"[{key}] is a table")


@pytest.mark.parametrize("agents", [{"name": "a"}, "a", [{"name": "a"}, "b"]])
def test_agents_that_are_not_a_list_of_tables(agents):
    refused(doc(agents=agents), "agents is a list of tables")


@pytest.mark.parametrize("policies", [{"name": "p"}, ["p"]])
def test_policies_that_are_not_a_list_of_tables(policies):
    refused(doc(policies=policies), "policies is a list of tables")


# ---- [fleet] numbers


@pytest.mark.parametrize("key", ["parallel_migrations", "parallel_outbound_per_host"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 2.0, "2", True, None, [2]])
def test_a_parallel_limit_is_a_whole_number_at_least_1(key, value):
    fleet = {key: value}
    if key == "parallel_migrations" and value not in (0, -1):
        fleet["parallel_outbound_per_host"] = 1
    refused(doc(fleet=fleet), f"[fleet] {key} is a whole number >= 1", repr(value))


@pytest.mark.parametrize("value", [-1, 0.5, "1", False])
def test_retries_is_a_whole_number_at_least_0(value):
    refused(doc(fleet={"retries": value}), "[fleet] retries is a whole number >= 0",
            repr(value))


def test_no_retries_is_fine():
    assert config.parse(doc(fleet={"retries": 0})).retries == 0


def test_outbound_above_the_cluster_cap():
    refused(doc(fleet={"parallel_migrations": 2, "parallel_outbound_per_host": 3}),
            "parallel_outbound_per_host = 3", "parallel_migrations = 2")
    refused(doc(fleet={"parallel_migrations": 1}),  # (the default outbound is 2)
            "parallel_outbound_per_host = 2", "parallel_migrations = 1")


# ---- settings, in [defaults] and in policies


NUMBER_KEYS = ["bandwidth_mbps", "completion_timeout_per_gib_s", "progress_timeout_s",
               "downtime_limit_ms"]


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", ["100", True, None, [1], {"a": 1}, math.nan, math.inf,
                                   -math.inf])
def test_a_setting_is_a_finite_number(key, value):
    refused(doc(defaults={key: value}), f"[defaults] {key} is a number", repr(value))
    refused(doc(policies=[{"name": "slow", key: value}]),
            f"policy 'slow' {key} is a number", repr(value))


@pytest.mark.parametrize("key", ["bandwidth_mbps", "completion_timeout_per_gib_s",
                                 "progress_timeout_s"])
def test_a_negative_limit(key):
    refused(doc(defaults={key: -1}), f"[defaults] {key} must be >= 0", "-1")
    refused(doc(policies=[{"name": "neg", key: -0.5}]), f"policy 'neg' {key} must be >= 0")


@pytest.mark.parametrize("value", [0, -5])
def test_a_downtime_limit_must_be_positive(value):
    refused(doc(defaults={"downtime_limit_ms": value}), "[defaults] downtime_limit_ms must be > 0")
    refused(doc(policies=[{"name": "zero", "downtime_limit_ms": value}]),
            "policy 'zero' downtime_limit_ms must be > 0")


@pytest.mark.parametrize("value", ["explode", "ABORT", "", 1, True])
def test_a_bad_timeout_action(value):
    msg = refused(doc(defaults={"timeout_action": value}), "[defaults] timeout_action",
                  repr(value))
    assert "abort, pause, postcopy" in msg
    refused(doc(policies=[{"name": "p", "timeout_action": value}]),
            "policy 'p' timeout_action", repr(value))


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_copy_storage_is_a_bool(value):
    refused(doc(defaults={"copy_storage": value}), "[defaults] copy_storage is true or false",
            repr(value))
    refused(doc(policies=[{"name": "p", "copy_storage": value}]),
            "policy 'p' copy_storage is true or false")


def test_a_completion_timeout_the_bandwidth_cap_makes_impossible():
    # a GiB at 10 Mbit/s: 2**30 * 8 / 1e7 = 858.99 s
    msg = refused(doc(defaults={"bandwidth_mbps": 10, "completion_timeout_per_gib_s": 150}),
                  "[defaults]", "completion_timeout_per_gib_s = 150", "859.0 s",
                  "bandwidth_mbps = 10")
    assert "cannot be met" in msg
    # just above the floor is fine; 0 (no timeout) is fine at any cap
    floor = config.GIB * 8 / 10e6
    config.parse(doc(defaults={"bandwidth_mbps": 10, "completion_timeout_per_gib_s": floor}))
    config.parse(doc(defaults={"bandwidth_mbps": 10, "completion_timeout_per_gib_s": 0}))
    # and the default timeout (150 s per GiB) at a cap of 100 Mbit/s (85.9 s per GiB)
    config.parse(doc(defaults={"bandwidth_mbps": 100}))


def test_a_policy_made_impossible_by_its_merge_with_the_defaults():
    # the policy's cap, under the default timeout
    refused(doc(policies=[{"name": "crawl", "bandwidth_mbps": 5}]),
            "policy 'crawl'", "completion_timeout_per_gib_s = 150", "bandwidth_mbps = 5")
    # the defaults' cap (no timeout there), under the policy's timeout
    refused(doc(defaults={"bandwidth_mbps": 5, "completion_timeout_per_gib_s": 0},
                policies=[{"name": "strict", "completion_timeout_per_gib_s": 100}]),
            "policy 'strict'", "completion_timeout_per_gib_s = 100")
    # the policy lifting the defaults' timeout is fine
    config.parse(doc(defaults={"bandwidth_mbps": 5, "completion_timeout_per_gib_s": 0},
                     policies=[{"name": "ok", "bandwidth_mbps": 1000,
                                "completion_timeout_per_gib_s": 150}]))


def test_postcopy_with_copy_storage():
    refused(doc(defaults={"timeout_action": "postcopy", "copy_storage": True}),
            "[defaults]", "postcopy", "copy_storage")
    # the two halves from the defaults and a policy
    refused(doc(defaults={"timeout_action": "postcopy"},
                policies=[{"name": "disks", "copy_storage": True}]),
            "policy 'disks'", "postcopy", "copy_storage")
    refused(doc(defaults={"copy_storage": True},
                policies=[{"name": "late", "timeout_action": "postcopy"}]),
            "policy 'late'", "postcopy")
    # a policy may undo one half
    f = config.parse(doc(defaults={"copy_storage": True},
                         policies=[{"name": "mem", "timeout_action": "postcopy",
                                    "copy_storage": False}]))
    assert f.policies[0].overrides["copy_storage"] is False


# ---- agents


def test_an_agent_without_a_name():
    d = doc()
    del d["agents"][1]["name"]
    refused(d, "[[agents]] #2 has no name")
    d["agents"][1]["name"] = ""
    refused(d, "[[agents]] #2 has no name")
    d["agents"][1]["name"] = 7
    refused(d, "[[agents]] #2 has no name")


@pytest.mark.parametrize("address", [
    None, "", "10.0.0.2", ":7000", "10.0.0.2:", "10.0.0.2:0", "10.0.0.2:65536",
    "10.0.0.2:http", "10.0.0.2:-1", "10.0.0.2:+80", 7000,
    "10.0.0.2:\u00b2", "10.0.0.2:\u0663",  # (digits to str.isdigit, not ports)
])
def test_a_bad_address_names_the_agent(address):
    d = doc()
    if address is None:
        del d["agents"][1]["address"]
    else:
        d["agents"][1]["address"] = address
    refused(d, "agent 'b': address is HOST:PORT", repr(address))


@pytest.mark.parametrize("address", ["h:1", "h:65535", "[::1]:7000", "host.example.com:443"])
def test_good_addresses(address):
    d = doc()
    d["agents"][1]["address"] = address
    assert config.parse(d).agents["b"].address == address


def test_an_agent_named_twice():
    d = doc()
    d["agents"].append({"name": "a", "address": "10.0.0.3:7000"})
    refused(d, "agent 'a' is named twice")


def test_two_agents_at_one_address():
    d = doc()
    d["agents"].append({"name": "c", "address": "10.0.0.1:7000"})
    refused(d, "agent 'c'", "address 10.0.0.1:7000", "agent 'a'")


def test_the_same_host_on_other_ports_is_two_agents():
    d = doc()
    d["agents"][1]["address"] = "10.0.0.1:7001"
    assert len(config.parse(d).agents) == 2


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_agents(n):
    refused(doc(agents=AGENTS[:n]), f"at least 2 agents, not {n}")


def test_no_agents_key_at_all():
    refused({}, "at least 2 agents, not 0")


def test_bad_agent_labels_name_the_agent_and_the_label():
    d = doc()
    d["agents"][0]["labels"] = {"zone": "-left"}
    refused(d, "agent 'a'", "bad labels label value '-left'", "'zone'")
    d["agents"][0]["labels"] = {"bad key": "x"}
    refused(d, "agent 'a'", "bad labels label key 'bad key'")
    d["agents"][0]["labels"] = {"zone": 1}
    refused(d, "agent 'a'", "1")
    d["agents"][0]["labels"] = ["zone=left"]
    refused(d, "agent 'a' labels is a table of labels")


# ---- policies


def test_a_policy_without_a_name():
    refused(doc(policies=[{"name": "p"}, {"selector": {"a": "b"}}]), "[[policies]] #2 has no name")
    refused(doc(policies=[{"name": ""}]), "[[policies]] #1 has no name")
    refused(doc(policies=[{"name": 3}]), "[[policies]] #1 has no name")


def test_a_policy_named_twice():
    refused(doc(policies=[{"name": "p", "selector": {"a": "1"}},
                          {"name": "p", "selector": {"b": "2"}}]), "policy 'p' is named twice")


def test_policy_hosts_matching_no_agent():
    refused(doc(policies=[{"name": "gpu", "hosts": {"gpu": "yes"}}]),
            "policy 'gpu'", "matches no agent", "gpu")
    # each label matches some agent, but no one agent carries both
    refused(doc(policies=[{"name": "split", "hosts": {"disk": "ssd", "zone": "right"}}]),
            "policy 'split'", "matches no agent")


def test_bad_policy_labels_name_the_policy():
    refused(doc(policies=[{"name": "p", "selector": {"tier": "db!"}}]),
            "policy 'p'", "bad selector label value 'db!'")
    refused(doc(policies=[{"name": "p", "hosts": {"-disk": "ssd"}}]),
            "policy 'p'", "bad hosts label key '-disk'")
    refused(doc(policies=[{"name": "p", "selector": "tier=db"}]),
            "policy 'p' selector is a table of labels")
    refused(doc(policies=[{"name": "p", "hosts": ["a"]}]), "policy 'p' hosts is a table of labels")


def test_refusals_in_a_later_policy_name_it():
    msg = refused(doc(policies=[{"name": "first", "bandwidth_mbps": 100},
                                {"name": "second", "bandwidth_mbps": -1}]), "policy 'second'")
    assert "first" not in msg


# ---- policy_for


def fleet_with(*policies, defaults=None) -> Fleet:
    return config.parse(doc(defaults=defaults or {}, policies=list(policies)))


def test_no_policy_gives_the_defaults():
    f = fleet_with(defaults={"bandwidth_mbps": 900})
    settings, chosen = f.policy_for({"tier": "db"})
    assert chosen is None and settings is f.defaults and settings.policy == ""


def test_no_matching_policy_gives_the_defaults():
    f = fleet_with({"name": "db", "selector": {"tier": "db"}, "bandwidth_mbps": 400})
    settings, chosen = f.policy_for({"tier": "web"})
    assert chosen is None and settings == f.defaults
    assert f.policy_for({})[1] is None


def test_a_matching_policy_merges_over_the_defaults():
    f = fleet_with({"name": "db", "selector": {"tier": "db"}, "bandwidth_mbps": 400,
                    "timeout_action": "pause"},
                   defaults={"bandwidth_mbps": 900, "progress_timeout_s": 30,
                             "downtime_limit_ms": 100})
    settings, chosen = f.policy_for({"tier": "db", "zone": "left"})
    assert chosen is f.policies[0]
    assert settings == Settings(bandwidth_mbps=400.0, timeout_action=TimeoutAction.PAUSE,
                                progress_timeout_s=30.0, downtime_limit_ms=100.0,
                                policy="db")
    assert f.defaults.policy == "" and f.defaults.bandwidth_mbps == 900  # (untouched)


def test_an_empty_selector_matches_every_domain():
    f = fleet_with({"name": "all", "progress_timeout_s": 10})
    for have in ({}, {"tier": "db"}):
        settings, chosen = f.policy_for(have)
        assert chosen.name == "all" and settings.progress_timeout_s == 10


def test_the_most_specific_policy_wins_whatever_its_name_or_place():
    f = fleet_with({"name": "a-broad", "selector": {"tier": "db"}, "bandwidth_mbps": 100},
                   {"name": "z-narrow", "selector": {"tier": "db", "zone": "left"},
                    "bandwidth_mbps": 200},
                   {"name": "all", "bandwidth_mbps": 300})
    assert f.policy_for({"tier": "db", "zone": "left"})[0].bandwidth_mbps == 200
    assert f.policy_for({"tier": "db", "zone": "left"})[1].name == "z-narrow"
    assert f.policy_for({"tier": "db", "zone": "right"})[1].name == "a-broad"
    assert f.policy_for({"tier": "web", "zone": "left"})[1].name == "all"


def test_a_tie_goes_to_the_lexically_first_name():
    f = fleet_with({"name": "zone", "selector": {"zone": "left"}, "bandwidth_mbps": 100},
                   {"name": "tier", "selector": {"tier": "db"}, "bandwidth_mbps": 200},
                   {"name": "Upper", "selector": {"disk": "ssd"}, "bandwidth_mbps": 300})
    both = {"zone": "left", "tier": "db"}
    assert f.policy_for(both)[1].name == "tier"
    assert f.policy_for(both)[0] == Settings(bandwidth_mbps=200.0, policy="tier")
    # ('U' sorts before 't': lexical, not case-folded)
    assert f.policy_for({**both, "disk": "ssd"})[1].name == "Upper"
    # whatever the order in the file
    g = fleet_with({"name": "tier", "selector": {"tier": "db"}},
                   {"name": "zone", "selector": {"zone": "left"}})
    assert g.policy_for(both)[1].name == "tier"


def test_a_policy_setting_nothing_still_names_itself():
    f = fleet_with({"name": "tag", "selector": {"tier": "db"}},
                   defaults={"bandwidth_mbps": 700})
    settings, chosen = f.policy_for({"tier": "db"})
    assert settings == Settings(bandwidth_mbps=700.0, policy="tag")


# ---- Fleet.agent


def test_an_agent_by_name_or_address():
    f = config.parse(doc())
    assert f.agent("a") is f.agents["a"]
    assert f.agent("10.0.0.2:7000") is f.agents["b"]
    with pytest.raises(errors.NotFound, match="no agent 'c' in the fleet \\(a, b\\)"):
        f.agent("c")


def test_a_domains_rules_are_its_policys_settings_and_host_labels():
    f = fleet_with({"name": "db", "selector": {"tier": "db"}, "hosts": {"disk": "ssd"},
                    "bandwidth_mbps": 400})
    settings, hosts = f.rules_for({"tier": "db"})
    assert settings.bandwidth_mbps == 400 and settings.policy == "db"
    assert hosts == {"disk": "ssd"} and f.rules_for({"tier": "web"}) == (f.defaults, {})

    class Dom:
        labels = {"tier": "db"}
    assert f.hosts_for(Dom()) == {"disk": "ssd"}

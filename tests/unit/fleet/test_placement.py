"""Placement: where domains go, by free RAM and labels, planned before anything moves."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvmig import labels
from pvmig.fleet.placement import (
    DomainView,
    HostView,
    Move,
    Unplaced,
    best_host,
    evacuation,
    rebalance,
    reserve,
    spread,
)

MIB = 1 << 20
GIB = 1 << 30


def host(name: str, max_gib: float, doms=(), hl=None) -> HostView:
    """A host of max_gib GiB holding doms: (name, GiB[, labels[, state]])."""
    h = HostView(name, f"{name}:7000", dict(hl or {}), int(max_gib * GIB))
    for d in doms:
        name_, gib, dl, state = tuple(d) + ({}, "running")[len(d) - 2:]
        dom = DomainView(name_, name, int(gib * GIB), dict(dl), state)
        h.domains[dom.name] = dom
        h.used_ram += dom.ram
    return h


def fleet(*hosts: HostView) -> dict[str, HostView]:
    return {h.name: h for h in hosts}


def anywhere(_dom) -> dict:
    return {}


def where_is(hosts: dict[str, HostView]) -> dict[str, str]:
    return {d: h.name for h in hosts.values() for d in h.domains}


def consistent(hosts: dict[str, HostView]) -> bool:
    return all(h.used_ram == sum(d.ram for d in h.domains.values()) for h in hosts.values())


# ---- HostView


def test_free_ram_and_load():
    h = host("a", 4, [("x", 1)])
    assert h.free_ram == 3 * GIB and h.load == 0.25
    assert HostView("z", "z:1", {}, 0).load == 1.0  # (no RAM at all: full)


# ---- best_host


def dom(name="d", on="src", gib=1.0, dl=None, state="running") -> DomainView:
    return DomainView(name, on, int(gib * GIB), dict(dl or {}), state)


def test_best_host_is_the_one_with_the_most_free_ram():
    hosts = [host("a", 8, [("x", 6)]), host("b", 4), host("c", 8, [("y", 3)])]
    assert best_host(dom(), hosts, {}).name == "c"


def test_best_host_is_never_the_domains_own():
    hosts = [host("src", 64), host("b", 2)]
    assert best_host(dom(on="src"), hosts, {}).name == "b"


def test_best_host_leaves_out_the_excluded():
    hosts = [host("a", 16), host("b", 8), host("c", 4)]
    assert best_host(dom(), hosts, {}, exclude={"a"}).name == "b"
    assert best_host(dom(), hosts, {}, exclude=frozenset({"a", "b"})).name == "c"


def test_best_host_takes_only_hosts_with_the_allowed_labels():
    hosts = [host("big", 64, hl={"disk": "hdd"}), host("small", 2, hl={"disk": "ssd"}),
             host("tiny", 1.5, hl={"disk": "ssd", "zone": "x"})]
    assert best_host(dom(), hosts, {"disk": "ssd"}).name == "small"
    assert best_host(dom(), hosts, {"disk": "ssd", "zone": "x"}).name == "tiny"
    assert best_host(dom(), hosts, {}).name == "big"


def test_a_host_with_exactly_the_room_takes_it():
    assert best_host(dom(gib=2), [host("a", 3, [("x", 1)])], {}).name == "a"


def test_an_over_committed_host_takes_nothing():
    over = host("a", 1, [("x", 2)])
    assert over.free_ram < 0
    assert isinstance(best_host(dom(gib=0.5), [over], {}), str)


def test_a_tie_goes_to_the_lexically_first_name():
    for names in (["b", "a", "c"], ["h10", "h1", "h2"], ["ab", "a"], ["a", "ab"]):
        hosts = [host(n, 4) for n in names]
        assert best_host(dom(), hosts, {}).name == min(names), names


def test_why_no_host_when_none_is_left():
    assert best_host(dom(on="src"), [host("src", 64)], {}) == "no other host is left to take it"
    assert best_host(dom(), [host("a", 8)], {}, exclude={"a"}) == \
        "no other host is left to take it"
    assert best_host(dom(), [], {}) == "no other host is left to take it"


def test_why_no_host_when_none_carries_the_labels():
    why = best_host(dom(), [host("a", 8, hl={"disk": "hdd"})], {"disk": "ssd"})
    assert isinstance(why, str)
    assert "no other host carries the labels" in why and "'disk': 'ssd'" in why


def test_why_no_host_when_none_has_the_room():
    hosts = [host("a", 4, [("x", 3)]), host("b", 4, [("y", 2.5)])]
    why = best_host(dom(gib=2), hosts, {})
    assert why == "needs 2048 MiB; the most free on a host it may go to is 1536 MiB (b)"
    # among the hosts it may go to only
    hosts += [host("big", 64), host("c", 2.25, [("z", 1)], {"r": "1"})]
    why = best_host(dom(gib=2), hosts, {"r": "1"})
    assert why == "needs 2048 MiB; the most free on a host it may go to is 1280 MiB (c)"


# ---- reserve


def test_reserve_moves_the_ram_and_the_domain():
    hosts = fleet(host("a", 8, [("x", 3), ("y", 1)]), host("b", 8, [("z", 2)]))
    x = hosts["a"].domains["x"]
    reserve(Move(x, "a", "b"), hosts)
    assert hosts["a"].used_ram == GIB and set(hosts["a"].domains) == {"y"}
    assert hosts["b"].used_ram == 5 * GIB and hosts["b"].domains["x"] == replace(x, host="b")
    assert consistent(hosts)


# ---- evacuation


def test_evacuation_places_the_largest_first_each_on_the_most_free():
    hosts = fleet(host("src", 16, [("d2", 2), ("d4", 4), ("d3", 3)]),
                  host("b", 8), host("c", 6))
    moves, unplaced = evacuation("src", hosts, anywhere)
    assert unplaced == []
    assert [(m.domain.name, m.source, m.dest) for m in moves] == [
        ("d4", "src", "b"),   # b 8 free, c 6: b (4 left)
        ("d3", "src", "c"),   # b 4, c 6: c (3 left)
        ("d2", "src", "b"),   # b 4, c 3: b
    ]
    assert hosts["src"].domains == {} and hosts["src"].used_ram == 0
    assert hosts["b"].used_ram == 6 * GIB and hosts["c"].used_ram == 3 * GIB
    assert consistent(hosts)


def test_largest_first_is_what_lets_everything_fit():
    # smallest first would put "a-small" on b (the most free), and "z-big" then fits nowhere
    hosts = fleet(host("src", 16, [("a-small", 2), ("z-big", 4)]), host("b", 4), host("c", 2))
    moves, unplaced = evacuation("src", hosts, anywhere)
    assert unplaced == []
    assert {m.domain.name: m.dest for m in moves} == {"z-big": "b", "a-small": "c"}


def test_equal_sizes_go_in_name_order():
    hosts = fleet(host("src", 16, [("c", 1), ("a", 1), ("b", 1)]), host("h", 8))
    moves, _ = evacuation("src", hosts, anywhere)
    assert [m.domain.name for m in moves] == ["a", "b", "c"]


def test_evacuation_respects_each_domains_allowed_labels():
    hosts = fleet(
        host("src", 32, [("db", 2, {"tier": "db"}), ("web", 1, {"tier": "web"})]),
        host("roomy", 64, hl={"disk": "hdd"}), host("fast", 4, hl={"disk": "ssd"}))

    def allowed_of(d):
        return {"disk": "ssd"} if d.labels.get("tier") == "db" else {}

    moves, unplaced = evacuation("src", hosts, allowed_of)
    assert unplaced == []
    assert {m.domain.name: m.dest for m in moves} == {"db": "fast", "web": "roomy"}


def test_domains_not_running_are_reported_unplaced_and_stay():
    hosts = fleet(host("src", 16, [("run", 1), ("mig", 2, {}, "migrating"),
                                   ("dead", 3, {}, "crashed")]), host("b", 16))
    moves, unplaced = evacuation("src", hosts, anywhere)
    assert [m.domain.name for m in moves] == ["run"]
    assert {u.domain.name: u.why for u in unplaced} == {
        "dead": "it is crashed, not running", "mig": "it is migrating, not running"}
    assert set(hosts["src"].domains) == {"mig", "dead"}
    assert hosts["src"].used_ram == 5 * GIB and hosts["b"].used_ram == GIB


def test_a_domain_that_fits_nowhere_is_reported_with_a_reason():
    hosts = fleet(host("src", 64, [("huge", 10), ("ok", 1)]), host("b", 4), host("c", 3))
    moves, unplaced = evacuation("src", hosts, anywhere)
    assert [m.domain.name for m in moves] == ["ok"]
    (u,) = unplaced
    assert isinstance(u, Unplaced) and u.domain.name == "huge"
    assert u.why == "needs 10240 MiB; the most free on a host it may go to is 4096 MiB (b)"
    assert "huge" in hosts["src"].domains  # (not reserved anywhere)


def test_the_reason_reflects_what_the_plan_already_reserved():
    hosts = fleet(host("src", 64, [("first", 3), ("second", 2)]), host("b", 4))
    moves, unplaced = evacuation("src", hosts, anywhere)
    assert [m.domain.name for m in moves] == ["first"]
    assert unplaced[0].why.endswith("is 1024 MiB (b)")


def test_a_domain_whose_labels_no_host_carries():
    hosts = fleet(host("src", 8, [("gpu", 1, {"need": "gpu"})]), host("b", 8))
    _, unplaced = evacuation("src", hosts, lambda d: {"gpu": "yes"})
    assert "no other host carries the labels" in unplaced[0].why


def test_a_two_host_fleet_evacuates_to_the_other():
    hosts = fleet(host("a", 8, [("x", 1)]), host("b", 8, [("y", 1)]))
    moves, unplaced = evacuation("b", hosts, anywhere)
    assert [(m.domain.name, m.dest) for m in moves] == [("y", "a")] and unplaced == []


def test_evacuating_an_empty_host_plans_nothing():
    hosts = fleet(host("a", 8), host("b", 8, [("y", 1)]))
    before = copy.deepcopy(hosts)
    assert evacuation("a", hosts, anywhere) == ([], [])
    assert hosts == before


# ---- a property of evacuation

STATES = st.sampled_from(["running", "running", "running", "migrating", "crashed"])
ZONES = st.sampled_from(["left", "right", "mid"])


@st.composite
def fleets(draw):
    n = draw(st.integers(2, 5))
    out = {}
    for i in range(n):
        name = f"h{i}"
        h = HostView(name, f"{name}:1", {"zone": draw(ZONES)}, 0)
        for j in range(draw(st.integers(0, 6))):
            want = draw(st.none() | ZONES)
            d = DomainView(f"d{i}-{j}", name, draw(st.integers(1, 64)) * 64 * MIB,
                           {} if want is None else {"want": want}, draw(STATES))
            h.domains[d.name] = d
            h.used_ram += d.ram
        h.max_ram = h.used_ram + draw(st.integers(0, 40)) * 64 * MIB
        if h.max_ram == 0:
            h.max_ram = 64 * MIB
        out[name] = h
    return out


def allowed_by_want(d: DomainView) -> dict:
    return {"zone": d.labels["want"]} if "want" in d.labels else {}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.data())
def test_an_evacuation_plan_never_overcommits_and_accounts_for_every_domain(hosts, data):
    source = data.draw(st.sampled_from(sorted(hosts)))
    before = copy.deepcopy(hosts)
    theirs = before[source].domains
    moves, unplaced = evacuation(source, hosts, allowed_by_want)

    # every domain of the source exactly once: moved if running and placed, else unplaced
    named = [m.domain.name for m in moves] + [u.domain.name for u in unplaced]
    assert sorted(named) == sorted(theirs)
    assert all(theirs[m.domain.name].state == "running" for m in moves)
    assert all(u.why == f"it is {u.domain.state}, not running"
               for u in unplaced if u.domain.state != "running")
    # largest first
    assert [m.domain.ram for m in moves] == sorted((m.domain.ram for m in moves), reverse=True)

    for m in moves:
        assert m.source == source and m.dest != source
        assert labels.matches(allowed_by_want(m.domain), hosts[m.dest].labels)
        assert hosts[m.dest].domains[m.domain.name] == replace(m.domain, host=m.dest)
    for h in hosts.values():
        assert h.used_ram <= h.max_ram, h.name
    assert consistent(hosts)
    assert sum(h.used_ram for h in hosts.values()) == sum(h.used_ram for h in before.values())
    # what stays on the source is exactly what could not go; others only gained
    assert set(hosts[source].domains) == {u.domain.name for u in unplaced}
    for name, h in hosts.items():
        if name != source:
            assert set(before[name].domains) <= set(h.domains)
    # a running domain left behind fits on no host it may go to, even now (free RAM
    # elsewhere only fell as the plan went on)
    for u in unplaced:
        if u.domain.state == "running":
            assert not any(h.free_ram >= u.domain.ram
                           and labels.matches(allowed_by_want(u.domain), h.labels)
                           for n, h in hosts.items() if n != source), u.why


# ---- rebalance


def test_spread():
    hosts = fleet(host("a", 4, [("x", 3)]), host("b", 8, [("y", 2)]), host("c", 2))
    assert spread(hosts) == 0.75


def test_rebalance_narrows_the_spread_and_stops_when_no_move_helps():
    hosts = fleet(host("a", 8, [("x", 2), ("y", 2), ("z", 2)]), host("b", 8))
    moves = rebalance(hosts, anywhere)
    # one 2 GiB move: .75/0 -> .5/.25; a second (.25/.5) would not narrow it
    assert [(m.domain.name, m.source, m.dest) for m in moves] == [("x", "a", "b")]
    assert spread(hosts) == 0.25 and consistent(hosts)


def test_a_balanced_fleet_is_left_alone():
    hosts = fleet(host("a", 8, [("x", 2)]), host("b", 8, [("y", 2)]), host("c", 4, [("z", 1)]))
    before = copy.deepcopy(hosts)
    assert rebalance(hosts, anywhere) == []
    assert hosts == before


def test_a_move_that_would_only_swap_the_spread_is_not_made():
    # one 6 GiB domain: on a or on b, the spread is .75 either way
    hosts = fleet(host("a", 8, [("big", 6)]), host("b", 8))
    assert rebalance(hosts, anywhere) == []


def test_rebalance_picks_the_domain_that_narrows_the_spread_most():
    hosts = fleet(host("a", 16, [("one", 1), ("four", 4), ("seven", 7)]), host("b", 16))
    moves = rebalance(hosts, anywhere)
    # 12 GiB against 0: moving "seven" leaves 5/7, "four" 8/4, "one" 11/1; then b is the
    # fullest and holds only "seven", which has moved once already
    assert [m.domain.name for m in moves] == ["seven"]
    assert spread(hosts) == pytest.approx(2 / 16)


def test_rebalance_goes_to_the_emptiest_host_by_share_of_its_ram():
    # b has the most free bytes, c the lowest share: moving to c evens all three
    hosts = fleet(host("a", 10, [("a1", 5), ("a2", 5)]), host("b", 100, [("b1", 50)]),
                  host("c", 10))
    moves = rebalance(hosts, anywhere)
    assert [(m.domain.name, m.dest) for m in moves] == [("a1", "c")]
    assert spread(hosts) == 0


def test_rebalance_never_overcommits():
    # the emptiest host is too small for any domain of the fullest
    hosts = fleet(host("a", 8, [("x", 3), ("y", 3)]), host("b", 2))
    assert rebalance(hosts, anywhere) == []
    assert all(h.used_ram <= h.max_ram for h in hosts.values())


def test_rebalance_respects_the_allowed_host_labels():
    hosts = fleet(host("a", 8, [("db", 2, {"tier": "db"}), ("db2", 2, {"tier": "db"}),
                                ("db3", 2, {"tier": "db"})], {"disk": "ssd"}),
                  host("b", 8, hl={"disk": "hdd"}),
                  host("c", 16, [("w", 6)], hl={"disk": "ssd"}))

    def allowed_of(d):
        return {"disk": "ssd"} if d.labels.get("tier") == "db" else {}

    moves = rebalance(hosts, allowed_of)
    assert moves and all(m.dest == "c" for m in moves)
    assert hosts["b"].domains == {}


def test_rebalance_moves_nothing_it_may_not():
    hosts = fleet(host("a", 8, [("x", 2), ("y", 2), ("z", 2)]), host("b", 8, hl={"k": "v"}))
    assert rebalance(hosts, lambda d: {"k": "other"}) == []


def test_rebalance_leaves_domains_not_running_alone():
    hosts = fleet(host("a", 8, [("m", 2, {}, "migrating"), ("c", 2, {}, "crashed"),
                                ("r", 2)]), host("b", 8))
    moves = rebalance(hosts, anywhere)
    assert [m.domain.name for m in moves] == ["r"]


def test_rebalance_stops_at_max_moves():
    hosts = fleet(host("a", 64, [(f"d{i}", 1) for i in range(32)]), host("b", 64))
    assert len(rebalance(copy.deepcopy(hosts), anywhere)) == 16
    assert len(rebalance(hosts, anywhere, max_moves=3)) == 3
    assert rebalance(copy.deepcopy(hosts), anywhere, max_moves=0) == []


def test_rebalance_moves_a_domain_at_most_once():
    hosts = fleet(host("h0", 7, [("d00", 3), ("d01", 4)]), host("h1", 5, [("d10", 1), ("d11", 4)]),
                  host("h2", 6, [("d20", 2)]))
    moves = rebalance(hosts, anywhere)
    # after d10 h1 -> h2 and d00 h0 -> h2, h2 is the fullest, and d10 going on to h0
    # would narrow the spread most: it has moved once, so d20 goes instead
    assert [(m.domain.name, m.source, m.dest) for m in moves] == [
        ("d10", "h1", "h2"), ("d00", "h0", "h2"), ("d20", "h2", "h0")]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_rebalance_properties(hosts):
    before = copy.deepcopy(hosts)
    over = {n for n, h in before.items() if h.used_ram > h.max_ram}
    moves = rebalance(hosts, allowed_by_want)

    names = [m.domain.name for m in moves]
    assert len(names) == len(set(names))  # a domain moves at most once
    assert consistent(hosts)
    assert sum(h.used_ram for h in hosts.values()) == sum(h.used_ram for h in before.values())
    for h in hosts.values():
        if h.name not in over:
            assert h.used_ram <= h.max_ram, h.name

    # replayed on the fleet as it was, each move fits, is allowed, and narrows the spread
    replay = copy.deepcopy(before)
    last = spread(replay)
    for m in moves:
        assert m.domain.state == "running"
        assert replay[m.source].domains[m.domain.name] == m.domain
        assert labels.matches(allowed_by_want(m.domain), replay[m.dest].labels)
        assert replay[m.dest].free_ram >= m.domain.ram
        reserve(m, replay)
        now = spread(replay)
        assert now < last
        last = now
    assert where_is(replay) == where_is(hosts)

    # and it stopped because no move from the fullest host to the emptiest one a domain
    # may go to (that takes it) would narrow the spread further
    if len(moves) < 64:
        fullest = max(hosts.values(), key=lambda h: (h.load, h.name))
        for d in fullest.domains.values():
            if d.name in names or d.state != "running":
                continue
            fits = [h for h in hosts.values() if h is not fullest
                    and h.free_ram >= d.ram and labels.matches(allowed_by_want(d), h.labels)]
            if not fits:
                continue
            to = min(fits, key=lambda h: (h.load, h.name))
            trial = copy.deepcopy(hosts)
            reserve(Move(d, fullest.name, to.name), trial)
            assert spread(trial) >= spread(hosts) - 1e-9


def test_a_domain_with_a_move_under_way_is_not_planned_again():
    hosts = fleet(host("a", 8, [("x", 1), ("y", 1)]), host("b", 8), host("c", 8))
    moves, unplaced = evacuation("a", hosts, anywhere, busy={"x"})
    assert [m.domain.name for m in moves] == ["y"]
    assert unplaced == [Unplaced(DomainView("x", "a", GIB, {}), "a move of it is under "
                                 "way already")]
    hosts = fleet(host("a", 8, [("x", 2), ("y", 2)]), host("b", 8))
    assert rebalance(hosts, anywhere, busy={"x", "y"}) == []
    assert [m.domain.name for m in rebalance(hosts, anywhere, busy={"x"})] == ["y"]

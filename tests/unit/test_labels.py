"""Domain labels: the KEY=VALUE syntax (Kubernetes's), the CLI's parsing of --label, and
the selectors a fleet's policies match domains with."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvmig import errors, labels

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
INNER = ALNUM + "-_."


def _segment(max_len: int):
    """A name of 1..max_len characters, beginning and ending with a letter or digit."""
    one = st.text(ALNUM, min_size=1, max_size=1)
    more = st.tuples(st.text(ALNUM, min_size=1, max_size=1),
                     st.text(INNER, max_size=max_len - 2),
                     st.text(ALNUM, min_size=1, max_size=1)).map("".join)
    return one | more


KEYS = st.tuples(st.none() | _segment(253), _segment(63)).map(
    lambda t: t[1] if t[0] is None else f"{t[0]}/{t[1]}")
VALUES = st.just("") | _segment(63)


# ---- check


@pytest.mark.parametrize("key", [
    "a", "Z", "9", "zone", "tier-1", "app.kubernetes.io", "a_b", "a" * 63,
    "example.com/zone", "kubevirt.io/schedulable", "p/" + "a" * 63, "a" * 253 + "/b",
])
def test_good_keys_pass(key):
    assert labels.check({key: "v"}) == {key: "v"}


@pytest.mark.parametrize("value", ["", "a", "left", "v1.2-rc_3", "x" * 63])
def test_good_values_pass(value):
    assert labels.check({"k": value}) == {"k": value}


@pytest.mark.parametrize("key", [
    "", "-a", "a-", ".a", "a.", "_a", "a_", "a" * 64, "a b", "a=b", "zone!", "é",
    "/a", "a/", "a/b/c", "-p/a", "p-/a", "a" * 254 + "/b", "p/-a",
])
def test_bad_keys_are_refused_by_name(key):
    with pytest.raises(errors.InvalidArgument, match="bad label key") as e:
        labels.check({key: "v"})
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("value", [
    "-a", "a-", ".a", "a.", "_a", "a" * 64, "a b", "a/b", "a=b", "x!", "é",
])
def test_bad_values_are_refused_naming_value_and_key(value):
    with pytest.raises(errors.InvalidArgument, match="bad label value") as e:
        labels.check({"zone": value})
    assert repr(value) in str(e.value) and "'zone'" in str(e.value)


@pytest.mark.parametrize("value", [1, 1.5, True, None, ["a"], {"a": "b"}])
def test_values_that_are_not_strings_are_refused(value):
    with pytest.raises(errors.InvalidArgument, match="bad label value"):
        labels.check({"zone": value})


@pytest.mark.parametrize("key", [1, None, ("a",)])
def test_keys_that_are_not_strings_are_refused(key):
    with pytest.raises(errors.InvalidArgument, match="bad label key"):
        labels.check({key: "v"})


def test_what_names_the_kind_of_label_in_the_message():
    with pytest.raises(errors.InvalidArgument, match="bad selector label key"):
        labels.check({"-x": "v"}, what="selector label")
    with pytest.raises(errors.InvalidArgument, match="bad hosts label value"):
        labels.check({"x": "-v"}, what="hosts label")


def test_the_first_bad_label_is_named():
    with pytest.raises(errors.InvalidArgument) as e:
        labels.check({"good": "ok", "bad!": "v", "worse!": "v"})
    assert "'bad!'" in str(e.value) and "worse" not in str(e.value)


def test_at_most_64_labels():
    many = {f"k{i}": "v" for i in range(labels.MAX_LABELS)}
    assert labels.check(many) == many
    many["one-more"] = "v"
    with pytest.raises(errors.InvalidArgument, match="at most 64 labels, not 65"):
        labels.check(many)


def test_check_returns_a_plain_dict_copy():
    class Ro(dict):
        pass

    given_ = Ro(a="b")
    out = labels.check(given_)
    assert type(out) is dict and out == {"a": "b"} and out is not given_


def test_empty_is_fine():
    assert labels.check({}) == {}


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_every_well_formed_label_set_passes(pairs):
    assert labels.check(pairs) == pairs


# ---- parse


def test_parse_pairs():
    assert labels.parse(["zone=left", "tier=db", "example.com/x=1"]) == {
        "zone": "left", "tier": "db", "example.com/x": "1"}


def test_parse_nothing_is_no_labels():
    assert labels.parse([]) == {}


def test_parse_an_empty_value():
    assert labels.parse(["canary="]) == {"canary": ""}


@pytest.mark.parametrize("pair", ["zone", "", "zone:left"])
def test_parse_refuses_a_pair_without_equals(pair):
    with pytest.raises(errors.InvalidArgument, match="KEY=VALUE") as e:
        labels.parse([pair])
    assert repr(pair) in str(e.value)


def test_parse_refuses_a_key_given_twice_even_with_the_same_value():
    with pytest.raises(errors.InvalidArgument, match="'zone' given twice"):
        labels.parse(["zone=left", "zone=right"])
    with pytest.raises(errors.InvalidArgument, match="'zone' given twice"):
        labels.parse(["zone=left", "zone=left"])


@pytest.mark.parametrize("pair, bad", [
    ("=left", "key"), ("-z=left", "key"), ("zone=a=b", "value"), ("zone=-x", "value"),
    ("zone= left", "value"),
])
def test_parse_checks_the_syntax(pair, bad):
    with pytest.raises(errors.InvalidArgument, match=f"bad label {bad}"):
        labels.parse([pair])


def test_parse_accepts_a_generator():
    assert labels.parse(f"k{i}=v{i}" for i in range(3)) == {"k0": "v0", "k1": "v1", "k2": "v2"}


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_parse_round_trips_well_formed_labels(pairs):
    assert labels.parse(f"{k}={v}" for k, v in pairs.items()) == pairs


# ---- matches


def test_an_empty_selector_matches_everything():
    assert labels.matches({}, {})
    assert labels.matches({}, {"zone": "left"})


def test_every_pair_of_the_selector_must_be_there():
    have = {"zone": "left", "tier": "db", "disk": "ssd"}
    assert labels.matches({"zone": "left"}, have)
    assert labels.matches({"zone": "left", "tier": "db"}, have)
    assert labels.matches(have, have)
    assert not labels.matches({"zone": "right"}, have)
    assert not labels.matches({"zone": "left", "tier": "web"}, have)
    assert not labels.matches({"rack": "1"}, have)
    assert not labels.matches({"zone": "left"}, {})


def test_values_compare_exactly():
    assert not labels.matches({"zone": "Left"}, {"zone": "left"})
    assert not labels.matches({"zone": "left"}, {"zone": "left "})
    assert not labels.matches({"Zone": "left"}, {"zone": "left"})


def test_an_empty_value_is_not_an_absent_label():
    assert labels.matches({"canary": ""}, {"canary": ""})
    assert not labels.matches({"canary": ""}, {})
    assert not labels.matches({"canary": ""}, {"canary": "yes"})


@given(st.dictionaries(KEYS, VALUES, max_size=6), st.data())
def test_any_subset_of_the_labels_matches_them(have, data):
    keys = data.draw(st.sets(st.sampled_from(sorted(have)) if have else st.nothing()))
    assert labels.matches({k: have[k] for k in keys}, have)


@given(st.dictionaries(KEYS, VALUES, max_size=6), st.dictionaries(KEYS, VALUES, max_size=6))
def test_matches_is_the_subset_relation(selector, have):
    assert labels.matches(selector, have) == (selector.items() <= have.items())

"""A quick `pvmig matrix` in the suite: every cell runs, and the invariants hold."""

from __future__ import annotations

import json

from support import pvmig


def test_quick_matrix(tmp_path):
    r = pvmig("matrix", "--runs", "2", "--json", str(tmp_path / "m.json"),
              "--markdown", str(tmp_path / "m.md"), timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "m.json").read_text())
    cells = data["cells"]
    assert data["command"] == "pvmig matrix --runs 2" and len(cells) == 8
    names = {(c["grants"], c["recovery"], c["quiesce"]) for c in cells}
    assert len(names) == 8
    for c in cells:
        chance, forced = c["chance"], c["forced"]
        assert chance["migrations"] == 2 and c["verdict"] != "error", c
        assert forced["migrations"] == 2, c
        assert c["in-flight"] > 0, c  # the slow disk keeps requests in flight
        assert c["replayed"] + c["trusted-old-ring"] == c["in-flight"], c
        for t in (chance, forced):
            # only dom0's frames may differ, and the journal explains every one
            assert "lost" not in t["frames-by-class"], c
            assert "unexplained" not in t["frames-by-cause"], c
        # each forced set made its hazards happen at least once
        assert forced["injected"].get("xenstore-after-final") == 2, c
        if c["quiesce"] == "none":  # an injection point forces its hazard every time
            assert forced["injection-fired"] == forced["injection-asked"], c
        if c["recovery"] == "replay":  # blkif_recover: never observed corrupt
            assert chance["observed-corruptions"] == forced["observed-corruptions"] == 0, c
            assert c["trusted-old-ring"] == 0
        if c["quiesce"] == "backend":  # every backend write logged before the final pass
            assert chance["frames-by-class"] == {}, c
            assert forced["frames-by-cause"] == {"xenstore-ring": 2}, c
            assert forced["observed-corruptions"] == 0, c
    # The forced hazards with persistent grants and a frontend that trusts the old ring.
    (naive,) = [c for c in cells if (c["grants"], c["recovery"], c["quiesce"])
                == ("persistent", "naive", "none")]
    assert naive["forced"]["observed-corruptions"] > 0 and naive["verdict"] == "CORRUPTS"
    md = (tmp_path / "m.md").read_text()
    assert md.startswith("`pvmig matrix --runs 2`") and md.count("\n| ") >= 9
    assert "forced: observed" in md and "observed by cause" in md
    for c in cells:  # the table says so too: fired in every forced run that asked
        if c["quiesce"] == "none":
            n = c["forced"]["injection-asked"]["write-after-final"]
            assert n >= 1 and f"write-after-final {n}/{n}" in md, md


def test_postcopy_matrix(tmp_path):
    """`pvmig matrix --postcopy`: each backend against each dom0 policy. Forced, dom0
    reaches a frame that has not arrived in every run: demand waits for it and nothing
    differs; unsafe takes it (the guest keeps dom0's zero page) and the verifier names
    the cause. Left to chance, whatever the backends did, demand never corrupts."""
    r = pvmig("matrix", "--postcopy", "--runs", "1", "--json", str(tmp_path / "m.json"),
              "--markdown", str(tmp_path / "m.md"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["command"] == "pvmig matrix --postcopy --runs 1"
    cells = {c["cell"]: c for c in data["cells"]}
    assert set(cells) == {f"{d}/postcopy-dom0={p}" for d in ("blk", "net")
                          for p in ("demand", "unsafe")}
    for name, c in cells.items():
        chance, backends, forced = c["chance"], c["backends-first"], c["forced"]
        assert chance["migrations"] == backends["migrations"] == forced["migrations"] == 1, c
        assert c["faults-median"] > 0, c  # the guest ran on missing frames
        if name.endswith("demand"):
            assert forced["dom0-waits"] >= 1 and forced["taken-pages"] == 0, c
            for t in (chance, backends, forced):
                assert t["observed-corruptions"] == 0 and t["taken-pages"] == 0, c
                assert "dom0-before-arrival" not in t["frames-by-cause"], c
            assert c["verdict"] == "safe", c
        else:
            assert forced["dom0-touched-missing"] >= 1 and forced["taken-pages"] >= 1, c
            assert forced["frames-by-cause"].get("dom0-before-arrival", 0) >= 1, c
            assert c["verdict"] == "CORRUPTS", c
    md = (tmp_path / "m.md").read_text()
    assert md.startswith("`pvmig matrix --postcopy --runs 1`") and md.count("\n| ") >= 5

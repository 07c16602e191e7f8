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

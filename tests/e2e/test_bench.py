"""End to end: `pvmig bench --quick` runs its grid against the ceiling it measured in
the same run and writes JSON, Markdown and plots. (The figures themselves are the
bench's to report, not the test's to judge.)"""

from __future__ import annotations

import json

from support import pvmig


def test_quick_bench(tmp_path):
    r = pvmig("bench", "--quick", "--runs", "1", "--json", str(tmp_path / "b.json"),
              "--markdown", str(tmp_path / "b.md"), "--plots", str(tmp_path / "plots"),
              timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "b.json").read_text())
    (size,) = out["sizes"]
    assert size["ram-mb"] == 256 and size["ceiling"]["gib-s"] > 0
    assert size["grpc-ceiling"]["gib-s"] > 0 and size["grpc-ceiling"]["streams"] == 4
    assert size["tls-ceiling"]["gib-s"] > 0
    cells = size["cells"]
    assert [(c["devices"], c["transport"], c["tls"], c["fill"], c["mode"]) for c in cells] == [
        ("idle", "tcp", False, 1.0, "precopy"), ("idle", "grpc", False, 1.0, "precopy"),
        ("busy", "tcp", False, 0.75, "precopy"), ("idle", "tcp", False, 1.0, "postcopy"),
        ("idle", "tcp", True, 1.0, "precopy")]
    for c in cells:
        assert c["completed"] == c["verified"] == 1 and not c["errors"], c
        assert c["round0-gib-s-median"] > 0 and c["vs-ceiling"] > 0 and c["vs-grpc"] > 0
        assert c["downtime-ms-median"] > 0 and c["bytes-per-ram-median"] >= 0.5
        assert c["agent-anon-mib-peak"] > 10  # a Python process with grpc and numpy
    # an all-written guest sends every page whole: no zero page flatters it
    assert cells[0]["bytes-per-ram-median"] >= 1.0
    assert cells[4]["vs-tls"] > 0 and cells[0]["vs-tls"] is None
    post = cells[3]["postcopy"]  # every page once, after the resume (but the info page)
    assert post["pushed-pages-median"] + post["requested-pages-median"] - \
        post["resent-pages-median"] == 256 * 256 - 1
    assert post["guest-checks-failed"] == 0 and "post-copy cell" in \
        (tmp_path / "b.md").read_text()
    busy = cells[2]
    assert busy["net-peer"] is not None and busy["net-peer"]["answered"] > 0
    md = (tmp_path / "b.md").read_text()
    assert md.startswith("`pvmig bench --quick --runs 1`") and "Raw-TCP ceiling" in md
    assert "Bare gRPC ceiling" in md and "Bare Python TLS ceiling" in md
    assert "256 MiB, all written, dirty idle, devices idle, tcp + mutual TLS" in md
    for png in ("bench-throughput.png", "bench-downtime.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"

"""End to end: page data compressed on the wire (migrate --compress zstd), and the
timeline of a real migration drawn by `pvmig plot`."""

from __future__ import annotations

from support import create, local_cluster, migrate, pvmig


def test_zstd_migration_and_its_plot(tmp_path):
    with local_cluster(tmp_path) as c:
        a, b = c["a"].address, c["b"].address
        create(a, "vm", ram_mb=32, dirty_rate=500, fill=0.75)
        r, data = migrate(a, b, "vm", tmp_path / "r.json", "--compress", "zstd")
        assert r.returncode == 0, r.stderr
        assert data["compression"] == "zstd" and data["verification"]["passed"] is True
        # what travels is never more than the pages themselves plus their frame lists
        frames_bytes = 4 * (data["normal-pages"] + data["zero-pages"])
        assert data["transferred-bytes"] <= data["normal-bytes"] + frames_bytes
        assert all("started-ms" in r for r in data["rounds"])

    p = pvmig("plot", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.png"))
    assert p.returncode == 0, p.stderr
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_refuses_what_is_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text('{"status": "completed"}')
    r = pvmig("plot", str(tmp_path / "x.json"))
    assert r.returncode == 1 and "not a pvmig migrate report with rounds" in r.stderr
    r = pvmig("plot", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "cannot read report" in r.stderr

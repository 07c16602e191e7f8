"""End to end: a guest that dirties memory faster than the link carries it. Without
auto-converge the rounds never shrink and the report says it did not converge; with
it, the source throttles the guest's vCPU step by step until what is left fits the
downtime limit. (How long either takes is `pvmig bench`'s business, not a test's.)"""

from __future__ import annotations

from support import create, local_cluster, migrate, wait_running_and_checking

LINK = ["--max-bandwidth", "200", "--downtime-limit", "100"]


def test_auto_converge(tmp_path):
    with local_cluster(tmp_path) as c:
        a, b = c["a"].address, c["b"].address
        # 16 MiB dirtied all over at 20000 pages/s: about 3x what 200 Mbit/s carries
        create(a, "vm", ram_mb=16, dirty_rate=20000, fill=0.75, hot_fraction=1.0)
        r, plain = migrate(a, b, "vm", tmp_path / "plain.json", *LINK, "--max-rounds", "8",
                           "--no-progress-rounds", "3")
        assert r.returncode == 0, r.stderr  # it moves, with a long stop
        assert plain["converged"] is False and "not converging" in plain["stop-reason"]
        assert plain["expected-downtime-ms"] > 100
        assert plain["auto-converge"] == {"enabled": False, "max-throttle-percent": 0}
        assert all(x["mbps"] < 230 for x in plain["rounds"] if x["bytes"] > 1 << 20)

        r, tamed = migrate(b, a, "vm", tmp_path / "tamed.json", *LINK, "--max-rounds", "60",
                           "--auto-converge", timeout=400)
        assert r.returncode == 0, r.stderr
        assert tamed["converged"] is True, tamed["stop-reason"]
        assert tamed["expected-downtime-ms"] <= 100
        steps = [x["throttle-percent"] for x in tamed["rounds"] if not x["final"]]
        assert steps == sorted(steps) and steps[-1] >= 20
        assert tamed["auto-converge"]["max-throttle-percent"] == steps[-1]
        # throttling ends with the migration: the guest runs at its own pace again
        home = wait_running_and_checking(a, "vm")
        assert home.guest.checks_failed == 0

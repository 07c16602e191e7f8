"""End to end: two agents as separate processes on loopback, a busy guest, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support import create, domains, json_lines, migrate, pvmig, query, wait_running_and_checking

REPORT_KEYS = {"status", "error", "ram-bytes", "total-time-ms", "setup-time-ms", "downtime-ms",
               "expected-downtime-ms", "transferred-bytes", "zero-pages", "normal-pages",
               "dirty-sync-count", "mbps", "rounds", "verification"}


def _assert_good_report(data: dict, ram_bytes: int, min_zero_pages: int | None = None) -> None:
    assert REPORT_KEYS <= data.keys()
    assert data["status"] == "completed", data["error"]
    assert data["error"] is None
    assert data["ram-bytes"] == ram_bytes
    assert data["verification"]["memory"] == "identical"
    checks = data["verification"]["guest-checks"]
    assert checks["failed"] == 0 and checks["run"] > 0 and checks["sweeps"] >= 1
    assert data["verification"]["passed"] is True
    rounds = data["rounds"]
    assert rounds[0]["round"] == 0 and rounds[0]["pages"] == ram_bytes // 4096
    assert rounds[-1]["final"] is True
    assert data["dirty-sync-count"] == len(rounds)
    assert data["transferred-bytes"] == sum(r["bytes"] for r in rounds)
    # Untouched memory is zero pages: sent as numbers (half of this guest at boot).
    if min_zero_pages is None:
        min_zero_pages = ram_bytes // 4096 // 5
    assert data["zero-pages"] >= min_zero_pages
    assert data["normal-pages"] + data["zero-pages"] == sum(r["pages"] for r in rounds)
    assert 0 <= data["downtime-ms"] < data["total-time-ms"]
    assert data["setup-time-ms"] > 0 and data["mbps"] > 0
    for r in rounds:
        assert {"pages", "bytes", "duration-ms", "dirty-pages-rate"} <= r.keys()


@pytest.mark.quick
def test_migrate_there_and_back(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm1", ram_mb=64, dirty_rate=3000, fill=0.5)
    before = wait_running_and_checking(a, "vm1")

    r, there = migrate(a, b, "vm1", tmp_path / "there.json")
    assert r.returncode == 0, r.stderr
    _assert_good_report(there, 64 << 20)
    # The guest runs on b only, with its counters carried over in its RAM.
    assert "vm1" not in domains(a)
    on_b = wait_running_and_checking(b, "vm1")
    assert on_b.guest.resumes == 1
    assert on_b.guest.steps > before.guest.steps
    assert on_b.guest.pages_written > before.guest.pages_written
    assert on_b.guest.checks_failed == 0, (before.guest, on_b.guest)
    # Not a terminal: progress comes as JSON lines, ending with the summary.
    events = json_lines(r.stdout)
    assert {e["event"] for e in events} >= {"phase", "round", "summary"}
    assert events[-1]["event"] == "summary" and events[-1]["verified"] is True

    r, back = migrate(b, a, "vm1", tmp_path / "back.json")
    assert r.returncode == 0, r.stderr
    _assert_good_report(back, 64 << 20)
    assert "vm1" not in domains(b)
    home = wait_running_and_checking(a, "vm1")
    assert home.guest.resumes == 2 and home.guest.checks_failed == 0


def test_busy_guest_iterates_rounds(cluster, tmp_path):
    """A dirty rate the first rounds cannot catch up with: several rounds, then stop."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "busy", ram_mb=64, dirty_rate=20000, hot_fraction=0.5)
    wait_running_and_checking(a, "busy")
    r, data = migrate(a, b, "busy", tmp_path / "r.json", "--downtime-limit", "0.01",
                      "--max-rounds", "4")
    assert r.returncode == 0, r.stderr
    # (a busy guest writes into its zero pages too: how many are left depends on time)
    _assert_good_report(data, 64 << 20, min_zero_pages=0)
    precopy = [x for x in data["rounds"] if not x["final"]]
    assert len(precopy) == 4 and "cap of 4 rounds" in data["stop-reason"]
    # The guest writes in 10 ms bursts: a short round may find nothing, but the rounds
    # after round 0 together found what it wrote.
    assert sum(x["pages"] for x in precopy[1:]) > 0


def test_domain_cli(cluster):
    a = cluster["a"].address
    create(a, "c1", ram_mb=16, dirty_rate=100)
    r = pvmig("domain", "list", "--agent", a)
    assert r.returncode == 0 and "c1" in r.stdout and "running" in r.stdout
    r = pvmig("domain", "show", "c1", "--agent", a)
    assert r.returncode == 0 and '"state": "running"' in r.stdout
    r = pvmig("status", "--agent", a, "--agent", cluster["b"].address)
    assert r.returncode == 0, r.stderr
    assert "a (" in r.stdout and "b (" in r.stdout and "c1" in r.stdout and "running" in r.stdout
    r = pvmig("status", "--agent", a, "--json")
    assert json.loads(r.stdout)[a]["domains"][0]["name"] == "c1"
    pid = query(a, "c1").guest_pid
    r = pvmig("domain", "destroy", "c1", "--agent", a)
    assert r.returncode == 0, r.stderr
    assert "c1" not in domains(a)
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_progress_bar_on_a_terminal(cluster, tmp_path):
    """On a terminal, rich draws a bar per round and a summary table instead of JSON."""
    import pty
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "tty", ram_mb=32)
    parent, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pvmig", "migrate", "--source", a,
                             "--dest", b, "--domain", "tty"],
                            stdin=child, stdout=child, stderr=child, close_fds=True,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0
    text = out.decode(errors="replace")
    assert "round 0" in text and "pages left" in text
    assert "verdict" in text and "passed" in text
    assert '{"event"' not in text

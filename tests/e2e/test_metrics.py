"""End to end: each agent serves Prometheus metrics (`--metrics-listen`). After
migrations that complete, fail and are cancelled, both ways between two agents, each
agent's counters say what the reports say: started and ended by role and outcome, bytes
sent and received (page data and disk blocks apart, the same on both ends), rounds, the
downtime histogram, domains by state."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from support import metric as value
from support import migrate, pvmig, scrape

BLOCKS = 1024


@pytest.fixture
def hosts(make_cluster, tmp_path):
    return make_cluster(extra_args=lambda name: [
        "--metrics-listen", "127.0.0.1:0", "--storage-dir", str(tmp_path / f"store-{name}")])


def _cancelled_halfway(source: str, dest: str, partial, tmp_path) -> None:
    """A migration held at half its disk, then `pvmig cancel`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", source, "--dest", dest,
         "--domain", "vm", "--report", str(tmp_path / "cancelled.json"), "--copy-storage",
         "--remove-source-storage", "--inject", "storage-holds-halfway"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        migration = None
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            migration = event.get("migration", migration)
            if event.get("phase") == "storage":
                break
        last = (BLOCKS // 2 - 1) * 4096
        deadline = time.monotonic() + 30
        while not (partial.exists() and np.fromfile(partial, np.uint8, 4096, offset=last).any()):
            assert time.monotonic() < deadline, "the copy's first half never arrived"
            time.sleep(0.05)
        r = pvmig("cancel", "--migration", migration, "--agent", source, "--agent", dest)
        assert r.returncode == 0, r.stderr
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0


def test_each_agents_metrics_match_the_reports(hosts, tmp_path):
    a, b = hosts["a"], hosts["b"]
    assert a.metrics and b.metrics, "the ready file names where the metrics are"
    r = pvmig("domain", "create", "vm", "--agent", a.address, "--ram-mb", "32",
              "--dirty-rate", "2000", "--disk", "vm.img", "--disk-blocks", str(BLOCKS),
              "--disk-fill", "0.5", "--disk-latency-ms", "5", "--disk-io-rate", "300")
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    copy = ("--copy-storage", "--remove-source-storage")

    r, there = migrate(a.address, b.address, "vm", tmp_path / "there.json", *copy)
    assert r.returncode == 0, r.stderr
    r, failed = migrate(b.address, a.address, "vm", tmp_path / "failed.json", *copy,
                        "--inject", "storage-fills-up")
    assert r.returncode != 0 and failed["status"] == "failed" and not failed["committed"]
    _cancelled_halfway(b.address, a.address, tmp_path / "store-a" / "vm.img", tmp_path)
    r, back = migrate(b.address, a.address, "vm", tmp_path / "back.json", *copy)
    assert r.returncode == 0, r.stderr

    ma, mb = scrape(a.metrics), scrape(b.metrics)
    # a: the source of one (completed), the destination of three (failed, aborted, done)
    assert value(ma, "pvmig_migrations_started_total", role="source") == 1
    assert value(ma, "pvmig_migrations_started_total", role="destination") == 3
    assert value(ma, "pvmig_migrations_ended_total", role="source", outcome="completed") == 1
    for outcome in ("completed", "failed", "aborted"):
        assert value(ma, "pvmig_migrations_ended_total", role="destination",
                     outcome=outcome) == 1, outcome
        assert value(mb, "pvmig_migrations_ended_total", role="source",
                     outcome=outcome) == 1, outcome
    assert value(mb, "pvmig_migrations_started_total", role="source") == 3
    assert value(mb, "pvmig_migrations_ended_total", role="destination",
                 outcome="completed") == 1
    # bytes: a sent only the first migration's, b received only those; the same counts
    # at both ends, and the report's (memory: transferred-bytes; disk: storage bytes)
    assert value(ma, "pvmig_migration_sent_bytes_total", kind="memory") == \
        there["transferred-bytes"] == value(mb, "pvmig_migration_received_bytes_total",
                                            kind="memory")
    assert value(ma, "pvmig_migration_sent_bytes_total", kind="disk") == \
        there["storage"]["bytes"] == value(mb, "pvmig_migration_received_bytes_total",
                                           kind="disk")
    assert value(mb, "pvmig_migration_sent_bytes_total", kind="memory") >= \
        back["transferred-bytes"] > 0
    # rounds of the one migration a sent
    assert value(ma, "pvmig_migration_rounds_total", kind="memory") == len(there["rounds"])
    assert value(ma, "pvmig_migration_rounds_total", kind="storage") == \
        len(there["storage"]["storage-rounds"])
    # one downtime each, the coordinator's
    for m, report in ((ma, there), (mb, back)):
        assert value(m, "pvmig_migration_downtime_seconds_count") == 1
        assert value(m, "pvmig_migration_downtime_seconds_sum") == \
            pytest.approx(report["downtime-ms"] / 1e3, abs=1e-6)
    # the guest runs at a, and nowhere else
    assert value(ma, "pvmig_domains", state="running") == 1
    assert not [k for k in mb if k[0] == "pvmig_domains"]
    assert value(ma, "pvmig_postcopy_faults_total") == 0

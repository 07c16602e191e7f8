"""`make demo`'s command runs end to end: two agents, a busy guest with a disk and a NIC,
one live migration, verified, and its summary."""

from __future__ import annotations

import json

import pytest
from support import pvmig


@pytest.mark.quick
def test_demo_migrates_and_verifies(tmp_path):
    r = pvmig("demo", "--ram-mb", "32", "--dirty-rate", "2000", "--report",
              str(tmp_path / "demo.json"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["status"] == "completed" and report["verification"]["passed"] is True
    assert {d["kind"] for d in report["devices"]} == {"vbd", "vif"}

"""A guest process loads only the hypervisor and PV layers: no gRPC, no protobuf, no
dom0 (xenstored), as a real guest kernel links none of dom0's tools."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT


def test_a_guest_process_loads_no_grpc_and_no_dom0():
    code = ("import json, sys, guest.__main__\n"
            "print(json.dumps(sorted(m for m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    pvmig = {m.split(".")[1] for m in loaded if m.startswith("pvmig.")}
    assert pvmig <= {"errors", "hv", "pv"}, pvmig
    assert not [m for m in loaded if m.split(".")[0] in ("grpc", "google")]

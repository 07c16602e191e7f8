"""The committed gRPC code in pvmig/_proto is what proto/pvmig.proto generates.

Compared byte for byte, version stamps included: grpcio-tools comes from the test
extra in pyproject.toml, and the same command as `make proto` regenerates.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

pytestmark = pytest.mark.timeout(120)
GENERATED = ("pvmig_pb2.py", "pvmig_pb2.pyi", "pvmig_pb2_grpc.py")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    # The Makefile's `proto` target, with OUT for the tree.
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Ipvmig/_proto=proto",
           f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
           "proto/pvmig.proto"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, f"protoc failed:\n{run.stderr}"
    return out / "pvmig" / "_proto"


def test_regenerates_exactly_the_committed_files(regenerated):
    made = sorted(p.name for p in regenerated.iterdir())
    assert made == sorted(GENERATED)
    committed = sorted(p.name for p in (ROOT / "pvmig" / "_proto").iterdir()
                       if p.is_file() and p.name.startswith("pvmig_pb2"))
    assert committed == sorted(GENERATED), "stray generated files in pvmig/_proto"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_matches_the_proto(regenerated, name):
    fresh = (regenerated / name).read_bytes()
    committed = (ROOT / "pvmig" / "_proto" / name).read_bytes()
    if fresh != committed:
        diff = "".join(list(difflib.unified_diff(
            committed.decode(errors="replace").splitlines(True),
            fresh.decode(errors="replace").splitlines(True),
            f"pvmig/_proto/{name} (committed)", f"{name} (from proto/pvmig.proto)"))[:60])
        pytest.fail(f"pvmig/_proto/{name} does not match proto/pvmig.proto: "
                    f"run `make proto`\n{diff}", pytrace=False)

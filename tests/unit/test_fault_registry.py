"""The fault registry (pvmig.faults) names every fault point the code has, and only
those: a point a test sets that the code never reaches would fault nothing."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from support import ROOT

from pvmig import faults


def _literal_calls(attr: str) -> set[str]:
    """The string arguments of every call to `.attr("...")` in the code."""
    found = set()
    for pkg in ("pvmig", "source_host", "dest_host"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == attr and node.args
                        and isinstance(node.args[0], ast.Constant)):
                    found.add(node.args[0].value)
    return found


def test_every_agent_point_is_registered_and_reached():
    assert _literal_calls("point") == set(faults.AGENT_POINTS)


def test_every_coordinator_phase_is_registered_and_entered():
    assert _literal_calls("_phase") == set(faults.COORDINATOR_PHASES)


def test_an_unregistered_point_is_a_bug_not_a_silent_no_op():
    with pytest.raises(AssertionError):
        faults.point("nowhere")
    with pytest.raises(AssertionError):
        faults.phase("nowhere")


@pytest.mark.parametrize("fault,name", [(faults.AGENT_CRASHES_AT, "point('complete')"),
                                        (faults.COORDINATOR_DIES_AT, "phase('final')")])
def test_a_named_point_kills_its_process_there_and_only_there(fault, name):
    code = ("from pvmig import faults\n"
            "faults.point('commit'); faults.phase('begin')\n"
            "print('before', flush=True)\n"
            f"faults.{name}\n"
            "print('after', flush=True)\n")
    env = {**os.environ, fault.env: name.split("'")[1]}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -9 and r.stdout == "before\n", (r.returncode, r.stdout, r.stderr)

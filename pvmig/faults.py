"""Every fault point, in one registry: where a test makes a process crash or stall.

Each fault is an environment variable naming a point; the process it is set for acts
when it reaches that point, and nowhere else (nothing happens by chance). The fault
suite (tests/faults) sets them; docs/RELIABILITY.md has what each cell leads to.

    PVMIG_FAULT_AGENT_DIES_AT=POINT     the host crashes there: the agent and the guests
                                        in its process group, all SIGKILLed
    PVMIG_FAULT_AGENT_CRASHES_AT=POINT  the agent alone crashes there (dom0): its guests
                                        live on, and its next start revives them
    PVMIG_FAULT_COORDINATOR_DIES_AT=PHASE
                                        the coordinator is SIGKILLed as it enters PHASE
                                        (its event in the progress stream is out first)
    PVMIG_FAULT_COORDINATOR_STALLS_AT=PHASE:SECONDS
                                        ... or stalls there that long, holding up the
                                        whole coordinator (a cancel lands in that phase)

Agent points: "commit" and "committed" (the source, before and after its commit record),
"dest-committed" (the destination, after its commit record, before the resume),
"complete" (the source, asked to destroy its copy after the destination resumed it),
"unpark" and "unparked" (a start resuming a parked or crash-left domain, just before
the resume and just after it). Coordinator phases: COORDINATOR_PHASES.

This module imports nothing of pvmig's: every layer may reach a fault point.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    env: str
    who: str  # which process acts on it
    what: str


AGENT_DIES_AT = Fault("PVMIG_FAULT_AGENT_DIES_AT", "agent",
                      "the host crashes: the agent and its guests SIGKILLed")
AGENT_CRASHES_AT = Fault("PVMIG_FAULT_AGENT_CRASHES_AT", "agent",
                         "the agent alone is SIGKILLed; its guests live on")
COORDINATOR_DIES_AT = Fault("PVMIG_FAULT_COORDINATOR_DIES_AT", "coordinator",
                            "the coordinator is SIGKILLed as it enters the phase")
COORDINATOR_STALLS_AT = Fault("PVMIG_FAULT_COORDINATOR_STALLS_AT", "coordinator",
                              "the coordinator stalls in the phase (PHASE:SECONDS)")

AGENT_POINTS = ("commit", "committed", "dest-committed", "complete", "unpark", "unparked")
# the coordinator's phases, the events of its progress stream (pvmig.coordinator.migrate):
# in order, then those of a throttle, a reconnect, a failure and a lost commit answer
COORDINATOR_PHASES = ("connect", "prepare", "begin", "stop-and-copy", "suspend", "quiesce",
                      "final", "commit", "committed", "resumed", "verify", "done",
                      "throttle", "streams-reconnected", "abort", "recover", "precopy", "switch",
                      "intervention",
                      "postcopy-active", "postcopy-done", "postcopy-paused",
                      "postcopy-recovered", "storage", "storage-ready",
                      "storage-not-converged")

_host_dies_at = os.environ.get(AGENT_DIES_AT.env, "")
_agent_crashes_at = os.environ.get(AGENT_CRASHES_AT.env, "")
_coordinator_dies_at = os.environ.get(COORDINATOR_DIES_AT.env, "")
_stalls_at, _, _stall_s = os.environ.get(COORDINATOR_STALLS_AT.env, "").partition(":")


def point(name: str) -> None:
    """An agent's fault point: it crashes here if told to."""
    assert name in AGENT_POINTS, name
    if name == _host_dies_at and os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)  # (it leads its guests' process group)
    if name in (_host_dies_at, _agent_crashes_at):
        os.kill(os.getpid(), signal.SIGKILL)


def phase(name: str) -> None:
    """The coordinator enters a phase (its event already out): it dies or stalls here
    if told to."""
    assert name in COORDINATOR_PHASES, name
    if name == _coordinator_dies_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == _stalls_at:
        time.sleep(float(_stall_s or 0))

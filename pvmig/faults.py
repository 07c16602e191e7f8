"""The agents' fault points, for the fault suite (tests/test_e2e_faults.py).

    PVMIG_FAULT_AGENT_DIES_AT=POINT     the host crashes there: the agent and the guests
                                        in its process group, all SIGKILLed
    PVMIG_FAULT_AGENT_CRASHES_AT=POINT  the agent alone crashes there (dom0): its guests
                                        live on, and its next start revives them

Points: "commit" and "committed" (the source, before and after its commit record),
"dest-committed" (the destination, after its commit record, before the resume),
"complete" (the source, asked to destroy its copy after the destination resumed it),
"unpark" and "unparked" (a start resuming a parked or crash-left domain, just before
the resume and just after it).
"""

from __future__ import annotations

import os
import signal

_HOST_DIES_AT = os.environ.get("PVMIG_FAULT_AGENT_DIES_AT", "")
_AGENT_CRASHES_AT = os.environ.get("PVMIG_FAULT_AGENT_CRASHES_AT", "")


def point(name: str) -> None:
    if name == _HOST_DIES_AT and os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)  # (it leads its guests' process group)
    if name in (_HOST_DIES_AT, _AGENT_CRASHES_AT):
        os.kill(os.getpid(), signal.SIGKILL)

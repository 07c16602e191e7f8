"""How frontends come back after a move: the experiment's `recovery` policy.

The guest is told at resume (the hypercall channel's "resume" message carries it); the
frontends act on it as they reconnect (guest/devices.py).
"""

from __future__ import annotations

from enum import StrEnum


class Recovery(StrEnum):
    REPLAY = "replay"  # re-queue what was in flight from the shadow (Linux's blkif_recover)
    NAIVE = "naive"    # trust the responses left in the old ring (what the hazard corrupts)

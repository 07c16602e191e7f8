"""The bandwidth cap of a migration (QEMU's max-bandwidth), shared by all its streams.

A virtual clock: each batch is due when the bytes before it would have gone out at the
rate; a stream whose batch is due later sleeps until then. Up to BURST_S of credit
builds up while the streams are idle (between rounds), so a new round starts at once.
"""

from __future__ import annotations

import asyncio
import time

BURST_S = 0.005


class RateLimit:
    def __init__(self, mbps: float) -> None:
        self.bytes_per_s = mbps * 1e6 / 8
        self._due = time.monotonic()

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        self._due = max(self._due, now - BURST_S) + nbytes / self.bytes_per_s
        if self._due > now:
            await asyncio.sleep(self._due - now)

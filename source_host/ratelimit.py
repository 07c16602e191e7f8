"""The bandwidth cap of a migration (QEMU's max-bandwidth), shared by all its streams.

A virtual clock: each batch is due when the bytes before it would have gone out at the
rate; a stream whose batch is due later sleeps until then. Up to BURST_S of credit
builds up while the streams are idle (between rounds), so a new round starts at once.
The gRPC streams wait on the event loop (`take`), the data channels' threads in the
thread (`take_blocking`); one lock keeps the clock whole between them.
"""

from __future__ import annotations

import asyncio
import threading
import time

BURST_S = 0.005


class RateLimit:
    def __init__(self, mbps: float) -> None:
        self.bytes_per_s = mbps * 1e6 / 8
        self._due = time.monotonic()
        self._lock = threading.Lock()

    def _wait(self, nbytes: int) -> float:
        with self._lock:
            now = time.monotonic()
            self._due = max(self._due, now - BURST_S) + nbytes / self.bytes_per_s
            return self._due - now

    async def take(self, nbytes: int) -> None:
        wait = self._wait(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)

    def take_blocking(self, nbytes: int) -> None:
        wait = self._wait(nbytes)
        if wait > 0:
            time.sleep(wait)

    def charge(self, nbytes: int) -> None:
        """Count bytes that went without waiting (post-copy's urgent lane: a blocked
        guest does not queue behind the cap); the other streams wait for them."""
        self._wait(nbytes)

"""The agent's watchdog: migrations whose coordinator has gone silent are settled here.

A session nobody has touched for a lease (pvmig.host.sessions.Lease) is expired: before
commit it is aborted; after it, finished from the durable decision
(pvmig.migration.recovery). Each in a task of its own: one unreachable peer holds up
no other migration. Copies a crash left held (pvmig.host.parking) are settled once a
lease too.

`tick` is one round; `run` repeats it. Both read the host's clock, so a test drives the
watchdog with a clock of its own and no sleeping.
"""

from __future__ import annotations

import asyncio
import logging

from pvmig import errors
from pvmig.host import parking
from pvmig.host.host import Host
from pvmig.host.sessions import Session

log = logging.getLogger(__name__)
EVERY_S = 1.0


class Watchdog:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.expiring: dict[str, asyncio.Task] = {}
        self._held: asyncio.Task | None = None
        self._held_next = host.clock() + host.session_timeout_s

    def tick(self) -> None:
        """One round: expired sessions not already expiring, and held copies once a
        lease. Starts tasks; never waits for one."""
        for mid in [m for m, t in self.expiring.items() if t.done()]:
            del self.expiring[mid]
        for session in [*self.host.saves, *self.host.restores]:
            if session.lease.expired() and session.migration_id not in self.expiring:
                self.expiring[session.migration_id] = asyncio.create_task(_expire(session))
        if (self._held is None or self._held.done()) and self.host.clock() >= self._held_next:
            self._held = asyncio.create_task(parking.recover_held(self.host))
            self._held_next = self.host.clock() + self.host.session_timeout_s

    async def run(self, every_s: float = EVERY_S) -> None:
        try:
            while True:
                await asyncio.sleep(every_s)
                self.tick()
        finally:
            self.cancel()

    def cancel(self) -> None:
        for task in [*self.expiring.values(), self._held]:
            if task is not None:
                task.cancel()


async def _expire(session: Session) -> None:
    try:
        await session.expire()
    except errors.PvmigError as e:
        # (an unreachable peer: tried again after another lease)
        log.error("migration %s, its coordinator gone: %s", session.migration_id, e)
        session.lease.renew()
    except Exception:  # a bug: said, and the watchdog goes on
        log.exception("migration %s: its expiry failed", session.migration_id)
        session.lease.renew()

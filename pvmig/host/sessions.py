"""The migrations a host takes part in: a registry per side, each session held by a lease.

The save side (source_host) and the restore side (dest_host) register their sessions
here, below them, so that the host, the agent's servicers and its watchdog find them
without knowing either side's code.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from pvmig import errors

Clock = Callable[[], float]  # seconds, monotonic: time.monotonic, or a test's


@dataclass
class Lease:
    """A session's hold on this host: kept alive by the coordinator's calls and the page
    streams. A session nobody has touched for `timeout_s` has lost its coordinator: the
    agent's watchdog settles it (pvmig.agent.watchdog)."""

    timeout_s: float
    clock: Clock = time.monotonic
    _busy: int = 0
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._last = self.clock()

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._last = self.clock()

    def renew(self) -> None:
        self._last = self.clock()

    def expired(self) -> bool:
        return self._busy == 0 and self.clock() - self._last > self.timeout_s


class Session(Protocol):
    """What the host and its watchdog need of either side's session."""

    migration_id: str
    lease: Lease

    @property
    def decided(self) -> bool:
        """Past the point where an abort is still the answer (committed, or the whole
        stream in at a destination, whose source may have committed)."""

    async def expire(self) -> None:
        """Its lease ran out: settle it as the coordinator would have."""

    async def abort(self, reason: str) -> None: ...


S = TypeVar("S", bound=Session)


class Sessions(Generic[S]):
    """One side's sessions by migration id."""

    def __init__(self, direction: str, host_name: str) -> None:
        self.direction, self.host_name = direction, host_name  # "outgoing" or "incoming"
        self._by_id: dict[str, S] = {}

    def add(self, session: S) -> None:
        if session.migration_id in self._by_id:
            raise errors.AlreadyExists(f"migration {session.migration_id} already exists")
        self._by_id[session.migration_id] = session

    def remove(self, migration_id: str) -> None:
        self._by_id.pop(migration_id, None)

    def get(self, migration_id: str) -> S | None:
        return self._by_id.get(migration_id)

    def lookup(self, migration_id: str) -> S:
        """The session, or NotFound naming it."""
        try:
            return self._by_id[migration_id]
        except KeyError:
            raise errors.NotFound(f"no {self.direction} migration {migration_id!r} on host "
                                  f"{self.host_name}") from None

    def __contains__(self, migration_id: object) -> bool:
        return migration_id in self._by_id

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

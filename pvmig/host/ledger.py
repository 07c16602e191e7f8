"""The migrations a host took part in since its agent started, as it saw them: when
each began and ended here, in which role, and how it ended (`ListMigrations`).

A fleet proves its caps held from these, not from its own bookkeeping: a source's
entry spans Begin to its end (its pages can flow only inside it), so the most entries
open at one instant is the most migrations that ran at once. Kept in memory, the newest
few thousand: a record for study, not for recovery (pvmig.host.commit_log is that).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

KEEP = 4096


@dataclass
class Entry:
    migration_id: str
    domain: str
    role: str  # source | destination
    began_unix_ns: int
    ended_unix_ns: int = 0  # 0: under way
    outcome: str = ""  # completed | failed | aborted


class Ledger:
    def __init__(self, clock=time.time_ns) -> None:
        # wall-clock time: the hosts of a fleet compare theirs (one machine's, or NTP's)
        self.clock = clock
        self._entries: deque[Entry] = deque(maxlen=KEEP)
        self._open: dict[tuple[str, str], Entry] = {}

    def began(self, migration_id: str, role: str, domain: str) -> None:
        entry = Entry(migration_id, domain, role, self.clock())
        self._entries.append(entry)
        self._open[(migration_id, role)] = entry
        if len(self._open) > KEEP:  # (one that never ended: its entry is gone already)
            del self._open[next(iter(self._open))]

    def ended(self, migration_id: str, role: str, outcome: str) -> None:
        """Once per entry: a second end of the same one (a late abort) changes nothing."""
        entry = self._open.pop((migration_id, role), None)
        if entry is not None:
            entry.ended_unix_ns, entry.outcome = self.clock(), outcome

    def entries(self) -> list[Entry]:
        return list(self._entries)

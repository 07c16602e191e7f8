"""The commit log: each migration's decision on this host, written durably before anyone
acts on it (two-phase commit, the source as the decider; pvmig.migration.recovery).

One JSON file per migration under DATA_DIR/migrations, named by the migration id:
written to a temporary file, fsynced, renamed, the directory fsynced. A record names
the role this host played in it; one of the other role is not this host's decision.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from pvmig import errors

RECORDS_KEPT_S = 30 * 86400  # a month, then pruned at the agent's start
_MIGRATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Role(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class Decision(StrEnum):
    """What a host recorded of a migration. Only a source records anything but
    COMMITTED: its undoing, its abort after a crash, or the loss of its guest."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"
    LOST = "lost"


@dataclass(frozen=True)
class CommitRecord:
    migration_id: str
    role: Role
    domain: str
    state: Decision
    time: float

    @classmethod
    def from_json(cls, data: dict) -> "CommitRecord":
        return cls(migration_id=data["migration_id"], role=Role(data["role"]),
                   domain=data["domain"], state=Decision(data["state"]),
                   time=float(data.get("time", 0.0)))


def check_migration_id(migration_id: str) -> None:
    """Ids name files here (the commit records): letters, digits, '-', '_', at most 64."""
    if not _MIGRATION_ID.fullmatch(migration_id):
        raise errors.InvalidArgument(
            f"bad migration id {migration_id[:80]!r}: use letters, digits, '-', '_' "
            "(at most 64)")


class CommitLog:
    def __init__(self, folder: Path, host_name: str) -> None:
        self.folder, self.host_name = Path(folder), host_name

    def record(self, migration_id: str, role: Role, domain: str,
               state: Decision = Decision.COMMITTED) -> None:
        """Write the decision (or its undoing) durably, before anyone acts on it."""
        path = self._path(migration_id)
        tmp = path.with_suffix(".tmp")
        record = CommitRecord(migration_id, Role(role), domain, Decision(state), time.time())
        try:
            with open(tmp, "w") as f:
                json.dump({**asdict(record), "role": record.role.value,
                           "state": record.state.value}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise errors.FailedPrecondition(
                f"host {self.host_name} cannot record the commit of migration {migration_id} "
                f"in {path.parent}: {e}") from None

    def read(self, migration_id: str, role: Role) -> CommitRecord | None:
        """This host's record of a migration it decided in `role`, if any."""
        path = self._path(migration_id)
        try:
            record = CommitRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise errors.DataLoss(f"host {self.host_name}: the commit record of migration "
                                  f"{migration_id} is unreadable: {e}") from None
        return record if record.role == role else None

    def prune(self, older_than_s: float = RECORDS_KEPT_S) -> int:
        """Records a recovery could still need are young: a migration left unsettled is
        settled within a few leases. Older ones go (at start)."""
        now, pruned = time.time(), 0
        for path in self.folder.glob("*.json"):
            try:
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    pruned += 1
            except OSError:
                continue  # (gone meanwhile, or not ours to remove: kept)
        return pruned

    def _path(self, migration_id: str) -> Path:
        check_migration_id(migration_id)
        return self.folder / f"{migration_id}.json"

"""A fleet operation's progress: a live table, one row per migration, on a terminal;
a line per change anywhere else (a log, a test's pipe)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


def table(rows, title: str = "") -> Table:
    t = Table(title=title or None)
    for col, just in (("domain", "left"), ("MiB", "right"), ("from", "left"),
                      ("to", "left"), ("state", "left"), ("phase", "left"),
                      ("round", "right"), ("tries", "right"), ("downtime ms", "right"),
                      ("total s", "right"), ("error", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in rows:
        last = r.last or {}
        style = {"completed": "green", "failed": "red", "aborted": "red",
                 "cancelled": "yellow", "migrating": "cyan"}.get(r.state, "")
        t.add_row(r.domain, str(r.ram >> 20), r.source, r.dest, f"[{style}]{r.state}[/]"
                  if style else r.state, r.phase if r.state == "migrating" else "",
                  str(r.round) if r.round >= 0 and r.state == "migrating" else "",
                  str(len(r.attempts)),
                  "" if last.get("downtime-ms") is None else f"{last['downtime-ms']:.1f}",
                  "" if last.get("total-time-ms") is None
                  else f"{last['total-time-ms'] / 1e3:.1f}", r.error[:80])
    return t


class LiveTable:
    def __init__(self, rows_of, title: str) -> None:
        self.rows_of, self.title = rows_of, title
        self.live = Live(table([], title), console=Console(stderr=True),
                         refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, row) -> None:
        self.live.update(table(self.rows_of(), self.title))

    def close(self) -> None:
        self.live.update(table(self.rows_of(), self.title))
        self.live.stop()


class LineLog:
    """A line when a row's state or phase changes: `t domain from->to state phase`."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stderr
        self.t0 = time.monotonic()
        self._seen: dict[str, tuple] = {}

    def update(self, row) -> None:
        key = (row.state, row.dest, row.phase if row.state == "migrating" else "")
        if self._seen.get(row.domain) == key:
            return
        self._seen[row.domain] = key
        extra = f" {key[2]}" if key[2] else ""
        err = f" ({row.error})" if row.error and row.state != "migrating" else ""
        print(f"{time.monotonic() - self.t0:8.2f} {row.domain} {row.source}->{row.dest} "
              f"{row.state}{extra}{err}", file=self.out, flush=True)

    def close(self) -> None:
        pass


def for_terminal(rows_of, title: str):
    return LiveTable(rows_of, title) if sys.stderr.isatty() else LineLog()

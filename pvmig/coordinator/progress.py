"""What the coordinator shows while it works: a rich progress bar on a terminal,
JSON lines (one object per event) anywhere else, so that scripts can follow along."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pvmig.hv.memory import PAGE_SIZE


class Reporter:
    """Events: phase(name), round_progress(round, done, total, bytes), round_done(stats)."""

    def phase(self, name: str, **fields) -> None: ...
    def round_progress(self, round: int, done: int, total: int, nbytes: int,
                       final: bool = False) -> None: ...
    def round_done(self, stats: dict) -> None: ...
    def close(self) -> None: ...


class JsonLines(Reporter):
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self._last = 0.0

    def _emit(self, event: str, **fields) -> None:
        rec = {"event": event, "t": round(time.monotonic() - self.t0, 4), **fields}
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def phase(self, name: str, **fields) -> None:
        self._emit("phase", phase=name, **fields)

    def round_progress(self, round: int, done: int, total: int, nbytes: int,
                       final: bool = False) -> None:
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            self._emit("progress", round=round, done_pages=done, total_pages=total,
                       remaining_pages=total - done, bytes=nbytes)

    def round_done(self, stats: dict) -> None:
        self._emit("round", **stats)


class RichBar(Reporter):
    """One bar per round: its pages as bytes, rate and ETA, and the pages left."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:>10}"), BarColumn(), DownloadColumn(binary_units=True),
            TextColumn("{task.fields[left]:>8} pages left"), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self._task = None
        self._round = None

    def phase(self, name: str, **fields) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.console.log(f"[cyan]{name}[/] {extra}")

    def round_progress(self, round: int, done: int, total: int, nbytes: int,
                       final: bool = False) -> None:
        if round != self._round:
            self._round = round
            label = "final" if final else f"round {round}"
            self._task = self.progress.add_task(label, total=total * PAGE_SIZE, left=total)
        self.progress.update(self._task, completed=done * PAGE_SIZE, total=total * PAGE_SIZE,
                             left=total - done)

    def round_done(self, stats: dict) -> None:
        if self._task is not None:
            self.progress.update(self._task, completed=stats["pages"] * PAGE_SIZE, left=0)
        self._round = None

    def close(self) -> None:
        self.progress.stop()


def for_stream(out: TextIO = sys.stdout) -> Reporter:
    return RichBar() if out.isatty() else JsonLines(out)

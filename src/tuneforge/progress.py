"""Progress for every phase that can take more than a few seconds (prepare, generate-eval, merge, export,
quantize, predict): a rich bar on a terminal; when output is piped (CI, `make demo | tee`, a job log) one
plain line about every `every` seconds, so a long phase never looks hung.

    with phase("merge", total=len(shards), log=log) as p:
        for shard in shards:
            ...
            p.advance()
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

PIPED_EVERY_S = 10.0


class Phase:
    """One phase's counter. `advance` is cheap: the clock is read once per call, a line printed at most every
    `every` seconds when piped."""

    def __init__(self, name: str, total: Optional[int], log: Callable[[str], None], every: float, bar=None, task=None):
        self.name, self.total, self.log, self.every = name, total, log, every
        self.done = 0
        self.started = self._last = time.monotonic()
        self._bar, self._task = bar, task

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=note)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.log(f"{self.name}: {self.line(now)}" + (f" {note}" if note else ""))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if not self.total:
            return f"{self.done} done, {elapsed:.0f} s"
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return f"{self.done}/{self.total} ({self.done / self.total:.0%}), {elapsed:.0f} s" + (f", ~{eta:.0f} s left" if eta is not None else "")


def is_tty() -> bool:
    return sys.stderr.isatty()


@contextmanager
def phase(name: str, total: Optional[int] = None, log: Callable[[str], None] = print,
          every: float = PIPED_EVERY_S, tty: Optional[bool] = None) -> Iterator[Phase]:
    """A progress bar on a terminal; otherwise a start line, a line every `every` s, and an end line with the time."""
    tty = is_tty() if tty is None else tty
    if tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[note]}"), transient=False)
        with bar:
            task = bar.add_task(name, total=total, note="")
            yield Phase(name, total, log, every, bar, task)
        return
    p = Phase(name, total, log, every)
    log(f"{name}: started" + (f" ({total} to do)" if total else ""))
    yield p
    log(f"{name}: done, {p.done}{'/' + str(p.total) if p.total else ''} in {time.monotonic() - p.started:.0f} s")

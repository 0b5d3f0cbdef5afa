"""Progress of long loops, one place for every verb.

On a terminal: a tqdm bar. Anywhere else (a log file, CI, a service's journal): one log line at most every
``LOG_EVERY_S`` seconds with the count, rate and time left, and a last line when a loop that logged ends, so a long
command is never silent for minutes and a short one never floods its log. ``-q`` (logging at WARNING) silences both.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal
log = logging.getLogger("anoddpm.progress")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
             initial: int = 0, disable: bool = False, leave: bool = True, **bar_options: Any) -> Any:
    """A tqdm bar on a terminal, else a ``LogProgress``; same use: iterate it, or ``update(n)`` and ``close()`` (also as
    a context manager). `bar_options` go to tqdm only (e.g. ``mininterval``, ``dynamic_ncols``)."""
    quiet = _quiet()
    if disable or quiet or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable or quiet,
                    leave=leave, **bar_options)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


def _quiet() -> bool:
    """True when anoddpm's logging was set above INFO (``-q``); a library user who set nothing still gets bars."""
    level = next((lg.level for lg in (log, logging.getLogger("anoddpm")) if lg.level != logging.NOTSET), logging.NOTSET)
    return level > logging.INFO


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LogProgress:
    """Counts like a tqdm bar and logs "desc: n/total unit (p %), r unit/s, m:ss left" every LOG_EVERY_S seconds."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", initial: int = 0) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n = self.start_n = initial
        self.start = self.last = time.monotonic()
        self.logged = self.closed = False
        self.postfix = ""

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more; log when LOG_EVERY_S seconds passed since the last line."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            self.logged = True
            log.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts in the next lines (as tqdm's postfix), e.g. loss."""
        self.postfix = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        """The progress line as of `now` (monotonic seconds)."""
        elapsed = max((now if now is not None else time.monotonic()) - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_clock((self.total - self.n) / rate)} left")
        else:
            parts.append(f"{_clock(elapsed)} elapsed")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        """The last line, when the loop was long enough to log at all."""
        if not self.closed and self.logged:
            log.info("%s", self.line())
        self.closed = True

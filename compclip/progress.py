"""Progress of a long job, readable both in a terminal and in a batch job's log.

In a terminal (the stream's `isatty()`, or a Jupyter output) it is a tqdm bar. Anywhere else (a SLURM or
Kubernetes log, a pipe, `nohup`) tqdm's `\\r` frames pile up into one endless line, and a bar switched off there
shows nothing. So there, one plain line is written every `interval` seconds, and a last one when the job ends:

    prepare: 12000/50000 rows (24.0%) | 800.0 rows/s | elapsed 0:00:15 | ETA 0:00:48
    train: 400/400 steps (100.0%) | 2.1 steps/s | elapsed 0:03:10 | done | loss=0.4121 epoch=3

The rate counts only this session's work (a resumed job's `initial` is not in it), and the ETA is the remaining
work at that rate. The rate is per second, per minute or per hour, whichever reads best. Lines go to `logger`
at INFO level when one is given, so they get a run's timestamps and reach its `out.log`; otherwise to `stream`.
Lines are written from `update()`, so a job that stops calling it is silent until the next call.

The default interval is 30 s; the environment variable `COMPCLIP_PROGRESS_INTERVAL` (seconds) changes it for
every job at once, including child processes.

    with Progress(total=len(rows), desc="prepare", unit="rows") as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))

    for doc in track(nlp.pipe(captions), total=len(captions), desc="vocabulary", unit="captions"):
        ...
"""
from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, TextIO

INTERVAL_ENV = "COMPCLIP_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def default_interval() -> float:
    """Seconds between two plain lines: `COMPCLIP_PROGRESS_INTERVAL` when set, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (hours may exceed 24)."""
    whole = int(round(max(0.0, seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """A rate in the largest of /s, /min, /h at which it is at least 1 (a slow job reads `4.0 runs/h`, not
    `0.0011 runs/s`)."""
    for scale, suffix in ((1, "s"), (60, "min"), (3600, "h")):
        if per_second * scale >= 1:
            break
    return f"{per_second * scale:.1f} {unit}/{suffix}"


def _format_count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressStats(NamedTuple):
    """Where a job stands: work done (including `initial`), total (None if unknown), seconds since the start,
    rate of this session's work per second (None before any time has passed), seconds left (None if unknown)."""

    done: float
    total: Optional[float]
    elapsed: float
    rate: Optional[float]
    eta: Optional[float]


def _is_terminal(stream) -> bool:
    # A Jupyter kernel's output is no TTY but renders tqdm.auto's widget, which is what its users expect.
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _terminal_width(stream) -> int:
    # tqdm's dynamic width draws nothing at all on a terminal that reports 0 columns (a bare pseudo-terminal,
    # some CI runners); its fixed default width works there.
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class Progress:
    """A progress display: a tqdm bar in a terminal, a plain line every `interval` seconds elsewhere.

    total: the amount of work (None if unknown: no percentage, no ETA). desc: the job's name at the start of each
    line. unit: what is counted, plural (`rows`, `images`, `steps`). initial: work already done (a resumed job).
    enabled: False shows nothing (e.g. ranks other than 0; work is still counted for `stats()`). leave: in a terminal, keep the finished bar; in a log,
    write the closing line even for a job shorter than one interval (with leave=False, a short job writes nothing).
    interval: seconds between plain lines (default `default_interval()`). stream: where the bar or the lines go
    (default sys.stderr). tty: True/False forces the bar or the lines (default: ask the stream). logger: write the
    plain lines with `logger.info` instead. clock: seconds, monotonic (tests pass a fake one).

    `mode` says what it does: "bar", "lines" or "off".
    """

    def __init__(self, total: Optional[float] = None, desc: str = "", *, unit: str = "it", initial: float = 0,
                 enabled: bool = True, leave: bool = True, interval: Optional[float] = None,
                 stream: Optional[TextIO] = None, tty: Optional[bool] = None, logger=None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.done = self.initial = initial
        self.interval = default_interval() if interval is None else float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.logger, self.clock = logger, clock
        self.postfix: dict = {}
        self.lines_written = 0
        self.closed = False
        if not enabled:
            self.mode = "off"
        else:
            self.mode = "bar" if (_is_terminal(self.stream) if tty is None else tty) else "lines"
        self.start = self.last_line = clock()
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", leave=leave,
                             file=self.stream, dynamic_ncols=_terminal_width(self.stream) > 0)

    # ---- the caller's side ----------------------------------------------------------------------------------
    def update(self, n: float = 1, **postfix: Any) -> None:
        """Count `n` more units of work; keyword arguments are shown after the numbers (`loss=0.41`). Work is
        counted even when nothing is shown, so `stats()` serves a caller's own log lines either way."""
        if self.closed:
            return
        self.done += n
        if postfix:
            self.postfix.update(postfix)
        if self.mode == "off":
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self._write_line(now, final=False)

    def set_postfix(self, **postfix: Any) -> None:
        """Show these values from now on (without counting work)."""
        if self.closed:
            return
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def close(self) -> None:
        """End the display: close the bar, or write the closing line (see `leave`)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and (self.leave or self.lines_written):
            self._write_line(self.clock(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- numbers and lines ----------------------------------------------------------------------------------
    def stats(self, now: Optional[float] = None) -> ProgressStats:
        """Done, total, elapsed, rate and ETA now (for log lines of the caller's own, e.g. a step line)."""
        elapsed = (self.clock() if now is None else now) - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else None
        eta = None
        if self.total is not None and rate:
            eta = max(0.0, self.total - self.done) / rate
        return ProgressStats(self.done, self.total, elapsed, rate, eta)

    def line(self, now: Optional[float] = None, *, final: bool = False) -> str:
        """The plain line for the state at `now` (default: the clock's time)."""
        stats = self.stats(now)
        count = _format_count(stats.done)
        if stats.total is not None:
            count += f"/{_format_count(stats.total)} {self.unit}"
            if stats.total > 0:
                count += f" ({100 * stats.done / stats.total:.1f}%)"
        else:
            count += f" {self.unit}"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        if stats.rate is not None:
            parts.append(format_rate(stats.rate, self.unit))
        parts.append(f"elapsed {format_duration(stats.elapsed)}")
        if final:
            parts.append("done")
        elif stats.eta is not None:
            parts.append(f"ETA {format_duration(stats.eta)}")
        if self.postfix:
            parts.append(" ".join(f"{key}={_format_value(value)}" for key, value in self.postfix.items()))
        return " | ".join(parts)

    def _write_line(self, now: float, final: bool) -> None:
        text = self.line(now, final=final)
        if self.logger is not None:
            self.logger.info("%s", text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
        self.last_line = now
        self.lines_written += 1


def track(iterable: Iterable, total: Optional[float] = None, desc: str = "", **options: Any) -> Iterator:
    """Yield the items of `iterable`, counting one unit per item; `total` defaults to `len(iterable)` when it has
    one. `options` are `Progress`'s keyword arguments (unit, enabled, leave, interval, stream, tty, logger)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, **options) as progress:
        for item in iterable:
            yield item
            progress.update(1)

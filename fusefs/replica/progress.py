"""A one-line progress bar for long commands (``fusefs verify``, ``fusefs restore``).

On a terminal the line is redrawn in place (``\\r``, at most every :data:`INTERVAL` seconds, cut
to the terminal's width so it never wraps) and ends with a newline once the work is done.  When
it is off (stderr is no terminal, or ``--no-progress``) nothing at all is written, so scripts
and logs see only the command's own output.  No dependency: plain writes to a stream, and
one ANSI sequence (erase to the end of the line) when a shorter line replaces a longer one.

Counters may be bumped by one worker thread at a time (:meth:`Progress.advance`,
:meth:`Progress.partial`) while the trio thread's :meth:`Progress.ticker` redraws ~10 times a
second (so a long file or a slow answer still moves the line); a lock keeps drawings whole.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

import trio

__all__ = ["INTERVAL", "Progress", "format_bytes", "format_duration", "wanted"]

#: at most this many seconds between redraws (~10 a second)
INTERVAL = 0.1
#: the rate is measured over this many seconds
RATE_WINDOW = 5.0


def wanted(flag: bool | None, stream: TextIO) -> bool:
    """Whether to draw: ``flag`` (``--progress``/``--no-progress``) wins, else only on a
    terminal that can move the cursor back (not ``TERM=dumb``)."""
    if flag is not None:
        return flag
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM") != "dumb"


def format_bytes(n: float) -> str:
    """``n`` bytes for people: 999 B, 1.5 KiB, 12.3 MiB, ..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Phase, files done/total, bytes done/total, rate and ETA on one redrawn line."""

    def __init__(
        self,
        label: str,
        *,
        enabled: bool,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self._width = width
        self.phase_name = ""
        self.files = 0
        self.files_total: int | None = None
        self.bytes = 0
        self.bytes_total: int | None = None
        self._partial = 0  # bytes of the item in progress (set from any thread)
        self._began = self._start = clock()  # of the command, of the phase
        self._samples: deque[tuple[float, int]] = deque()
        self._last_draw: float | None = None
        self._drawn = False  # something is on the current line
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()

    def phase(
        self, name: str, files_total: int | None = None, bytes_total: int | None = None
    ) -> None:
        """Start a phase: counters back to zero, new totals (None: not known yet)."""
        self.phase_name = name
        self.files, self.files_total = 0, files_total
        self.bytes, self.bytes_total = 0, bytes_total
        self._partial = 0
        self._start = self.clock()
        self._samples.clear()
        self.refresh(force=True)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        """Count finished work (the item in progress is finished: its partial bytes end)."""
        self.files += files
        self.bytes += nbytes
        self._partial = 0
        self.refresh()

    def partial(self, nbytes: int) -> None:
        """Bytes done so far of the item in progress (safe from a worker thread; drawn at the
        next :meth:`refresh`)."""
        self._partial = nbytes

    def refresh(self, force: bool = False) -> None:
        """Redraw if :data:`INTERVAL` has passed since the last drawing (or ``force``)."""
        if not self.enabled:
            return
        with self._lock:
            now = self.clock()
            if not force and self._last_draw is not None and now - self._last_draw < INTERVAL:
                return
            self._last_draw = now
            self._draw(self.line(now))

    def finish(self) -> None:
        """Draw the final state and end the line (nothing if nothing was drawn)."""
        if not self.enabled:
            return
        with self._lock:
            if not self._drawn:
                return
            self._draw(self.line(self.clock(), final=True))
            self._write("\n")
            self._drawn = False

    async def ticker(self, poll: Callable[[], None] | None = None) -> None:
        """Redraw every :data:`INTERVAL` until cancelled, calling ``poll`` first (e.g. to
        :meth:`partial` the size of a file being received)."""
        if not self.enabled:
            return
        while True:
            await trio.sleep(INTERVAL)
            if poll is not None:
                poll()
            self.refresh()

    def done_bytes(self) -> int:
        return self.bytes + self._partial

    def line(self, now: float, final: bool = False) -> str:
        """The text of the line at ``now`` (``final``: the phase's average rate and the time
        the whole command took, instead of the current rate and an ETA)."""
        done = self.done_bytes()
        parts = [f"{self.label}: {self.phase_name}"]
        if self.files_total is None:
            if self.files:
                parts.append(f"{self.files} files")
        else:
            parts.append(f"{self.files}/{self.files_total} files")
        if self.bytes_total is not None:
            parts.append(f"{format_bytes(done)}/{format_bytes(self.bytes_total)}")
        elif done:
            parts.append(format_bytes(done))
        if final:
            elapsed = now - self._start
            if done and elapsed > 0:
                parts.append(f"{format_bytes(done / elapsed)}/s")
            parts.append(f"in {format_duration(now - self._began)}")
            return "  ".join(parts)
        rate = self._rate(now, done)
        if rate is not None:
            parts.append(f"{format_bytes(rate)}/s")
            if self.bytes_total is not None and rate > 0:
                parts.append(f"ETA {format_duration(max(0, self.bytes_total - done) / rate)}")
        return "  ".join(parts)

    def _rate(self, now: float, done: int) -> float | None:
        """Bytes per second over the last :data:`RATE_WINDOW` (None until measurable)."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        if now - t0 < 0.5:
            return None
        return (done - b0) / (now - t0)

    def _draw(self, text: str) -> None:
        width = self._width
        if width is None:
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, AttributeError, ValueError):
                width = 0
            width = width or 80  # a pty nobody sized says 0
        text = text[: max(width - 1, 10)]
        # \r, the text, then blank out what a longer previous line left behind
        self._write("\r" + text + "\x1b[K")
        self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # the terminal went away: stop drawing, keep working

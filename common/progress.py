"""Progress a person watching expects: on a terminal, a bar redrawn in place with the time left;
on a log (stdout or stderr not a terminal: a file, CI), plain lines that read well, one at the
start of a piece of work and one at its end.

    with Progress("starting 4 actor groups", total=4) as p:
        for ...:
            p.advance()
"""
from __future__ import annotations

import sys
import time

WIDTH = 24  # characters of the bar


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # a closed or odd stream
        return False


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def bar(done: float, total: float) -> str:
    filled = int(WIDTH * min(max(done / total, 0.0), 1.0)) if total else 0
    return "[" + "#" * filled + "-" * (WIDTH - filled) + "]"


def eta(started: float, done: float, total: float, now: float | None = None) -> str:
    """' | eta 1m20s' from the pace so far, or '' before there is any pace to judge by."""
    if done <= 0 or done >= total:
        return ""
    elapsed = (time.monotonic() if now is None else now) - started
    return f" | eta {duration(elapsed / done * (total - done))}"


class Progress:
    """One piece of work of `total` parts (model conversion, engine start-up)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = sys.stderr if stream is None else stream
        self.terminal = is_terminal(self.stream)
        self.started = time.monotonic()
        self._closed = False

    def __enter__(self) -> "Progress":
        if self.terminal:
            self._draw()
        else:
            print(f"asyncrl: {self.label} ...", file=self.stream, flush=True)
        return self

    def advance(self, parts: int = 1) -> None:
        self.done += parts
        if self.terminal:
            self._draw()

    def _draw(self) -> None:
        line = (f"asyncrl: {self.label} {bar(self.done, self.total)} {self.done}/{self.total} "
                f"{duration(time.monotonic() - self.started)}{eta(self.started, self.done, self.total)}")
        print("\r\x1b[K" + line, end="", file=self.stream, flush=True)

    def __exit__(self, kind, error, trace) -> None:
        if self._closed:
            return
        self._closed = True
        took = duration(time.monotonic() - self.started)
        outcome = f"done in {took}" if kind is None else f"failed after {took} ({kind.__name__})"
        prefix = "\r\x1b[K" if self.terminal else ""
        print(f"{prefix}asyncrl: {self.label}: {outcome}", file=self.stream, flush=True)

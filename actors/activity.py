"""Where an actor group's time goes, as shares of its wall-clock that add up to one.

Many episodes are in flight at once, so their times overlap; an actor's wall-clock is instead
split by what it was doing at each moment, the first of these that held:
  generation   the engine had a request pending (the GPU, or the CPU, was working)
  environment  no request pending, an environment call (reset or step) was running
  buffer       neither, an insert into the buffer was in flight
  waiting      nothing in flight: back-pressure, or waiting for new weights (sync baseline)
  idle         none of these (the loop itself, tokenizing, starting groups)
So "environment" is time the engine sat unused because every episode waited on its
environment: the time a faster environment (or more episodes in flight) would win back.
All of it is counted on the rollout loop's thread; readers on other threads take `seconds()`.
"""
from __future__ import annotations

import contextlib
import threading
import time

KINDS = ("generation", "environment", "buffer", "waiting")   # by priority; the rest is idle
SHARES = KINDS + ("idle",)


class Activity:
    def __init__(self):
        self._active = dict.fromkeys(KINDS, 0)
        self._seconds = dict.fromkeys(SHARES, 0.0)
        self._since = time.monotonic()
        self._lock = threading.Lock()

    def _settle(self, now: float) -> None:
        """Charge the time since the last change to what was going on then."""
        doing = next((k for k in KINDS if self._active[k]), "idle")
        self._seconds[doing] += now - self._since
        self._since = now

    def begin(self, kind: str) -> None:
        with self._lock:
            self._settle(time.monotonic())
            self._active[kind] += 1

    def end(self, kind: str) -> None:
        with self._lock:
            self._settle(time.monotonic())
            self._active[kind] -= 1

    @contextlib.contextmanager
    def doing(self, kind: str):
        self.begin(kind)
        try:
            yield
        finally:
            self.end(kind)

    def seconds(self) -> dict:
        """Seconds so far in each of SHARES (their sum is the wall-clock since start)."""
        with self._lock:
            self._settle(time.monotonic())
            return dict(self._seconds)


def shares(before: dict, after: dict) -> dict:
    """The share of each of SHARES between two `seconds()` readings ({} if no time passed)."""
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SHARES}
    total = sum(spent.values())
    return {k: v / total for k, v in spent.items()} if total > 0 else {}

"""Daemon thread pools for calls that may never return."""
from __future__ import annotations

import queue
import threading


class DaemonThreads:
    """At most `limit` daemon threads taking jobs from one queue, started only when every
    started one is busy. Daemon: a job that never returns (a hung environment) cannot keep the
    process from exiting, which a ThreadPoolExecutor's threads would."""

    def __init__(self, limit: int, name: str):
        self.limit, self.name = limit, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.started = self._idle = 0

    def submit(self, job) -> None:
        with self._lock:
            if self._idle <= 0 and self.started < self.limit:
                self.started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self.started}", daemon=True).start()
            self._idle -= 1  # claimed now, so a burst of submits starts the threads it needs
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            self._jobs.get()()

"""The weight channel: how the learner's weights reach the actors.

`publish(version, weights)` makes a new version available; `poll(have)` returns the newest
(version, weights) if it is newer than `have`, else None. Weights are a map of Hugging Face
parameter names to numpy arrays (CPU) and are read-only for receivers. Versions only grow.
Implementations: LocalWeightChannel (one process, tests) here; the Ray object-store channel
in launch/weights.py; NCCL broadcast for GPU actors comes with the vLLM engine.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod


class WeightSyncError(RuntimeError):
    """Weights could not be published or fetched in time; the text names the peer."""


class WeightChannel(ABC):
    @abstractmethod
    def publish(self, version: int, weights: dict) -> None: ...

    @abstractmethod
    def poll(self, have: int):
        """(version, weights) if a version newer than `have` is published, else None."""


class LocalWeightChannel(WeightChannel):
    def __init__(self):
        self._lock = threading.Lock()
        self._version, self._weights = 0, None

    def publish(self, version: int, weights: dict) -> None:
        with self._lock:
            if version <= self._version:
                raise WeightSyncError(f"version {version} is not newer than published {self._version}")
            self._version, self._weights = version, weights

    def poll(self, have: int):
        with self._lock:
            return (self._version, self._weights) if self._version > have else None

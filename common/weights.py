"""The weight channel: how the learner's weights reach the actors, version by version.

Two ends. The learner's `WeightSender.send(version, tensors)` (tensors: Hugging Face parameter
name -> torch tensor, in the learner's dtype, no numpy round trip) makes a version available;
the actor's `WeightReceiver.receive(sink, timeout_s)` delivers the next one into the engine's
staging copy (actors/engine.py StagedWeights). Versions only grow.

Transports, chosen by placement (launch/ wires them):
  LocalWeightChannel   one process (tests, evaluation), polled
  RayWeightChannel     Ray's object store (launch/weights.py), polled; CPU actors
  broadcast            a torch.distributed group: gloo between CPU processes, NCCL between GPUs
                       (common/weights_broadcast.py)
  CUDA IPC             the learner and an actor group on one GPU (common/weights_ipc.py)
"""
from __future__ import annotations

import threading
import time
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch


class WeightSyncError(RuntimeError):
    """Weights could not be sent or received in time; the text names the peer."""


class WeightSender(ABC):
    device_tensors = False
    """True: send() takes the tensors where they live (the learner's GPU, CUDA IPC and NCCL);
    False: CPU tensors."""

    @abstractmethod
    def send(self, version: int, tensors: dict) -> None:
        """Make `tensors` available as `version` (newer than any sent before); returns when the
        sender may change its tensors again."""


class PolledChannel(WeightSender):
    """A sender whose receivers ask for the newest version (PollingReceiver). The object is
    also its own channel spec: `sender()` in the learner, `receiver(i)` in actor group i."""

    def sender(self) -> "PolledChannel":
        return self

    def receiver(self, index: int) -> "PollingReceiver":
        return PollingReceiver(self)

    @abstractmethod
    def poll(self, have: int):
        """(version, tensors) if a version newer than `have` was sent, else None."""


class LocalWeightChannel(PolledChannel):
    """One process: the sender and every receiver share this object."""

    def __init__(self):
        self._lock = threading.Lock()
        self._version, self._weights = 0, None

    def send(self, version: int, tensors: dict) -> None:
        with self._lock:
            if version <= self._version:
                raise WeightSyncError(f"version {version} is not newer than the sent {self._version}")
            self._version, self._weights = version, tensors

    def poll(self, have: int):
        with self._lock:
            return (self._version, self._weights) if self._version > have else None


class WeightReceiver(ABC):
    """The actor's end of a weight channel. It delivers each new version into a sink (an
    engine's StagedWeights: begin(version), write(name, tensor) per tensor, commit(version),
    or abort() if the transfer failed), so the served weights change only by the engine's swap."""

    @abstractmethod
    def receive(self, sink, timeout_s: float) -> int | None:
        """Wait up to timeout_s for a version newer than the last one received; deliver it and
        return its version, or None if none came. Raises WeightSyncError naming the sender
        when a transfer that began does not finish."""


class PollingReceiver(WeightReceiver):
    """Receives from a channel that is polled (LocalWeightChannel, the Ray object store)."""

    def __init__(self, channel: PolledChannel, poll_s: float = 0.05):
        self.channel, self.poll_s, self.version = channel, poll_s, 0

    def receive(self, sink, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while (update := self.channel.poll(self.version)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_s)
        version, tensors = update
        deliver(sink, version, tensors)
        self.version = version
        return version


def deliver(sink, version: int, tensors: dict) -> None:
    """Write a whole version held in memory (name -> tensor or array) into a sink: checked
    whole first (a version that does not fit is refused before anything of it is written),
    then begin, every tensor, commit; abort if a write fails, so nothing half-written is served."""
    tensors = {name: _as_tensor(value) for name, value in tensors.items()}
    sink.check_version(version, tensors)   # cheap here, and the same error for every sink
    sink.begin(version)
    try:
        for name, tensor in tensors.items():
            sink.write(name, tensor)
    except BaseException:
        sink.abort()
        raise
    sink.commit(version)


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # arrays from the object store are read-only; receivers only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(value))

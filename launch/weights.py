"""The weight channel over Ray's object store (CPU actors, or any actors without NCCL).

The learner puts the tensors (torch, in the learner's dtype) into the object store once per
version; a small store actor holds the reference to the newest; actors ask it for the version
(cheap) and fetch the tensors only when they are newer. Every Ray call has a deadline.
"""
from __future__ import annotations

import ray

from common.weights import PolledChannel, WeightSyncError


class WeightStore:
    """Holds the newest (version, [object ref]); run as a Ray actor."""

    def __init__(self):
        self.version, self.refs = 0, None

    def publish(self, version: int, refs: list) -> int:
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        self.version, self.refs = version, refs
        return version

    def latest(self, have: int):
        return (self.version, self.refs) if self.version > have else None


class RayWeightChannel(PolledChannel):
    def __init__(self, store, timeout_s: float = 120.0):
        self.store, self.timeout_s = store, timeout_s

    def _get(self, ref, what: str):
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"weight store did not answer {what} within {self.timeout_s}s") from None
        except ray.exceptions.RayError as e:
            raise WeightSyncError(f"weight store failed on {what}: {e}") from None

    def send(self, version: int, tensors: dict) -> None:
        ref = ray.put(tensors)
        self._get(self.store.publish.remote(version, [ref]), f"publish of version {version}")

    def poll(self, have: int):
        latest = self._get(self.store.latest.remote(have), "latest")
        if latest is None:
            return None
        version, refs = latest
        return version, self._get(refs[0], f"the weights of version {version}")

"""A rollout actor: one engine, generating groups continuously into the buffer.

It never waits for the learner: between batches it takes the newest published weights if
there are any, and goes on. Plain Python; launch/ runs it as a Ray actor.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from actors.hf_engine import HFEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from buffer.client import BufferClient
from common.config import check
from common.weights import WeightChannel
from envs import registry

ENGINES = ("hf",)


@dataclass
class ActorsConfig:
    count: int = 1
    """Actor groups, each with its own engine (--actors)."""
    engine: str = "hf"
    """Inference engine: hf (transformers, CPU or GPU)."""
    groups_per_batch: int = 2
    """Tasks generated together in one engine call (each with group_size completions)."""
    gpus: float = 0.0
    """GPUs per actor; 0 runs the engine on CPU."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each actor."""
    torch_threads: int = 1
    """Torch intra-op threads of each actor process (CPU engines)."""
    batches_per_version: int = 0
    """0: never wait for the learner (asynchronous). N > 0: after N batches on one weight
    version, wait for the next version (the synchronous baseline sets this)."""
    max_buffered_groups: int = 0
    """Back-pressure: when the buffer holds this many groups, wait for the learner to take some
    before generating more (frees the CPU or GPU for the learner). 0: never wait."""
    wait_timeout_s: float = 1800.0
    """With batches_per_version > 0: how long an actor waits for new weights before failing."""

    def validate(self):
        check(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        check(self.engine in ENGINES, "engine", f"must be one of {ENGINES}, got {self.engine!r}")
        check(self.groups_per_batch >= 1, "groups_per_batch", "must be >= 1")
        check(self.gpus >= 0, "gpus", "must be >= 0")
        check(self.torch_threads >= 1, "torch_threads", "must be >= 1")
        check(self.batches_per_version >= 0, "batches_per_version", "must be >= 0")
        check(self.max_buffered_groups >= 0, "max_buffered_groups", "must be >= 0")


class RolloutActor:
    def __init__(self, actor_id: int, model_path: str, dtype: str, actors: ActorsConfig,
                 rollout: RolloutConfig, env: registry.EnvConfig, buffer_address: str,
                 buffer_timeout_s: float, weights: WeightChannel, seed: int = 0):
        torch.set_num_threads(actors.torch_threads)
        self.actor_id, self.config, self.weights = actor_id, actors, weights
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        device = "cuda" if actors.gpus > 0 and torch.cuda.is_available() else "cpu"
        self.engine = HFEngine(model_path, dtype=dtype, device=device, stop_token_ids=[tokenizer.eos_token_id],
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                               seed=seed * 1000 + actor_id)
        self.runner = EpisodeRunner(self.engine, tokenizer, lambda: registry.make(env), rollout)
        self.task_source = registry.make(env)
        self.rng = random.Random(seed * 1000 + actor_id)
        self.buffer = BufferClient(buffer_address, timeout_s=buffer_timeout_s)
        self._stop = threading.Event()
        self.groups = self.batches = 0
        self.weight_load_s = self.backpressure_s = 0.0
        self.started = time.monotonic()

    def run(self, max_batches: int | None = None) -> dict:
        """Generate and insert until stop() or max_batches; returns stats()."""
        on_version = 0  # batches generated with the weights in hand
        while not self._stop.is_set() and (max_batches is None or self.batches < max_batches):
            if self.sync_weights():
                on_version = 0
            if self.config.batches_per_version and on_version >= self.config.batches_per_version:
                self.wait_for_weights()
                on_version = 0
                continue
            tasks = [self.task_source.sample(self.rng) for _ in range(self.config.groups_per_batch)]
            groups = self.runner.run(tasks, actor_id=self.actor_id)
            size = self.buffer.insert(*groups)["size"]
            self.groups += len(groups)
            if self.config.max_buffered_groups and size >= self.config.max_buffered_groups:
                self.wait_for_room()
            self.batches += 1
            on_version += 1
        return self.stats()

    def wait_for_room(self) -> None:
        """Block until the buffer holds fewer than max_buffered_groups (or stop() is called)."""
        t, deadline = time.monotonic(), time.monotonic() + self.config.wait_timeout_s
        while not self._stop.wait(0.05):
            if self.buffer.stats()["size"] < self.config.max_buffered_groups:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {self.actor_id} waited {self.config.wait_timeout_s}s for the buffer "
                                   f"to drain below {self.config.max_buffered_groups} groups; is the learner alive?")
        self.backpressure_s += time.monotonic() - t

    def wait_for_weights(self) -> None:
        """Block until a newer version is published and loaded (or stop() is called)."""
        deadline = time.monotonic() + self.config.wait_timeout_s
        while not self._stop.wait(0.05):
            if self.sync_weights():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {self.actor_id} waited {self.config.wait_timeout_s}s for weights "
                                   f"newer than version {self.engine.version}; is the learner alive?")

    def sync_weights(self) -> bool:
        update = self.weights.poll(self.engine.version)
        if update is None:
            return False
        t = time.monotonic()
        self.engine.load_weights(update[1], update[0])
        self.weight_load_s += time.monotonic() - t
        return True

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return {"actor_id": self.actor_id, "version": self.engine.version, "groups": self.groups,
                "generated_tokens": self.runner.generated_tokens, "generate_s": self.runner.generate_s,
                "env_s": self.runner.env_s, "weight_load_s": self.weight_load_s,
                "backpressure_s": self.backpressure_s,
                "uptime_s": time.monotonic() - self.started}

"""Held-out evaluation: a fixed set of tasks the policy never trains on, played on the
weights an actor serves, so a run's accuracy can be followed while it trains.

The held-out set is drawn from the environment with its own seed (`eval.seed`): the first
`eval.tasks` distinct tasks. Training draws skip them (TrainingTasks), so the set is held
out, not only fixed. Tasks are told apart by their `id`, or by their whole content when they
have none. `python -m launch.evaluate` scores a saved model on the same set.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from common.config import check

MAX_DRAWS = 1000  # draws per training task before the environment counts as all held out


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate the served weights on the held-out tasks every this many learner steps, and
    before the first and after the last; 0 never evaluates (the tasks are still held out)."""
    tasks: int = 64
    """Held-out tasks, each played once per evaluation; 0 holds none out."""
    seed: int = 1234
    """Seed of the held-out draw (the same set for every run and model with this seed)."""
    temperature: float = 0.0
    """Sampling temperature of evaluation episodes; 0 is greedy."""
    timeout_s: float = 600.0
    """Deadline of one evaluation, from its request to its result."""

    def validate(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.tasks >= 0, "tasks", f"must be >= 0, got {self.tasks}")
        check(self.tasks > 0 or self.every == 0, "tasks", "must be > 0 when eval.every > 0")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.timeout_s > 0, "timeout_s", "must be > 0")


def task_key(task: dict) -> str:
    if "id" in task:
        return str(task["id"])
    return json.dumps(task, sort_keys=True, default=str)


def held_out_tasks(source, config: EvalConfig) -> list:
    """The first `config.tasks` distinct tasks `source.sample` draws with `config.seed` (fewer
    when the environment has fewer)."""
    rng, tasks, seen = random.Random(config.seed), [], set()
    for _ in range(max(config.tasks * 20, 100) if config.tasks else 0):
        task = source.sample(rng)
        key = task_key(task)
        if key not in seen:
            seen.add(key)
            tasks.append(task)
            if len(tasks) == config.tasks:
                break
    return tasks


class TrainingTasks:
    """Training draws from an environment, the held-out tasks skipped."""

    def __init__(self, source, held_out: list):
        self.source = source
        self.held_out = {task_key(t) for t in held_out}

    def sample(self, rng: random.Random) -> dict:
        for _ in range(MAX_DRAWS):
            task = self.source.sample(rng)
            if task_key(task) not in self.held_out:
                return task
        raise RuntimeError(f"{MAX_DRAWS} draws in a row from the environment were all held-out tasks: its "
                           f"tasks are (nearly) all among the {len(self.held_out)} of eval.tasks; lower eval.tasks")


async def play(runner, tasks: list, temperature: float, max_new_tokens: int) -> dict:
    """Play every task once (all concurrently) on `runner`'s engine; the mean reward (errors
    score 0) and the weight versions that generated the episodes."""
    import asyncio

    t = time.monotonic()
    episodes = await asyncio.gather(*(runner.episode(task, temperature=temperature, max_new_tokens=max_new_tokens,
                                                     training=False) for task in tasks))
    versions = [v for e in episodes for v in e.versions if v >= 0]
    rewards = [sum(e.turn_rewards) if not e.error else 0.0 for e in episodes]
    return {"eval/reward": sum(rewards) / max(len(rewards), 1), "eval/tasks": len(tasks),
            "eval/errors": sum(bool(e.error) for e in episodes),
            "eval/version_first": min(versions, default=-1), "eval/version_last": max(versions, default=-1),
            "eval/generated_tokens": len(versions), "eval/s": round(time.monotonic() - t, 3)}

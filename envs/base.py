"""The environment interface the rollout loop drives.

Messages are chat dicts {"role": ..., "content": ...}. One Environment instance runs one
episode at a time: `reset(task)` opens it and returns the opening messages; each
`step(messages)` receives the whole conversation so far (its last message is the policy's
reply) and returns the environment's answer. `sample(rng)` draws a new task; the rollout
loop resets G instances with the same task to make one GRPO group.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class StepResult:
    observation: list = field(default_factory=list)  # messages to append (empty when done)
    reward: float = 0.0                              # reward of this turn
    done: bool = True
    info: dict = field(default_factory=dict)


class Environment(ABC):
    @abstractmethod
    def sample(self, rng: random.Random) -> dict:
        """A new task: any msgpack-able map, e.g. {"id": ..., "question": ..., "answer": ...}."""

    @abstractmethod
    def reset(self, task: dict) -> list:
        """Open an episode on `task`; return the opening messages (at least one)."""

    @abstractmethod
    def step(self, messages: list) -> StepResult:
        """React to the conversation, whose last message is the policy's reply."""


def last_reply(messages: list) -> str:
    """The content of the last message, which the rollout loop guarantees is the policy's."""
    return str(messages[-1]["content"]) if messages else ""

"""A trivial task for smoke runs with a tiny model: prompts are random words w0..w{n-1};
the reward is the share of words in the reply equal to one chosen word."""
from __future__ import annotations

import random

from envs.base import Environment, StepResult, last_reply


class TokenMatchEnv(Environment):
    def __init__(self, words: int = 16, target: str = "w3", min_prompt: int = 3, max_prompt: int = 8):
        if target not in {f"w{i}" for i in range(words)}:
            raise ValueError(f"target {target!r} is not one of w0..w{words - 1}")
        self.words, self.target = words, target
        self.min_prompt, self.max_prompt = min_prompt, max_prompt

    def sample(self, rng: random.Random) -> dict:
        n = rng.randint(self.min_prompt, self.max_prompt)
        text = " ".join(f"w{rng.randrange(self.words)}" for _ in range(n))
        return {"id": text, "prompt": text}

    def reset(self, task: dict) -> list:
        return [{"role": "user", "content": task["prompt"]}]

    def step(self, messages: list) -> StepResult:
        reply = last_reply(messages).split()
        share = sum(w == self.target for w in reply) / len(reply) if reply else 0.0
        return StepResult(reward=share, done=True)

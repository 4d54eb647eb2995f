"""Arithmetic with verifiable answers: "What is 23 + 45?", reward 1 if the reply's last
integer is the answer."""
from __future__ import annotations

import random
import re

from envs.base import Environment, StepResult, last_reply

_INTEGER = re.compile(r"-?\d[\d,]*")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


class ArithmeticEnv(Environment):
    def __init__(self, min_value: int = 1, max_value: int = 50, ops: str = "+",
                 template: str = "What is {a} {op} {b}? Reply with only the number.",
                 system_prompt: str = ""):
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"ops must be a string of {''.join(_OPS)}, got {ops!r}")
        if min_value > max_value:
            raise ValueError(f"min_value {min_value} > max_value {max_value}")
        self.min_value, self.max_value, self.ops = min_value, max_value, ops
        self.template, self.system_prompt = template, system_prompt
        self.answer: int | None = None

    def sample(self, rng: random.Random) -> dict:
        a, b = rng.randint(self.min_value, self.max_value), rng.randint(self.min_value, self.max_value)
        op = rng.choice(self.ops)
        return {"id": f"{a}{op}{b}", "question": self.template.format(a=a, op=op, b=b),
                "answer": _OPS[op](a, b)}

    def reset(self, task: dict) -> list:
        self.answer = int(task["answer"])
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": task["question"]}]

    def step(self, messages: list) -> StepResult:
        given = last_integer(last_reply(messages))
        correct = given is not None and given == self.answer
        return StepResult(reward=1.0 if correct else 0.0, done=True,
                          info={"given": given, "answer": self.answer})

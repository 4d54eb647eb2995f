"""Arithmetic with verifiable answers: "What is 23 + 45?", reward 1 if the reply's answer is
right. The answer is the first integer of the reply once an echo of the question ("23 + 45")
is removed, so "23 + 45 = 68" and "The answer is 68." both count, and listing numbers does not."""
from __future__ import annotations

import random
import re

from envs.base import Environment, StepResult, last_reply

_INTEGER = re.compile(r"-?\d[\d,]*")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def given_answer(text: str, a: int, op: str, b: int) -> int | None:
    echo = re.compile(rf"(?<!\d){a}\s*{re.escape(op)}\s*{b}(?!\d)")
    found = _INTEGER.findall(echo.sub(" ", text))
    return int(found[0].replace(",", "")) if found else None


class ArithmeticEnv(Environment):
    def __init__(self, min_value: int = 1, max_value: int = 20, ops: str = "+",
                 template: str = "What is {a} {op} {b}? Reply with only the number.",
                 system_prompt: str = "Answer with only the number."):
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"ops must be a string of {''.join(_OPS)}, got {ops!r}")
        if min_value > max_value:
            raise ValueError(f"min_value {min_value} > max_value {max_value}")
        self.min_value, self.max_value, self.ops = min_value, max_value, ops
        self.template, self.system_prompt = template, system_prompt
        self.task: dict = {}

    def sample(self, rng: random.Random) -> dict:
        a, b = rng.randint(self.min_value, self.max_value), rng.randint(self.min_value, self.max_value)
        op = rng.choice(self.ops)
        return {"id": f"{a}{op}{b}", "question": self.template.format(a=a, op=op, b=b),
                "a": a, "op": op, "b": b, "answer": _OPS[op](a, b)}

    def reset(self, task: dict) -> list:
        self.task = task
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": task["question"]}]

    def step(self, messages: list) -> StepResult:
        t = self.task
        given = given_answer(last_reply(messages), t["a"], t["op"], t["b"])
        correct = given is not None and given == t["answer"]
        return StepResult(reward=1.0 if correct else 0.0, done=True, info={"given": given, "answer": t["answer"]})

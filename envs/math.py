"""Math with verifiable answers (env name `math`): questions from a JSONL file, a Hugging Face
dataset, or the procedural arithmetic generator, scored by `is_correct`.

`is_correct(response, answer)` reads the response's final answer and compares it with the
reference by value:
  - the final answer is the last \\boxed{...} (nested braces kept), else the text after the
    last "answer:" or "answer is" ("the final answer is"), up to the end of its sentence,
    else the last number of the response;
  - it is cleaned of LaTeX spacing and delimiters ($, \\(, \\), \\left, \\right, \\!, \\,),
    \\text{...}, units and trailing punctuation; thousands separators (1,234) are read;
  - numbers compare by value: integers, decimals, fractions (3/4, \\frac{3}{4}, \\dfrac,
    \\tfrac), signs (including the Unicode minus), percent signs; anything else compares as
    cleaned text;
  - no credit for several candidates (two different boxed answers, or "3 or 4" where one
    number is wanted) or for a right number inside a wrong answer ("15" for 5, "5x" for 5).
"""
from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

from envs.arithmetic import ArithmeticEnv
from envs.base import Environment, StepResult, last_reply

_PHRASE = re.compile(r"answer\s*(?:is\b|:|=)", re.IGNORECASE)  # "answer:", "the (final) answer is"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_UNITS = re.compile(r"(?<=\d)\s*(?:percent|cm|mm|km|m|kg|g|s|sec|seconds|minutes|hours|days|"
                    r"dollars|cents|units|degrees|°|inches|feet|miles|meters|people|apples)\b\.?", re.IGNORECASE)


def boxed(text: str) -> list:
    """The contents of every \\boxed{...} (or \\fbox{...}) in text, nested braces kept."""
    out, i = [], 0
    while True:
        m = re.compile(r"\\(?:boxed|fbox)\s*\{").search(text, i)
        if m is None:
            return out
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return out  # unclosed: not an answer
        out.append(text[m.end():j - 1])
        i = j


def final_answer(response: str) -> str | None:
    """The response's final answer, uncleaned; None when it has none. Several different
    boxed answers come back joined by " or " (and so score as several candidates)."""
    boxes = boxed(response)
    if boxes:
        distinct = list(dict.fromkeys(clean(b) for b in boxes))
        return boxes[-1] if len(distinct) == 1 else " or ".join(distinct)
    phrases = list(_PHRASE.finditer(response))
    if phrases:
        rest = response[phrases[-1].end():]
        end = re.search(r"(?<!\d)\.(?!\d)|\n", rest)  # a sentence's end, not a decimal point
        return (rest[:end.start()] if end else rest).strip(" :*")
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def clean(text: str) -> str:
    t = text.strip()
    t = re.sub(r"\\text\s*\{([^{}]*)\}", r" \1 ", t)
    t = re.sub(r"\\(?:left|right)\b", "", t)
    t = re.sub(r"\\[,;:! ]|~", " ", t)
    t = t.replace("$", "").replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    t = t.replace("\u2212", "-").replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*")
    t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", t)
    t = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"\1/\2", t)  # \frac12
    t = re.sub(r"(?<=\d)\s*%", "", t)
    t = _UNITS.sub("", t)
    t = t.strip().rstrip(".,;!?").strip()
    t = re.sub(r"^(?:x|y|n|k)\s*=\s*", "", t)  # "x = 5"
    t = re.sub(r"\s+", " ", t)
    while len(t) >= 2 and (t[0], t[-1]) in (("{", "}"), ("(", ")")) and _balanced(t[1:-1]):
        t = t[1:-1].strip()  # {x} and (x) are x
    return t


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"{": 1, "(": 1, "}": -1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def value(text: str) -> Fraction | None:
    """The number a cleaned answer states, exactly; None if it is not one number."""
    t = text.replace(" ", "")
    t = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", t)      # (3)/(4) from \frac
    t = re.sub(r"^-\(([\d.]+)\)/\(([\d.]+)\)$", r"-\1/\2", t)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:/([-+]?(?:\d+(?:\.\d*)?|\.\d+)))?", t)
    if m is None:
        return None
    try:
        number = Fraction(m.group(1))
        if m.group(2) is not None:
            number /= Fraction(m.group(2))
        return number
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(response: str, answer: str) -> bool:
    """Whether `response` ends with the reference `answer` (see the module's docstring)."""
    given = final_answer(str(response))
    if given is None:
        return False
    given, reference = clean(given), clean(str(answer))
    want = value(reference)
    if want is not None:
        got = value(given)
        return got is not None and got == want
    return given.replace(" ", "").lower() == reference.replace(" ", "").lower()


class MathEnv(Environment):
    """Questions with reference answers; reward 1 when `is_correct`, else 0."""

    def __init__(self, source: str = "arithmetic", question_field: str = "question", answer_field: str = "answer",
                 split: str = "train", template: str = "{question}\nGive your final answer as \\boxed{{ANSWER}}.",
                 system_prompt: str = "", min_value: int = 1, max_value: int = 99, ops: str = "+-*"):
        """`source`: "arithmetic" (procedural, min_value..max_value with ops), a .jsonl file
        (one object per line with question_field and answer_field), or hf:NAME[:CONFIG] (a
        Hugging Face dataset's `split`, when `datasets` is installed and the Hub reachable)."""
        self.template, self.system_prompt = template, system_prompt
        self.fields = (question_field, answer_field)
        self.generator = None
        if source == "arithmetic":
            self.generator = ArithmeticEnv(min_value, max_value, ops)
            self.items = []
        elif source.startswith("hf:"):
            self.items = _hf_items(source[3:], split, question_field, answer_field)
        else:
            self.items = _jsonl_items(Path(source), question_field, answer_field)
        self.task: dict = {}

    def sample(self, rng: random.Random) -> dict:
        if self.generator is not None:
            t = self.generator.sample(rng)
            return {"id": t["id"], "question": f"What is {t['a']} {t['op']} {t['b']}?", "answer": str(t["answer"])}
        i = rng.randrange(len(self.items))
        question, answer = self.items[i]
        return {"id": str(i), "question": question, "answer": answer}

    def reset(self, task: dict) -> list:
        self.task = task
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": self.template.replace("{question}", task["question"])}]

    def step(self, messages: list) -> StepResult:
        correct = is_correct(last_reply(messages), self.task["answer"])
        return StepResult(reward=float(correct), done=True, info={"answer": self.task["answer"]})


def _jsonl_items(path: Path, question_field: str, answer_field: str) -> list:
    if not path.is_file():
        raise ValueError(f"source {str(path)!r} is neither 'arithmetic', hf:NAME nor a JSONL file")
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append((str(row[question_field]), str(row[answer_field])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object with {question_field!r} and {answer_field!r} "
                                 f"({type(e).__name__}: {e})") from None
    if not items:
        raise ValueError(f"{path} holds no questions")
    return items


def _hf_items(name: str, split: str, question_field: str, answer_field: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ValueError("source hf:... needs the `datasets` package (pip install datasets)") from None
    dataset, _, config = name.partition(":")
    rows = datasets.load_dataset(dataset, config or None, split=split)
    return [(str(r[question_field]), str(r[answer_field])) for r in rows]

"""A multi-turn word game with feedback every turn (env name `wordle`).

The environment picks a secret word; the policy guesses, and after each guess the environment
answers with the feedback: one mark per letter, G (right letter, right place), Y (in the word,
elsewhere) or . (not in the word, or not that many times), and the guesses left. Reward: 1 for
guessing the word within `max_guesses` (optionally less a `turn_cost` per guess), plus, with
`progress_reward` > 0, that much per letter newly placed right on each turn. A reply that is
not a word of the right length costs a guess and is told so. The guess is the last word of
the reply of `length` letters, so "My guess: crane" counts.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from envs.base import Environment, StepResult, last_reply

WORDS = ("crane slate trace crate react cater stare tears rates aster least steal tales stale "
         "plant plane plate panel lapse leaps pleat petal metal medal model modal moral coral "
         "carol royal loyal alloy ghost hosts shoot shout south mouth month youth truth").split()


def feedback(guess: str, secret: str) -> str:
    """G/Y/. per letter of `guess` against `secret` (repeated letters counted as Wordle does)."""
    marks = ["."] * len(guess)
    left = Counter(s for g, s in zip(guess, secret) if g != s)
    for i, (g, s) in enumerate(zip(guess, secret)):
        if g == s:
            marks[i] = "G"
        elif left[g] > 0:
            marks[i] = "Y"
            left[g] -= 1
    return "".join(marks)


class WordleEnv(Environment):
    def __init__(self, length: int = 5, max_guesses: int = 6, words: list | None = None,
                 progress_reward: float = 0.0, turn_cost: float = 0.0):
        self.words = [w.lower() for w in (words or WORDS) if len(w) == length and w.isalpha()]
        if not self.words:
            raise ValueError(f"no words of {length} letters to play with")
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be >= 1, got {max_guesses}")
        self.length, self.max_guesses = length, max_guesses
        self.progress_reward, self.turn_cost = progress_reward, turn_cost
        self._pattern = re.compile(rf"\b[a-zA-Z]{{{length}}}\b")
        self.secret, self.guesses, self.placed = "", 0, set()

    def sample(self, rng: random.Random) -> dict:
        word = rng.choice(self.words)
        return {"id": word, "secret": word}

    def reset(self, task: dict) -> list:
        self.secret, self.guesses, self.placed = task["secret"], 0, set()
        return [{"role": "user", "content":
                 f"Let's play a word game. Guess my secret {self.length}-letter word; you have "
                 f"{self.max_guesses} guesses. After each guess I mark every letter: G = right letter "
                 f"in the right place, Y = in the word but elsewhere, . = not in the word. "
                 f"Reply with your guess."}]

    def step(self, messages: list) -> StepResult:
        self.guesses += 1
        left = self.max_guesses - self.guesses
        found = self._pattern.findall(last_reply(messages))
        if not found:
            reply = f"That is not a {self.length}-letter word. {left} guesses left."
            return StepResult([{"role": "user", "content": reply}], -self.turn_cost, done=left == 0,
                              info={"valid": False})
        guess = found[-1].lower()
        marks = feedback(guess, self.secret)
        newly = {i for i, m in enumerate(marks) if m == "G"} - self.placed
        self.placed |= newly
        reward = self.progress_reward * len(newly) - self.turn_cost
        if guess == self.secret:
            return StepResult([], reward + 1.0, done=True, info={"solved": True, "guesses": self.guesses})
        if left == 0:
            return StepResult([], reward, done=True, info={"solved": False, "secret": self.secret})
        return StepResult([{"role": "user", "content": f"{guess.upper()}: {marks}. {left} guesses left."}], reward,
                          done=False, info={"marks": marks})

"""The inference engine interface: the rollout loop drives any engine through it.

Tokens in, tokens out: prompts and samples are token ids, so the rollout loop owns the
tokenizer and the engine never re-tokenizes. `version` is the policy version of the weights
the engine serves (0 = the initial weights; +1 per learner publication).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class Sample:
    tokens: list          # generated token ids, the stop token included when one was sampled
    logprobs: list        # log-prob of each generated token under the sampling distribution
    finish_reason: str    # "stop" (a stop token) or "length" (max_new_tokens reached)


class Engine(ABC):
    version: int = 0

    @abstractmethod
    def generate(self, prompts: list, max_new_tokens: int, temperature: float) -> list:
        """Sample one continuation per prompt (a list of token ids) at `temperature`, with no
        top-k/top-p truncation, so that the log-probs are those of the behaviour policy.
        Returns one Sample per prompt, in order."""

    @abstractmethod
    def load_weights(self, weights: dict, version: int) -> None:
        """Replace the weights with `weights` (parameter name -> array, Hugging Face names)
        and serve them as `version` from the next generate call on."""

"""A scripted engine: the policy is a Python function of the conversation so far.

`ScriptedEngine(tokenizer, reply)` answers each request with `reply(text)`, where text is the
decoded prompt (the chat template's rendering of the conversation), tokenized and ended with
the tokenizer's end-of-sequence token. Useful for a scripted baseline or solver that plays an
environment through the real rollout loop (tests do), and to time the loop without an
engine's compute (bench/rollout_overhead.py). Log-probs are a constant; the version is 0.
"""
from __future__ import annotations

from actors.engine import Engine, Sample


class ScriptedEngine(Engine):
    def __init__(self, tokenizer, reply, logprob: float = -0.1):
        self.tokenizer, self.reply, self.logprob = tokenizer, reply, logprob
        self._cache: dict = {}

    @property
    def version(self) -> int:
        return 0

    async def generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        text = self.reply(self.tokenizer.decode(prompt))
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + \
                [self.tokenizer.eos_token_id]
            if len(self._cache) > 4096:
                self._cache.clear()
        tokens = tokens[:max_new_tokens]
        finish = "stop" if tokens and tokens[-1] == self.tokenizer.eos_token_id else "length"
        return Sample(list(tokens), [self.logprob] * len(tokens), [0] * len(tokens), finish)

    def start_weight_updates(self, receiver) -> None:
        pass  # a script has no weights

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"weight_swaps": 0}

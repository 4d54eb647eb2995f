"""The rollout loop: runs G episodes per task against an engine and environments, and packs
each task's episodes into a RolloutGroup.

Every episode's token row is built as it happens: the prompt (loss mask 0), each policy turn
(mask 1, with the behaviour log-probs the engine reported) and each environment reply
(mask 0). A crashing or hanging environment ends that episode with `error` set and no further
reward; the other episodes, and the run, go on.
"""
from __future__ import annotations

import concurrent.futures as futures
import math
import time
from dataclasses import dataclass, field

from actors.engine import Engine
from common.config import check
from common.rollout import RolloutGroup
from envs.base import Environment, StepResult


@dataclass
class RolloutConfig:
    group_size: int = 8
    """Completions per prompt (G); GRPO normalises rewards within a group."""
    max_new_tokens: int = 32
    """Tokens the policy may generate in one turn."""
    temperature: float = 1.0
    """Sampling temperature; the learner scores tokens at the same temperature."""
    max_turns: int = 1
    """Policy turns per episode; an environment may end an episode earlier."""
    max_seq_len: int = 2048
    """An episode whose row grows past this many tokens is ended with an error."""
    env_timeout_s: float = 30.0
    """Deadline of one reset or step of an environment."""

    def validate(self):
        check(self.group_size >= 2, "group_size", f"GRPO needs >= 2 completions per prompt, got {self.group_size}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.max_turns >= 1, "max_turns", f"must be >= 1, got {self.max_turns}")
        check(self.env_timeout_s > 0, "env_timeout_s", "must be > 0")


class ChatRenderer:
    """Turns messages into token ids with the tokenizer's chat template, or plain lines when
    the tokenizer has none (tiny test tokenizers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, messages: list, add_generation_prompt: bool) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        return "".join(m["content"] + "\n" for m in messages)

    def encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list) -> list:
        return self.encode(self.text(messages, add_generation_prompt=True))

    def reply(self, history: list, observation: list) -> list:
        """Tokens of an environment reply appended to `history`, up to the next policy turn.
        The sampled tokens stay as sampled; only the new text is encoded (template markup
        that follows a policy turn's stop token, such as a newline, is part of this text)."""
        before = self.text(history, add_generation_prompt=False)
        after = self.text(history + observation, add_generation_prompt=True)
        new = after[len(before):] if after.startswith(before) else self.text(observation, True)
        return self.encode(new)

    def decode(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class _Episode:
    task_index: int
    env: Environment
    messages: list
    tokens: list
    loss_mask: list
    logprobs: list
    turn_rewards: list = field(default_factory=list)
    error: str = ""
    version_first: int = -1
    version_last: int = -1
    done: bool = False


class EpisodeRunner:
    def __init__(self, engine: Engine, tokenizer, make_env, config: RolloutConfig):
        self.engine, self.make_env, self.config = engine, make_env, config
        self.renderer = ChatRenderer(tokenizer)
        # Environments run in threads so a hanging one can be abandoned at its deadline.
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="env")
        self.generate_s = self.env_s = 0.0
        self.generated_tokens = 0

    def _guarded(self, fn, *args):
        """Run an environment call with a deadline; returns (result, error)."""
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=self.config.env_timeout_s), ""
        except futures.TimeoutError:
            return None, f"environment {fn.__qualname__} timed out after {self.config.env_timeout_s}s"
        except Exception as e:  # the environment's own failure ends its episode, not the run
            return None, f"environment {fn.__qualname__} raised {type(e).__name__}: {e}"

    def _open(self, task_index: int, task: dict) -> _Episode:
        env = self.make_env()
        messages, error = self._guarded(env.reset, task)
        if not error and not (isinstance(messages, list) and messages):
            error = f"environment reset returned {messages!r}, not a non-empty list of messages"
        tokens = self.renderer.prompt(messages) if not error else []
        return _Episode(task_index, env, list(messages or []), tokens, [0] * len(tokens),
                        [0.0] * len(tokens), error=error, done=bool(error))

    def run(self, tasks: list, actor_id: int = 0) -> list:
        """Run G episodes for each task; returns one RolloutGroup per task, in order."""
        t0 = time.monotonic()
        episodes = [self._open(i, task) for i, task in enumerate(tasks) for _ in range(self.config.group_size)]
        env_s, generate_s = time.monotonic() - t0, 0.0
        for turn in range(self.config.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            t = time.monotonic()
            samples = self.engine.generate([e.tokens for e in active], self.config.max_new_tokens,
                                           self.config.temperature)
            version = self.engine.version
            generate_s += time.monotonic() - t
            t = time.monotonic()
            for e, s in zip(active, samples):
                self._advance(e, s, version, last_turn=turn == self.config.max_turns - 1)
            env_s += time.monotonic() - t
        self.generate_s += generate_s
        self.env_s += env_s
        groups = []
        for i, task in enumerate(tasks):
            mine = [e for e in episodes if e.task_index == i]
            rows = [{"tokens": e.tokens, "loss_mask": e.loss_mask, "behaviour_logprobs": e.logprobs,
                     "reward": sum(e.turn_rewards), "turn_rewards": e.turn_rewards, "error": e.error,
                     "version_first": max(e.version_first, 0), "version_last": max(e.version_last, 0)}
                    for e in mine]
            groups.append(RolloutGroup.from_rows(
                rows, prompt_id=str(task.get("id", "")), actor_id=actor_id,
                temperature=self.config.temperature,
                timings={"generate_s": generate_s, "env_s": env_s}))
        return groups

    def _advance(self, e: _Episode, sample, version: int, last_turn: bool) -> None:
        e.tokens += sample.tokens
        e.loss_mask += [1] * len(sample.tokens)
        e.logprobs += sample.logprobs
        self.generated_tokens += len(sample.tokens)
        e.version_first = version if e.version_first < 0 else e.version_first
        e.version_last = version
        e.messages.append({"role": "assistant", "content": self.renderer.decode(sample.tokens)})
        result, e.error = self._guarded(e.env.step, e.messages)
        if not e.error and not isinstance(result, StepResult):
            e.error = f"environment step returned {type(result).__name__}, not StepResult"
        elif not e.error and not math.isfinite(float(result.reward)):
            e.error = f"environment step returned a non-finite reward {result.reward!r}"
        if e.error:
            e.done = True
            return
        e.turn_rewards.append(float(result.reward))
        e.done = result.done or last_turn
        if not e.done:
            reply = self.renderer.reply(e.messages, list(result.observation))
            e.messages += list(result.observation)
            e.tokens += reply
            e.loss_mask += [0] * len(reply)
            e.logprobs += [0.0] * len(reply)
            if len(e.tokens) > self.config.max_seq_len:
                e.error, e.done = f"episode exceeded max_seq_len={self.config.max_seq_len}", True

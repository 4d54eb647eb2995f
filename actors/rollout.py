"""The rollout loop: every episode is its own coroutine; a task's G episodes make one group.

An episode renders its opening messages with the chat template, then alternates policy turns
(one engine request each, awaited while every other episode goes on) and environment steps
(each with a deadline, run where rollout.env_workers says: threads of the actor's process, or
worker processes that contain crashes and hangs; actors/environments.py), so a slow one never
stops the engine. Its token row is built as it happens: prompt and environment tokens with
loss mask 0, policy tokens with mask 1, their behaviour log-probs and the version of the
weights that sampled each. At every turn boundary the row equals the chat template's
rendering of the conversation, with the policy's tokens kept exactly as sampled (ChatRenderer).

An environment that crashes, hangs or answers malformed ends its episode with `error` set;
an episode past `max_episode_s` is ended and counted; the other episodes, and the run, go on.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from numbers import Real

from actors.activity import Activity
from actors.engine import Engine
from actors.environments import EnvironmentsExhausted, ThreadEnvironments  # noqa: F401 (raised from here)
from common.config import check
from common.rollout import RolloutGroup
from envs.base import StepResult


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
    max_episode_s: float = 600.0
    """An episode still running after this many seconds is ended (error set) and counted."""
    max_hung_env_calls: int = 16
    """Environment calls that may be hung past their deadline at once before the actor fails."""
    env_threads: int = 32
    """Threads that run environment calls (reset and step), started as needed: in the actor's
    process (env_workers 0), where a call hung past its deadline keeps its thread, so up to
    max_hung_env_calls more are started; else in each worker process."""
    env_workers: int = 0
    """0: environments run in the actor's process (a hung call keeps a thread; past
    max_hung_env_calls the actor fails; a native crash ends the actor). N: in N worker processes
    per actor, where an exception, a hang or a crash ends only the episodes it touches, the
    worker is replaced and the run goes on (actors/environments.py)."""

    def validate(self):
        check(self.group_size >= 2, "group_size", f"GRPO needs >= 2 completions per prompt, got {self.group_size}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.max_turns >= 1, "max_turns", f"must be >= 1, got {self.max_turns}")
        check(self.env_timeout_s > 0, "env_timeout_s", "must be > 0")
        check(self.max_episode_s > 0, "max_episode_s", "must be > 0")
        check(self.max_hung_env_calls >= 0, "max_hung_env_calls", "must be >= 0")
        check(self.env_threads >= 1, "env_threads", f"must be >= 1, got {self.env_threads}")
        check(self.env_workers >= 0, "env_workers", f"must be >= 0, got {self.env_workers}")


_SENTINEL = "\u2063asyncrl-policy-turn\u2063"


class ChatRenderer:
    """Token rows that agree with the tokenizer's chat template (plain lines when the tokenizer
    has none, as the tiny test tokenizers).

    After a policy turn, the environment's tokens are the template's text from the end of the
    policy's content to the next generation prompt: the end-of-turn markup the template puts
    after an assistant message (less the stop token when the policy sampled it), then the
    observation. So a turn that stopped on its stop token still gets the newline the template
    puts after it, and a turn cut at max_new_tokens gets its end-of-turn marker.
    """

    def __init__(self, tokenizer, stop_token_ids: list = (), cache_size: int = 1024):
        self.tokenizer = tokenizer
        self.stop_texts = {t: tokenizer.decode([t], skip_special_tokens=False) for t in stop_token_ids}
        # A group's G episodes open with the same messages: render and tokenize them once.
        self._prompts: OrderedDict = OrderedDict()
        self._cache_size = cache_size

    def text(self, messages: list, add_generation_prompt: bool) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        return "".join(m["content"] + "\n" for m in messages) if messages else ""

    def encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list) -> list:
        key = json.dumps(messages, sort_keys=True, default=str)
        tokens = self._prompts.get(key)
        if tokens is None:
            tokens = self._prompts[key] = self.encode(self.text(messages, add_generation_prompt=True))
            if len(self._prompts) > self._cache_size:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return list(tokens)

    def after_turn(self, history: list, sampled: list, observation: list) -> list:
        """Tokens that follow a policy turn's sampled tokens up to the next generation prompt.
        `history` holds the messages before the policy's turn."""
        rendered = self.text(history + [{"role": "assistant", "content": _SENTINEL}] + observation, True)
        after = rendered.split(_SENTINEL, 1)[1]
        stop_text = self.stop_texts.get(sampled[-1]) if sampled else None
        if stop_text and after.startswith(stop_text):  # the policy sampled the end-of-turn marker itself
            after = after[len(stop_text):]
        return self.encode(after)

    def decode(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class Episode:
    env: object   # the episode's environment, as environments.open() gave it
    messages: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    versions: list = field(default_factory=list)   # -1 off policy
    turn_rewards: list = field(default_factory=list)
    error: str = ""

    def extend(self, tokens: list, logprobs=None, versions=None) -> None:
        policy = logprobs is not None
        self.tokens += tokens
        self.loss_mask += [int(policy)] * len(tokens)
        self.logprobs += list(logprobs) if policy else [0.0] * len(tokens)
        self.versions += list(versions) if policy else [-1] * len(tokens)

    def row(self) -> dict:
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "behaviour_logprobs": self.logprobs,
                "token_versions": self.versions, "reward": sum(self.turn_rewards),
                "turn_rewards": self.turn_rewards, "error": self.error}


def _messages_error(value, what: str) -> str:
    """'' if value is a list of chat messages, else what is wrong with it."""
    if not isinstance(value, list):
        return f"{what} returned {type(value).__name__}, not a list of messages"
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"{what} returned {m!r}, not a message {{'role': str, 'content': str}}"
    return ""


def _step_error(result) -> str:
    """'' if an environment step's result is well formed, else what is wrong with it."""
    if not isinstance(result, StepResult):
        return f"environment step returned {type(result).__name__}, not StepResult"
    if not isinstance(result.reward, Real) or not math.isfinite(result.reward):
        return f"environment step returned the reward {result.reward!r}, not a finite number"
    return "" if result.done else _messages_error(result.observation, "environment step")


class EpisodeRunner:
    def __init__(self, engine: Engine, tokenizer, environments, config: RolloutConfig, stop_token_ids: list = ()):
        """`environments`: where environment calls run (ThreadEnvironments, ProcessEnvironments),
        or a callable that builds one environment (run on threads of this process)."""
        self.engine, self.config = engine, config
        if callable(environments) and not hasattr(environments, "call"):
            environments = ThreadEnvironments(environments, config.env_timeout_s, config.env_threads,
                                              config.max_hung_env_calls)
        self.environments = environments
        stop_token_ids = list(stop_token_ids) or [tokenizer.eos_token_id]
        self.renderer = ChatRenderer(tokenizer, stop_token_ids)
        self.generated_tokens = 0
        self.episodes = self.episodes_timed_out = self.groups_unusable = 0
        self.unusable_in_a_row, self.unusable_why = 0, ""   # the last unusable group's first episode error
        self.activity = Activity()   # where the actor's time goes (actors/activity.py)

    @property
    def env_s(self) -> float:
        return self.environments.stats()["env_s"]

    @property
    def hung_env_calls(self) -> int:
        return self.environments.stats()["hung_env_calls"]

    def stats(self) -> dict:
        """The loop's counters and those of where its environments run."""
        return {"generated_tokens": self.generated_tokens, "episodes": self.episodes,
                "episodes_timed_out": self.episodes_timed_out, "groups_unusable": self.groups_unusable,
                **self.environments.stats()}

    # -- groups and episodes ----------------------------------------------------------------
    async def group(self, task: dict, actor_id: int = 0, episode_ended=None) -> RolloutGroup | None:
        """G episodes of `task`, concurrently; None if none of them generated a token.
        `episode_ended()`, if given, is called as each episode ends, however it ends (the actor
        frees its slot: a group's episodes end at different times)."""
        t = time.monotonic()

        async def one() -> Episode:
            try:
                return await self.episode(task)
            finally:
                if episode_ended is not None:
                    episode_ended()
        episodes = await asyncio.gather(*(one() for _ in range(self.config.group_size)))
        rows = [e.row() for e in episodes]
        if not any(any(r["loss_mask"]) for r in rows):
            self.groups_unusable += 1
            self.unusable_in_a_row += 1
            self.unusable_why = next((e.error for e in episodes if e.error), "no error: the engine returned no token")
            return None
        self.unusable_in_a_row = 0
        return RolloutGroup.from_rows(rows, prompt_id=str(task.get("id", "")), actor_id=actor_id,
                                      temperature=self.config.temperature,
                                      timings={"episode_s": time.monotonic() - t})

    async def episode(self, task: dict, temperature: float | None = None, max_new_tokens: int | None = None,
                      training: bool = True) -> Episode:
        """One episode of `task`, sampled at rollout.temperature and max_new_tokens unless given
        (evaluation plays greedy); `training=False` keeps it out of the rollout counters."""
        episode = Episode(env=self.environments.open())
        self.episodes += training
        sampling = (self.config.temperature if temperature is None else temperature,
                    self.config.max_new_tokens if max_new_tokens is None else max_new_tokens, training)
        try:
            await asyncio.wait_for(self._play(episode, task, *sampling), self.config.max_episode_s)
        except asyncio.TimeoutError:
            episode.error = f"episode exceeded rollout.max_episode_s={self.config.max_episode_s}"
            self.episodes_timed_out += training
        finally:
            self.environments.close(episode.env)
        return episode

    async def _play(self, e: Episode, task: dict, temperature: float, max_new_tokens: int, training: bool) -> None:
        with self.activity.doing("environment"):
            messages, e.error = await self.environments.call(e.env, "reset", task)
        if not e.error:
            e.error = _messages_error(messages, "environment reset") or ("" if messages else
                                                                          "environment reset returned no messages")
        if e.error:
            return
        e.messages = list(messages)
        e.extend(self.renderer.prompt(e.messages))
        for turn in range(self.config.max_turns):
            with self.activity.doing("generation"):
                sample = await self.engine.generate(e.tokens, max_new_tokens, temperature)
            e.extend(sample.tokens, sample.logprobs, sample.versions)
            self.generated_tokens += len(sample.tokens) if training else 0
            history = list(e.messages)
            e.messages.append({"role": "assistant", "content": self.renderer.decode(sample.tokens)})
            with self.activity.doing("environment"):
                result, e.error = await self.environments.call(e.env, "step", e.messages)
            e.error = e.error or _step_error(result)
            if e.error:
                return
            e.turn_rewards.append(float(result.reward))
            if result.done or turn == self.config.max_turns - 1:
                return
            e.extend(self.renderer.after_turn(history, sample.tokens, list(result.observation)))
            e.messages += list(result.observation)
            if len(e.tokens) > self.config.max_seq_len:
                e.error = f"episode exceeded rollout.max_seq_len={self.config.max_seq_len}"
                return

    def run(self, tasks: list, actor_id: int = 0) -> list:
        """Run one group per task, all concurrently, and return them in order (for evaluation
        and tests; the actor drives group() itself). Unusable groups come back as None."""
        async def all_groups():
            return await asyncio.gather(*(self.group(t, actor_id) for t in tasks))
        return asyncio.run(all_groups())

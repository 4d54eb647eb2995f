"""The rollout loop: masks and log-probs per turn, and environments that crash or hang."""
import random
import time

import pytest
from transformers import AutoTokenizer

from actors.hf_engine import HFEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from envs.base import Environment, StepResult
from envs.token_match import TokenMatchEnv


class EchoGame(Environment):
    """Three turns: after each policy turn the environment answers 'w1 w2'; reward 1 per turn."""

    def sample(self, rng):
        return {"id": "g"}

    def reset(self, task):
        self.turns = 0
        return [{"role": "user", "content": "w5 w6"}]

    def step(self, messages):
        self.turns += 1
        return StepResult(observation=[{"role": "user", "content": "w1 w2"}], reward=1.0, done=self.turns == 3)


class Flaky(TokenMatchEnv):
    """Crashes, hangs or returns a NaN reward on some episodes."""
    calls = 0

    def step(self, messages):
        Flaky.calls += 1
        if Flaky.calls % 4 == 1:
            raise RuntimeError("board exploded")
        if Flaky.calls % 4 == 2:
            time.sleep(5)
        if Flaky.calls % 4 == 3:
            return StepResult(reward=float("nan"))
        return super().step(messages)


@pytest.fixture(scope="module")
def parts(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=0)
    return engine, tokenizer


def test_multi_turn_rows_mask_environment_tokens(parts):
    engine, tokenizer = parts
    runner = EpisodeRunner(engine, tokenizer, EchoGame, RolloutConfig(group_size=2, max_new_tokens=3, max_turns=3))
    group, = runner.run([{"id": "g"}], actor_id=4)
    assert group.actor_id == 4 and group.errors == ["", ""]
    assert group.turn_rewards == [[1.0, 1.0, 1.0]] * 2 and group.rewards.tolist() == [3.0, 3.0]
    for row in range(2):
        n = group.lengths[row]
        tokens, mask = group.tokens[row, :n].tolist(), group.loss_mask[row, :n].tolist()
        assert tokens[:2] == tokenizer.convert_tokens_to_ids(["w5", "w6"]) and mask[:2] == [0, 0]
        w1w2 = tokenizer.convert_tokens_to_ids(["w1", "w2"])
        env_starts = [i for i in range(n - 1) if tokens[i:i + 2] == w1w2 and mask[i:i + 2] == [0, 0]]
        assert len(env_starts) == 2  # two environment replies, between three policy turns
        policy = sum(mask)
        assert 3 <= policy <= 9 and n == 2 + policy + 4
        logprobs = group.behaviour_logprobs[row, :n]
        assert (logprobs[group.loss_mask[row, :n] == 1] < 0).all() and (logprobs[group.loss_mask[row, :n] == 0] == 0).all()


def test_a_crashing_or_hanging_environment_ends_only_its_episode(parts):
    engine, tokenizer = parts
    runner = EpisodeRunner(engine, tokenizer, lambda: Flaky(words=16, target="w3"),
                           RolloutConfig(group_size=4, max_new_tokens=4, env_timeout_s=0.5))
    t = time.monotonic()
    group, = runner.run([{"id": "x", "prompt": "w1 w2"}])
    assert time.monotonic() - t < 4.0  # the hanging step was abandoned at its deadline
    expected = ["raised RuntimeError: board exploded", "timed out after 0.5s", "non-finite reward"]
    assert group.errors.count("") == 1
    assert all(sum(words in e for e in group.errors) == 1 for words in expected)
    assert group.rewards[[i for i, e in enumerate(group.errors) if e]].tolist() == [0.0, 0.0, 0.0]


def test_tasks_make_one_group_each_with_group_size_rows(parts):
    engine, tokenizer = parts
    env = TokenMatchEnv()
    runner = EpisodeRunner(engine, tokenizer, TokenMatchEnv, RolloutConfig(group_size=3, max_new_tokens=2))
    rng = random.Random(0)
    groups = runner.run([env.sample(rng) for _ in range(2)])
    assert [g.group_size for g in groups] == [3, 3] and groups[0].id != groups[1].id
    assert runner.generated_tokens == sum(g.num_policy_tokens for g in groups)

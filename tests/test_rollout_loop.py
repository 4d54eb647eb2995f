"""The rollout loop: masks, log-probs and versions per turn, rows that agree with the chat
template, episodes that interleave, and environments that crash, hang or answer malformed."""
import asyncio
import random
import subprocess
import sys
import threading
import time

import pytest
from transformers import AutoTokenizer

from actors.engines.hf import HFEngine
from actors.rollout import EnvironmentsExhausted, EpisodeRunner, RolloutConfig
from envs.base import Environment, StepResult
from envs.token_match import TokenMatchEnv
from learner.batch import make_batch
from tests.conftest import build_chat_model


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
    expected = ["raised RuntimeError: board exploded", "timed out after 0.5s", "reward nan, not a finite number"]
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


class FailsFirstReset(TokenMatchEnv):
    """The first episode of each group fails at reset; the others play normally."""
    resets = 0

    def reset(self, task):
        FailsFirstReset.resets += 1
        if FailsFirstReset.resets % 4 == 1:
            raise RuntimeError("no board today")
        return super().reset(task)


def test_a_failed_reset_neither_drags_the_groups_version_nor_counts_as_a_zero_reward(parts, tiny_model_path):
    engine, tokenizer = parts
    from transformers import AutoModelForCausalLM
    weights = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()}
    engine.load_weights(weights, version=5)
    runner = EpisodeRunner(engine, tokenizer, lambda: FailsFirstReset(words=16, target="w3"),
                           RolloutConfig(group_size=4, max_new_tokens=4))
    group, = runner.run([{"id": "x", "prompt": "w1 w2"}])
    failed = [i for i, e in enumerate(group.errors) if "no board today" in e]
    assert len(failed) == 1 and not group.generated[failed[0]] and group.generated.sum() == 3
    assert group.version == 5 and group.version_first[failed[0]] == -1  # the empty row sets nothing
    group.rewards[:] = [0.0, 1.0, 0.0, 1.0]
    group.rewards[failed[0]] = 0.0
    advantages = make_batch([group]).advantages[:, 0]
    assert advantages[failed[0]] == 0.0
    played = [i for i in range(4) if i != failed[0]]
    assert abs(float(advantages[played].sum())) < 1e-5  # centred over the rows that played only


class Malformed(TokenMatchEnv):
    """Each episode's step answers in a different malformed way."""
    calls = 0
    answers = [StepResult(reward=None), StepResult(reward="1"), StepResult(observation="go on", done=False),
               StepResult(observation=[{"role": "user"}], done=False), "not a StepResult"]

    def step(self, messages):
        Malformed.calls += 1
        return Malformed.answers[(Malformed.calls - 1) % len(Malformed.answers)]


def test_a_malformed_environment_answer_ends_only_its_episode(parts):
    engine, tokenizer = parts
    runner = EpisodeRunner(engine, tokenizer, lambda: Malformed(words=16, target="w3"),
                           RolloutConfig(group_size=5, max_new_tokens=3, max_turns=2))
    group, = runner.run([{"id": "x", "prompt": "w1 w2"}])  # does not raise
    assert sorted(group.errors) == sorted([
        "environment step returned the reward None, not a finite number",
        "environment step returned the reward '1', not a finite number",
        "environment step returned str, not a list of messages",
        "environment step returned {'role': 'user'}, not a message {'role': str, 'content': str}",
        "environment step returned str, not StepResult"])
    assert group.rewards.tolist() == [0.0] * 5


class HangsForever(TokenMatchEnv):
    release = threading.Event()

    def step(self, messages):
        HangsForever.release.wait()
        return super().step(messages)


def test_hung_environment_calls_do_not_starve_the_others_and_too_many_fail_loudly(parts):
    engine, tokenizer = parts
    config = RolloutConfig(group_size=10, max_new_tokens=2, env_timeout_s=0.2, max_hung_env_calls=12)
    hanging = EpisodeRunner(engine, tokenizer, lambda: HangsForever(words=16, target="w3"), config)
    group, = hanging.run([{"id": "x", "prompt": "w1"}])  # 10 calls hang: more than a pool of 8 threads
    assert all("timed out" in e for e in group.errors) and hanging.hung_env_calls == 10
    healthy = EpisodeRunner(engine, tokenizer, lambda: TokenMatchEnv(words=16, target="w3"), config)
    group, = healthy.run([{"id": "y", "prompt": "w1"}])  # later calls are answered as usual
    assert group.errors == [""] * 10
    with pytest.raises(EnvironmentsExhausted, match=r"13 environment calls are hung .*max_hung_env_calls=12"):
        hanging.run([{"id": "z", "prompt": "w1"}])
    HangsForever.release.set()


def test_a_process_with_hung_environment_calls_still_exits(tiny_model_path):
    script = f"""
import threading
from transformers import AutoTokenizer
from actors.engines.hf import HFEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from tests.test_rollout_loop import HangsForever
tokenizer = AutoTokenizer.from_pretrained({tiny_model_path!r})
engine = HFEngine({tiny_model_path!r}, stop_token_ids=[2])
runner = EpisodeRunner(engine, tokenizer, lambda: HangsForever(words=16, target="w3"),
                       RolloutConfig(group_size=2, max_new_tokens=2, env_timeout_s=0.2))
runner.run([{{"id": "x", "prompt": "w1"}}])
print("done", flush=True)
"""
    t = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]
    assert time.monotonic() - t < 40


class Turns(Environment):
    """A task says how many turns its episodes take and how long each step takes."""

    def sample(self, rng):
        return {}

    def reset(self, task):
        self.task, self.turns = task, 0
        return [{"role": "user", "content": "w5"}]

    def step(self, messages):
        self.turns += 1
        time.sleep(self.task["step_s"])
        done = self.turns == self.task["turns"]
        return StepResult(observation=[] if done else [{"role": "user", "content": "w1"}], reward=1.0, done=done)


def test_episodes_interleave_and_groups_come_out_as_they_complete(parts):
    engine, tokenizer = parts
    runner = EpisodeRunner(engine, tokenizer, Turns, RolloutConfig(group_size=3, max_new_tokens=2, max_turns=4))
    finished = []

    async def scenario():
        async def play(name, task):
            group = await runner.group(task)
            finished.append((name, time.monotonic(), group))
        batches_before = engine.batches
        await asyncio.gather(play("long", {"turns": 4, "step_s": 0.3}), play("short", {"turns": 1, "step_s": 0.0}),
                             play("medium", {"turns": 2, "step_s": 0.05}))
        return engine.batches - batches_before
    t0 = time.monotonic()
    batches = asyncio.run(scenario())
    assert [name for name, _, _ in finished] == ["short", "medium", "long"]
    short, long = finished[0][1] - t0, finished[2][1] - t0
    assert short < long / 2  # the short group did not wait for the slow one's 4 steps of 0.3 s
    assert [len(g.turn_rewards[0]) for _, _, g in finished] == [1, 2, 4]
    assert batches < 3 * (1 + 2 + 4)  # requests of different episodes shared engine batches
    # where the time went: at the end only the long group's episodes were left, all in their
    # 0.3-s steps at once (3 of them at least), the engine idle: that is environment time
    spent = runner.activity.seconds()
    assert spent["generation"] > 0 and 0.8 < spent["environment"] < time.monotonic() - t0


class SwapsWeightsAfterTurnOne(EchoGame):
    engine = weights = None

    def step(self, messages):
        if self.turns == 0:
            type(self).engine.load_weights(type(self).weights, version=7)
        return super().step(messages)


def test_per_token_versions_follow_a_weight_update_in_the_middle_of_an_episode(parts, tiny_model_path):
    engine, tokenizer = parts
    from transformers import AutoModelForCausalLM
    SwapsWeightsAfterTurnOne.engine = engine
    SwapsWeightsAfterTurnOne.weights = {n: p.detach() for n, p in
                                        AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()}
    before = engine.version
    runner = EpisodeRunner(engine, tokenizer, SwapsWeightsAfterTurnOne,
                           RolloutConfig(group_size=1, max_new_tokens=3, max_turns=3))
    group, = runner.run([{"id": "g"}])
    mask, versions = group.loss_mask[0, :group.lengths[0]], group.token_versions[0, :group.lengths[0]]
    turns = _runs(mask.tolist())
    assert len(turns) == 3 and (versions[mask == 0] == -1).all()
    assert [set(versions[a:b].tolist()) for a, b in turns] == [{before}, {7}, {7}]
    assert (group.version_first[0], group.version_last[0], group.version) == (before, 7, before)


def _runs(mask: list) -> list:
    """(start, end) of each run of 1s: the policy turns of a row."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


class Chat(Environment):
    """Three turns with a system prompt; the user answers every turn."""

    def sample(self, rng):
        return {}

    def reset(self, task):
        self.turns = 0
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]

    def step(self, messages):
        self.turns += 1
        return StepResult(observation=[{"role": "user", "content": f"ok, next turn {self.turns}."}],
                          reward=0.0, done=self.turns == 3)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_rows_equal_the_chat_template_at_every_turn_boundary(template, tmp_path):
    path = build_chat_model(tmp_path, template)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=0, seed=1)
    runner = EpisodeRunner(engine, tokenizer, Chat, RolloutConfig(group_size=24, max_new_tokens=40, max_turns=3,
                                                                   temperature=1.5))
    group, = runner.run([{}])
    engine.close()
    endings = {"stop": 0, "length": 0}
    for row in range(group.group_size):
        tokens = group.tokens[row, :group.lengths[row]].tolist()
        turns = _runs(group.loss_mask[row, :group.lengths[row]].tolist())
        env, messages = Chat(), []
        messages = env.reset({})
        for k, (start, end) in enumerate(turns):
            # The row up to this turn is the template's rendering of the conversation so far.
            assert tokenizer.decode(tokens[:start]) == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True), (template, row, k)
            sampled = tokens[start:end]
            stopped = sampled[-1] == tokenizer.eos_token_id
            endings["stop" if stopped else "length"] += 1
            messages = messages + [{"role": "assistant", "content": tokenizer.decode(sampled[:-1] if stopped else sampled)}]
            if k < 2:
                messages += env.step(messages).observation
        assert tokenizer.decode(tokens[:turns[-1][1]]).startswith(
            tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
    assert endings["stop"] >= 2 and endings["length"] >= 2, endings  # both boundaries were exercised

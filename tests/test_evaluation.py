"""Held-out evaluation: a fixed task set that training never draws, played greedily."""
import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.hf import HFEngine
from actors.evaluation import EvalConfig, TrainingTasks, held_out_tasks, play, task_key
from actors.rollout import EpisodeRunner, RolloutConfig
from common.config import ConfigError
from envs.arithmetic import ArithmeticEnv
from envs.token_match import TokenMatchEnv
from launch.config import build_config
from tests.conftest import generate


def test_the_held_out_set_is_distinct_and_the_same_for_a_seed():
    env = ArithmeticEnv(max_value=20)
    first = held_out_tasks(env, EvalConfig(tasks=64, seed=7))
    assert len({task_key(t) for t in first}) == len(first) == 64
    assert first == held_out_tasks(ArithmeticEnv(max_value=20), EvalConfig(tasks=64, seed=7))
    assert first != held_out_tasks(env, EvalConfig(tasks=64, seed=8))


def test_training_never_draws_a_held_out_task():
    env = ArithmeticEnv(max_value=5)  # 25 tasks in all
    held = held_out_tasks(env, EvalConfig(tasks=10))
    keys = {task_key(t) for t in held}
    training, rng = TrainingTasks(env, held), random.Random(0)
    drawn = {task_key(training.sample(rng)) for _ in range(2000)}
    assert not drawn & keys
    assert len(drawn) == 25 - 10  # every other task is still drawn


def test_an_environment_whose_tasks_are_all_held_out_fails_naming_the_key():
    env = ArithmeticEnv(max_value=2)  # 4 tasks in all
    held = held_out_tasks(env, EvalConfig(tasks=64))
    assert len(held) == 4
    with pytest.raises(RuntimeError, match="eval.tasks"):
        TrainingTasks(env, held).sample(random.Random(0))


def test_tasks_without_an_id_are_told_apart_by_their_content():
    assert task_key({"q": 1, "a": 2}) == task_key({"a": 2, "q": 1}) != task_key({"q": 1, "a": 3})


@pytest.mark.parametrize("override, key", [("eval.every=-1", "eval.every"), ("eval.temperature=-0.5", "eval.temperature"),
                                           ("eval.tasks=0", "eval.tasks")])
def test_a_bad_eval_setting_fails_at_start_naming_its_key(override, key):
    overrides = [override] + (["eval.every=5"] if key == "eval.tasks" else [])
    with pytest.raises(ConfigError, match=key):
        build_config("async_grpo", overrides=overrides)


def test_greedy_sampling_equals_transformers_greedy_generate(tiny_model_path):
    """The oracle: transformers' own generate(do_sample=False) on the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    try:
        samples = generate(engine, prompts, max_new_tokens=8, temperature=0.0)
    finally:
        engine.close()
    for prompt, sample in zip(prompts, samples):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert sample.tokens == out[0, len(prompt):].tolist()


def test_an_evaluation_scores_every_task_once_greedily_and_repeats_exactly(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    make_env = lambda: TokenMatchEnv(words=16, target="w3")  # noqa: E731
    runner = EpisodeRunner(engine, tokenizer, make_env, RolloutConfig(max_new_tokens=6))
    tasks = held_out_tasks(make_env(), EvalConfig(tasks=12))
    try:
        first = asyncio.run(play(runner, tasks, temperature=0.0, max_new_tokens=6))
        second = asyncio.run(play(runner, tasks, temperature=0.0, max_new_tokens=6))
    finally:
        engine.close()
    assert first["eval/tasks"] == 12 and first["eval/errors"] == 0
    assert first["eval/reward"] == second["eval/reward"]  # greedy: the same replies both times
    assert first["eval/version_first"] == first["eval/version_last"] == 0
    assert runner.generated_tokens == 0 and runner.episodes == 0  # kept out of the rollout counters

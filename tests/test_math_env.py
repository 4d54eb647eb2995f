"""envs.math: the answer checker on a table of hand-written cases, and the environment's sources."""
import importlib.util
import json
import random

import pytest

from common.config import ConfigError
from envs import registry
from envs.math import MathEnv, boxed, is_correct

RIGHT = [  # (response, reference answer)
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("So we get $\\boxed{\\dfrac{3}{4}}$", "0.75"),
    ("\\boxed{\\tfrac12}", "1/2"),
    ("\\boxed{{\\frac{1}{2}}}", "\\frac{1}{2}"),               # nested braces
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("Thus \\boxed{\\left( 2 \\right)}", "2"),
    ("Answer: 1,234", "1234"),
    ("answer: 1,234,567.", "1234567"),
    ("The final answer is 0.50.", "1/2"),
    ("The answer is \u22127", "-7"),                           # a Unicode minus
    ("the answer is +3", "3"),
    ("So the answer is 12 apples.", "12"),
    ("The answer is 25%.", "25"),
    ("We get \\boxed{25\\%}", "25"),
    ("The answer is $5\\,\\text{cm}$.", "5"),
    ("\\boxed{x = 5}", "5"),
    ("2 + 3 = 5", "5"),                                        # the last number
    ("First 3, then 4, so 7", "7"),
    ("The answer is 3.0", "3"),
    ("\\boxed{3} ... checking again: \\boxed{3}", "3"),        # the same answer twice
    ("The answer is \\frac{6}{8}", "3/4"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),                       # not a number: compared as text
    ("\\boxed{ x + 1 }", "x+1"),
]

WRONG = [
    ("The answer is 15.", "5"),                                # a right digit inside a wrong number
    ("\\boxed{5x}", "5"),                                      # a right number inside a wrong answer
    ("\\boxed{3} or \\boxed{4}", "3"),                         # two candidates
    ("The answer is 3 or 4.", "3"),
    ("The answer is 25, not 5.", "5"),
    ("Answer: 3, 4", "3"),
    ("\\boxed{3, 4}", "4"),
    ("I do not know.", "2"),
    ("", "0"),
    ("\\boxed{1/0}", "0"),
    ("\\boxed{0.76}", "3/4"),
    ("The answer is -7", "7"),                                 # the sign counts
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}"),
    ("\\boxed{3}\\boxed{4}", "4"),
]


@pytest.mark.parametrize("response, answer", RIGHT)
def test_the_checker_gives_credit_for_a_right_final_answer(response, answer):
    assert is_correct(response, answer), (response, answer)


@pytest.mark.parametrize("response, answer", WRONG)
def test_the_checker_gives_no_credit_for_a_wrong_or_hedged_answer(response, answer):
    assert not is_correct(response, answer), (response, answer)


def test_an_unclosed_box_is_not_an_answer_but_the_last_number_still_is():
    assert boxed("\\boxed{12") == [] and boxed("\\boxed{a{b}c} and \\fbox{d}") == ["a{b}c", "d"]
    assert is_correct("\\boxed{12", "12")  # no box, so the last number: 12


def test_a_jsonl_source_is_read_and_scored(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"What is {i} + {i}?", "solution": str(2 * i)}) for i in range(5)))
    env = MathEnv(source=str(path), question_field="problem", answer_field="solution")
    task = env.sample(random.Random(0))
    messages = env.reset(task)
    assert task["question"] in messages[-1]["content"] and "boxed" in messages[-1]["content"]
    reward = env.step(messages + [{"role": "assistant", "content": f"\\boxed{{{task['answer']}}}"}]).reward
    assert reward == 1.0
    assert env.step(messages + [{"role": "assistant", "content": "\\boxed{-1}"}]).reward == 0.0


def test_a_malformed_jsonl_line_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "1+1", "answer": "2"}\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="q.jsonl:2"):
        MathEnv(source=str(path))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed here")
def test_a_hugging_face_source_without_the_datasets_package_fails_at_start_naming_it():
    with pytest.raises(ConfigError, match=r"env.args.*needs the `datasets` package"):
        registry.make(registry.EnvConfig(name="math", args={"source": "hf:openai/gsm8k:main"}))


def test_math_is_a_builtin_and_the_procedural_source_is_right_about_its_own_answers():
    env = registry.make(registry.EnvConfig(name="math", args={"max_value": 20}))
    rng = random.Random(3)
    for _ in range(50):
        task = env.sample(rng)
        messages = env.reset(task)
        assert env.step(messages + [{"role": "assistant", "content": f"The answer is {task['answer']}."}]).reward == 1


def test_math_runs_through_the_real_rollout_loop(tiny_model_path):
    from transformers import AutoTokenizer

    from actors.engines.hf import HFEngine
    from actors.rollout import EpisodeRunner, RolloutConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    make_env = registry.factory(registry.EnvConfig(name="math", args={"max_value": 9}))
    runner = EpisodeRunner(engine, tokenizer, make_env, RolloutConfig(group_size=2, max_new_tokens=4))
    source, rng = make_env(), random.Random(0)
    try:
        groups = runner.run([source.sample(rng) for _ in range(3)])
    finally:
        engine.close()
    for g in groups:
        assert g is not None and g.group_size == 2 and not any(g.errors)
        assert set(g.rewards.tolist()) <= {0.0, 1.0}

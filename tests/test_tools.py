"""Tools: the calculator, the Python sandbox against code that misbehaves, and tool use through
the real rollout loop (tool output is an environment turn, masked from the loss)."""
import asyncio
import time

import pytest
from transformers import AutoTokenizer

from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from envs import registry
from envs.tools import calculator, run_python, tool_calls
from tests.conftest import build_chat_model


@pytest.mark.parametrize("expression, result", [("2 * (3 + 4)", "14"), ("7 / 2", "3.5"), ("-3 ** 2", "-9"),
                                                ("10 // 3 + 10 % 3", "4"), ("6 / 3", "2")])
def test_the_calculator_evaluates_arithmetic(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "1 / 0", "2 ** 100000", "x + 1", "(1"])
def test_the_calculator_refuses_anything_else_with_an_error_line(expression):
    assert calculator(expression).startswith("error:")


def test_python_runs_code_and_returns_its_output():
    assert run_python("print(sum(range(10)))").strip() == "45"
    assert "ZeroDivisionError" in run_python("1 / 0")


def test_python_stops_code_that_loops_forever_within_its_limit():
    t = time.monotonic()
    out = run_python("while True: pass", timeout_s=1.0)
    assert "stopped" in out and time.monotonic() - t < 10


def test_python_stops_code_that_allocates_without_bound():
    out = run_python("x = []\nwhile True: x.append(bytearray(10**7))", timeout_s=5.0, memory_mb=128)
    assert "MemoryError" in out or "stopped" in out


def test_python_keeps_only_a_bounded_output():
    out = run_python("while True: print('x' * 1000)", timeout_s=1.0, max_output=2000)
    assert len(out) < 2200 and "[output cut]" in out


def test_python_refuses_sockets():
    out = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert "network access is not allowed" in out


def tool_user(text: str) -> str:
    """This test's policy: ask the calculator first, then answer with what it said."""
    if "<result" not in text:
        return f'<tool name="calculator">{text.rsplit("What is ", 1)[1].split("?", 1)[0]}</tool>'
    return "The answer is " + text.rsplit('<result name="calculator">', 1)[1].split("</result>", 1)[0]


def test_tool_use_through_the_rollout_loop_masks_tool_output_and_scores_the_answer(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_chat_model(tmp_path / "m", "chatml"))
    make_env = registry.factory(registry.EnvConfig(name="math_tools", args={"max_value": 999}))
    runner = EpisodeRunner(ScriptedEngine(tokenizer, tool_user), tokenizer, make_env,
                           RolloutConfig(group_size=2, max_new_tokens=96, max_turns=3, max_seq_len=4096))
    source = make_env()
    import random
    tasks = [source.sample(random.Random(i)) for i in range(6)]

    async def play():
        return await asyncio.gather(*(runner.episode(t) for t in tasks))
    for task, e in zip(tasks, asyncio.run(play())):
        assert not e.error and e.turn_rewards == [0.0, 1.0], (task, e.turn_rewards, e.error)
        result = tokenizer(f'<result name="calculator">{task["answer"]}</result>', add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(e.tokens)) if e.tokens[i:i + len(result)] == result)
        assert set(e.loss_mask[start:start + len(result)]) == {0}  # the tool's output is not trained on


def test_tool_calls_are_parsed_in_order():
    text = 'a <tool name="python">print(1)</tool> b <tool name="calculator">1+1</tool>'
    assert tool_calls(text) == [("python", "print(1)"), ("calculator", "1+1")]

"""docs/environments.md's example, as a user would use it: its code written to a module, found
by env.name, played through the real rollout loop, and listed by an entry point's name."""
import asyncio
import random
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from envs import registry
from tests.conftest import build_chat_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "environments.md"


def example_module(tmp_path) -> str:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)
    package = tmp_path / "envs_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "guess.py").write_text(code)
    sys.path.insert(0, str(tmp_path))
    return "envs_example.guess:GuessTheNumber"


def bisector(high: int):
    """This test's policy: bisect on the hints so far."""
    def reply(text: str) -> str:
        low, top = 1, high
        for guess, hint in re.findall(r"(\d+) is wrong; go (higher|lower)", text):
            low, top = (int(guess) + 1, top) if hint == "higher" else (low, int(guess) - 1)
        return str((low + top) // 2)
    return reply


def test_the_documented_example_environment_plays_through_the_rollout_loop(tmp_path):
    name = example_module(tmp_path)
    try:
        make_env = registry.factory(registry.EnvConfig(name=name, args={"high": 50}))
        tokenizer = AutoTokenizer.from_pretrained(build_chat_model(tmp_path / "m", "chatml"))
        runner = EpisodeRunner(ScriptedEngine(tokenizer, bisector(50)), tokenizer, make_env,
                               RolloutConfig(group_size=2, max_new_tokens=8, max_turns=6))
        source, rng = make_env(), random.Random(0)
        groups = runner.run([source.sample(rng) for _ in range(4)])
        assert all(g is not None and not any(g.errors) for g in groups)
        assert all(float(r) == 1.0 for g in groups for r in g.rewards)  # bisection finds 1..50 in 6
    finally:
        sys.path.remove(str(tmp_path))
        for module in ("envs_example.guess", "envs_example"):
            sys.modules.pop(module, None)

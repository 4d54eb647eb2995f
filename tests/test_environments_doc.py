"""docs/environments.md's example, as a user would use it: its code written to a module, found
by env.name, played through the real rollout loop, and listed by an entry point's name."""
import asyncio
import random
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

from actors.engine import Engine, Sample
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


class Bisector(Engine):
    """This test's policy: bisects on the hints so far."""

    def __init__(self, tokenizer, high):
        self.tokenizer, self.high = tokenizer, high

    @property
    def version(self):
        return 0

    async def generate(self, prompt, max_new_tokens, temperature):
        low, high = 1, self.high
        for guess, hint in re.findall(r"(\d+) is wrong; go (higher|lower)", self.tokenizer.decode(prompt)):
            low, high = (int(guess) + 1, high) if hint == "higher" else (low, int(guess) - 1)
        tokens = self.tokenizer(f"{(low + high) // 2}", add_special_tokens=False)["input_ids"]
        tokens.append(self.tokenizer.eos_token_id)
        return Sample(tokens, [-0.1] * len(tokens), [0] * len(tokens), "stop")

    def start_weight_updates(self, receiver):
        pass

    def check(self):
        pass

    def close(self):
        pass

    def stats(self):
        return {"weight_swaps": 0}


def test_the_documented_example_environment_plays_through_the_rollout_loop(tmp_path):
    name = example_module(tmp_path)
    try:
        make_env = registry.factory(registry.EnvConfig(name=name, args={"high": 50}))
        tokenizer = AutoTokenizer.from_pretrained(build_chat_model(tmp_path / "m", "chatml"))
        runner = EpisodeRunner(Bisector(tokenizer, 50), tokenizer, make_env,
                               RolloutConfig(group_size=2, max_new_tokens=8, max_turns=6))
        source, rng = make_env(), random.Random(0)
        groups = runner.run([source.sample(rng) for _ in range(4)])
        assert all(g is not None and not any(g.errors) for g in groups)
        assert all(float(r) == 1.0 for g in groups for r in g.rewards)  # bisection finds 1..50 in 6
    finally:
        sys.path.remove(str(tmp_path))
        for module in ("envs_example.guess", "envs_example"):
            sys.modules.pop(module, None)

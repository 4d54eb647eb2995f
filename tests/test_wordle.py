"""The word game: feedback as Wordle gives it, and a scripted solver that wins every game
through the real rollout loop (multi-turn: guesses, feedback, guesses)."""
import asyncio
import random
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from envs import registry
from envs.wordle import WORDS, WordleEnv, feedback
from tests.conftest import build_chat_model


@pytest.mark.parametrize("guess, secret, marks", [
    ("crane", "react", "YYG.Y"),
    ("llama", "alloy", "YGY.."),   # a letter guessed twice, once in the word: one mark for it
    ("slate", "slate", "GGGGG"),
    ("moral", "coral", ".GGGG"),
    ("eerie", "crane", "..Y.G"),   # e three times, once in the secret: the green one
])
def test_feedback_marks_letters_as_wordle_does(guess, secret, marks):
    assert feedback(guess, secret) == marks


def solver(words):
    """This test's policy: guess the first word that agrees with all the feedback so far."""
    def reply(text: str) -> str:
        seen = re.findall(r"([A-Z]{5}): ([GY.]{5})\.", text)
        return "My guess: " + next(w for w in words if all(feedback(g.lower(), w) == m for g, m in seen))
    return reply


def test_a_scripted_solver_wins_every_game_through_the_rollout_loop(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_chat_model(tmp_path / "m", "chatml"))
    make_env = registry.factory(registry.EnvConfig(name="wordle", args={"progress_reward": 0.1}))
    runner = EpisodeRunner(ScriptedEngine(tokenizer, solver(WORDS)), tokenizer, make_env,
                           RolloutConfig(group_size=2, max_new_tokens=16, max_turns=6))
    tasks = [{"id": w, "secret": w} for w in WORDS]

    async def play_all():
        return await asyncio.gather(*(runner.episode(t) for t in tasks))
    episodes = asyncio.run(play_all())
    for task, e in zip(tasks, episodes):
        assert not e.error, e.error
        assert sum(e.turn_rewards) >= 1.0, (task["secret"], e.turn_rewards)  # solved
        assert 1 <= len(e.turn_rewards) <= 6
        # the row holds every turn: the policy's guesses (mask 1) and the feedback (mask 0)
        text = tokenizer.decode(e.tokens)
        assert text.count("My guess:") == len(e.turn_rewards)
        assert sum(e.loss_mask) < len(e.tokens)
    assert any(len(e.turn_rewards) > 1 for e in episodes)  # some games took several turns


def test_a_reply_that_is_no_word_costs_a_guess_and_ends_the_game_when_none_are_left():
    env = WordleEnv(max_guesses=2)
    messages = env.reset({"id": "crane", "secret": "crane"})
    first = env.step(messages + [{"role": "assistant", "content": "hmm"}])
    assert not first.done and "not a 5-letter word" in first.observation[0]["content"]
    last = env.step(messages + [{"role": "assistant", "content": "slate"}])
    assert last.done and last.reward == 0.0 and last.info["solved"] is False


def test_python_m_launch_envs_lists_every_builtin():
    out = subprocess.run([sys.executable, "-m", "launch", "envs"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"arithmetic", "math", "token_match", "wordle"} <= set(names)

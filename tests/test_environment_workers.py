"""Environments in worker processes (rollout.env_workers): the same episodes as on threads, and
what goes wrong stays contained: an exception, a hang past the deadline, a crash, a worker
killed mid-episode from outside, workers that cannot start."""
import asyncio
import os
import random
import re
import signal
import time

import pytest
from transformers import AutoTokenizer

from actors.engines.scripted import ScriptedEngine
from actors.environments import EnvironmentsExhausted, ProcessEnvironments
from actors.rollout import EpisodeRunner, RolloutConfig
from common.config import ConfigError
from envs import registry
from envs.wordle import WORDS, feedback
from tests.conftest import build_chat_model

MISBEHAVES = registry.EnvConfig(name="tests.faults:Misbehaves")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_chat_model(tmp_path_factory.mktemp("m"), "chatml"))


@pytest.fixture
def pool():
    made = []

    def make(env=MISBEHAVES, workers=2, timeout_s=10.0, ready=True):
        made.append(ProcessEnvironments(env, workers, timeout_s, threads_per_worker=4))
        if ready:
            made[-1].wait_ready(60)
        return made[-1]
    yield make
    for p in made:
        p.shutdown()


def play(runner, replies: list):
    """One episode per reply (the policy says it every turn), all at once."""
    async def all_():
        return await asyncio.gather(*(runner.episode({"id": str(i), "say": r}) for i, r in enumerate(replies)))
    return asyncio.run(all_())


def scripted(tokenizer, environments, reply, timeout_s=10.0, max_hung=16):
    return EpisodeRunner(ScriptedEngine(tokenizer, reply), tokenizer, environments,
                         RolloutConfig(group_size=2, max_new_tokens=8, max_turns=2, env_timeout_s=timeout_s,
                                       max_hung_env_calls=max_hung))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def solver(text: str) -> str:
    seen = re.findall(r"([A-Z]{5}): ([GY.]{5})\.", text)
    return "My guess: " + next(w for w in WORDS if all(feedback(g.lower(), w) == m for g, m in seen))


def test_episodes_in_worker_processes_equal_those_on_threads(tokenizer, pool):
    config = registry.EnvConfig(name="wordle", args={"progress_reward": 0.1})
    tasks = [{"id": w, "secret": w} for w in WORDS[:12]]

    def episodes(environments):
        runner = EpisodeRunner(ScriptedEngine(tokenizer, solver), tokenizer, environments,
                               RolloutConfig(group_size=2, max_new_tokens=16, max_turns=6))

        async def all_():
            return await asyncio.gather(*(runner.episode(t) for t in tasks))
        return asyncio.run(all_()), runner
    on_threads, _ = episodes(registry.factory(config))
    in_workers, runner = episodes(pool(config, workers=3))
    for a, b in zip(on_threads, in_workers):
        assert not b.error, b.error
        assert (a.tokens, a.loss_mask, a.turn_rewards) == (b.tokens, b.loss_mask, b.turn_rewards)
    assert any(len(e.turn_rewards) > 1 for e in in_workers)        # multi-turn state lived in the workers
    assert runner.stats()["env_s"] > 0 and runner.stats()["env_worker_crashes"] == 0


def test_environments_run_in_other_processes_spread_over_the_workers(tokenizer, pool):
    environments = pool(workers=2)
    episodes = play(scripted(tokenizer, environments, lambda text: "pid"), ["pid"] * 6)
    pids = {int(m) for e in episodes for m in re.findall(r"pid (\d+)", tokenizer.decode(e.tokens))}
    assert pids == set(environments.pids()) and os.getpid() not in pids


def test_an_exception_ends_only_its_episode_and_keeps_the_worker(tokenizer, pool):
    environments = pool(workers=1)
    pid = environments.pids()[0]
    replies = iter(["raise", "fine", "fine", "fine"])
    episodes = play(scripted(tokenizer, environments, lambda text: next(replies)), [0, 1])
    errors = sorted(e.error for e in episodes)
    assert errors[0] == "" and "tests.faults:Misbehaves.step raised RuntimeError: the board caught fire" in errors[1]
    assert environments.pids() == [pid] and environments.stats()["env_workers_replaced"] == 0


def test_a_hang_past_the_deadline_is_contained_and_loses_no_other_episode(tokenizer, pool):
    environments = pool(workers=1, timeout_s=1.0)
    hung_pid = environments.pids()[0]
    # on threads, max_hung_env_calls=0 would end the actor at the first hang; here no thread is kept
    t = time.monotonic()
    episodes = play(scripted(tokenizer, environments, lambda text: "hang", max_hung=0), [0, 1, 2])
    assert time.monotonic() - t < 8
    assert all("tests.faults:Misbehaves.step timed out after 1.0s" in e.error for e in episodes)
    assert all(f"environment worker 0 (pid {hung_pid}) is replaced" in e.error for e in episodes)
    stats = environments.stats()
    assert stats["hung_env_calls"] == 3 and stats["env_workers_replaced"] == 1 and stats["env_worker_crashes"] == 0
    deadline = time.monotonic() + 5
    while pid_alive(hung_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(hung_pid)   # drained, then killed: its hung threads went with it
    again = play(scripted(tokenizer, environments, lambda text: "fine"), [0, 1])
    assert all(not e.error and e.turn_rewards == [1.0, 1.0] for e in again)
    assert hung_pid not in environments.pids()


def test_an_episode_beside_a_hang_finishes_on_the_draining_worker(tokenizer, pool):
    environments = pool(workers=1, timeout_s=4.0)
    # both episodes start on worker 0: one hangs at once; the other's steps take 3 s each, so
    # its second step is still running when the hang's deadline retires the worker
    replies = iter(["slow", "hang"])
    episodes = play(scripted(tokenizer, environments, lambda text: next(replies, "slow")), [0, 1])
    errors = sorted(e.error for e in episodes)
    assert errors[0] == "" and "timed out" in errors[1]
    assert [e for e in episodes if not e.error][0].turn_rewards == [1.0, 1.0]
    assert environments.stats()["env_episodes_lost"] == 0


def test_a_worker_killed_mid_episode_ends_its_episodes_naming_it_and_is_replaced(tokenizer, pool):
    environments = pool(workers=2)
    victim = environments.pids()[0]
    runner = scripted(tokenizer, environments, lambda text: "slow")

    async def kill_during_the_steps():
        episodes = asyncio.gather(*(runner.episode({"id": str(i)}) for i in range(4)))
        await asyncio.sleep(1.5)            # every episode is inside its 3-s first step
        os.kill(victim, signal.SIGKILL)
        return await episodes
    episodes = asyncio.run(kill_during_the_steps())
    lost = [e for e in episodes if e.error]
    assert len(lost) == 2   # the pool spread four episodes over two workers
    for e in lost:
        assert f"environment worker 0 (pid {victim}) died (killed by SIGKILL)" in e.error
    assert all(e.turn_rewards == [1.0, 1.0] for e in episodes if not e.error)
    stats = environments.stats()
    assert stats["env_worker_crashes"] == 1 and stats["env_episodes_lost"] == 2 and stats["env_workers_replaced"] == 1
    assert victim not in environments.pids() and len(environments.pids()) == 2
    again = play(scripted(tokenizer, environments, lambda text: "fine"), [0, 1, 2, 3])
    assert all(not e.error for e in again)


def test_a_crash_inside_the_environment_names_the_exit_code(tokenizer, pool):
    environments = pool(workers=1)
    episodes = play(scripted(tokenizer, environments, lambda text: "crash"), [0])
    assert "died (exit code 3)" in episodes[0].error
    assert play(scripted(tokenizer, environments, lambda text: "fine"), [0])[0].error == ""


def test_workers_that_cannot_start_fail_the_actor_loudly(tokenizer, pool, monkeypatch):
    config = registry.EnvConfig(name="tests.faults:FailsInWorkers")
    monkeypatch.setenv("ASYNCRL_FAULT_WORKER_IMPORT", str(os.getpid()))
    environments = pool(config, workers=1, ready=False)
    with pytest.raises(EnvironmentsExhausted, match=r"3 environment workers in a row died before they were ready"):
        environments.wait_ready(60)
    with pytest.raises(EnvironmentsExhausted, match=r"died before they were ready .*exit code 5"):
        play(scripted(tokenizer, environments, lambda text: "w3"), [0])


def test_an_unknown_environment_fails_at_start_naming_the_key():
    with pytest.raises(ConfigError, match="env.name"):
        ProcessEnvironments(registry.EnvConfig(name="no.such:Env"), 1, 1.0)


def test_env_workers_is_validated():
    with pytest.raises(ConfigError, match="env_workers"):
        RolloutConfig(env_workers=-1).validate()


@pytest.fixture(scope="module")
def tiny_chat_engine(tmp_path_factory):
    from actors.engines.hf import HFEngine

    path = build_chat_model(tmp_path_factory.mktemp("chat"), "chatml")
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    yield engine, tokenizer
    engine.close()


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_every_builtin_plays_through_the_rollout_loop_in_worker_processes(name, tiny_chat_engine, pool):
    engine, tokenizer = tiny_chat_engine
    config = registry.EnvConfig(name=name)
    runner = EpisodeRunner(engine, tokenizer, pool(config, workers=2),
                           RolloutConfig(group_size=2, max_new_tokens=8, max_turns=3, max_seq_len=4096))
    source, rng = registry.make(config), random.Random(0)
    groups = runner.run([source.sample(rng) for _ in range(2)])
    for g in groups:
        assert g is not None and g.group_size == 2 and not any(g.errors), g.errors if g else None
        g.validate()
        for i, n in enumerate(g.lengths):   # the policy's tokens trained on, the environment's not
            assert 0 < g.loss_mask[i, :n].sum() < n
    assert runner.stats()["env_worker_crashes"] == 0

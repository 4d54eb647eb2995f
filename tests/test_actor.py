"""A rollout actor group against a real buffer server: back-pressure is the buffer's, and a
held actor still stops when asked."""
import asyncio
import random
import threading
import time

import pytest

from actors.actor import ActorsConfig, RolloutActor
from actors.engine import Sample
from actors.engines.scripted import ScriptedEngine
from actors.rollout import RolloutConfig
from buffer.client import BufferClient
from common.weights import LocalWeightChannel
from envs.registry import EnvConfig


def _actor(tiny_model_path, server, channel=None) -> RolloutActor:
    return RolloutActor(0, tiny_model_path, "float32", ActorsConfig(max_inflight_episodes=4),
                        RolloutConfig(group_size=2, max_new_tokens=2),
                        EnvConfig(name="token_match", args={"words": 16, "target": "w3"}),
                        server.address, 5.0, channel or LocalWeightChannel())


def _wait_for(condition, what: str, run: threading.Thread, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline and run.is_alive(), f"{what} never happened"
        time.sleep(0.05)


def test_an_actor_held_by_a_full_queue_waits_and_still_stops_when_asked(tiny_model_path, buffer_server):
    server = buffer_server(rate_limiter="queue", max_size=2)
    actor = _actor(tiny_model_path, server)
    watcher = BufferClient(server.address, timeout_s=5.0)
    finished = {}
    run = threading.Thread(target=lambda: finished.update(stats=actor.run()))
    run.start()
    try:
        # the queue is full: the actor waits for room with nothing generated (no held insert)
        _wait_for(lambda: watcher.stats()["room_waits"] == 1, "the actor waiting for room", run)
        time.sleep(1.5)   # across more than one of the actor's asks (HELD_POLL_S)
        stats = watcher.stats()
        assert stats["size"] == 2 and actor.groups == 2 and stats["held_inserts"] == 0   # nothing was evicted
        assert actor.runner.activity.seconds()["buffer"] > 1.0      # and the wait shows as buffer time
        actor.stop()
        run.join(10)
        assert not run.is_alive(), "a held actor did not stop"
        assert finished["stats"]["groups"] == 2 and watcher.stats()["evicted"] == 0
    finally:
        actor.stop()
        run.join(10)
        actor.close()
        watcher.close()


def test_an_actor_starts_no_more_groups_than_the_buffer_takes_so_the_next_batch_is_on_new_weights(
        tiny_model_path, buffer_server):
    # The default job's regression (docs/benchmarks.md, 2026-12-07): groups generated while
    # the queue was full waited, generated, while the learner moved on, and the learner
    # trained on groups two versions old. Starting no more groups than the buffer's room, and
    # after a wait for room none before the engine serves the weights published before the
    # sample, every group of the next batch is started on them.
    from transformers import AutoModelForCausalLM

    server = buffer_server(rate_limiter="queue", max_size=2)
    channel = LocalWeightChannel()
    actor = _actor(tiny_model_path, server, channel)
    learner = BufferClient(server.address, timeout_s=5.0)
    run = threading.Thread(target=actor.run)
    run.start()
    try:
        _wait_for(lambda: learner.stats()["room_waits"] == 1, "the actor waiting for room", run)
        assert learner.stats()["held_inserts"] == 0   # no group generated beyond the room
        # The learner says it published version 1 and samples, as it does after a step; the
        # version reaches the actor a second later (on CPU it takes that long through Ray)
        learner.set_learner_version(1)
        first, _, _ = learner.sample(2, timeout_s=10.0)
        time.sleep(1.0)
        assert learner.stats()["size"] == 0 and actor.engine.version == 0   # nothing started on version 0
        weights = AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()   # as a learner sends them
        channel.send(1, {name: t.detach().clone() for name, t in weights})
        second, staleness, _ = learner.sample(2, timeout_s=30.0)
        assert [g.version for g in first] == [0, 0]
        assert [g.version for g in second] == [1, 1] and staleness == [0, 0]
    finally:
        actor.stop()
        run.join(10)
        actor.close()
        learner.close()


def test_an_actor_of_parts_runs_its_own_loop_over_an_engine_built_outside_it(tiny_model_path, buffer_server):
    from transformers import AutoTokenizer

    from actors.engines.hf import HFEngine
    from actors.rollout import EpisodeRunner
    from envs import registry

    server = buffer_server()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, dtype="float32", device="cpu", stop_token_ids=[tokenizer.eos_token_id],
                      pad_token_id=tokenizer.eos_token_id, seed=0)
    env = EnvConfig(name="token_match", args={"words": 16, "target": "w3"})
    rollout = RolloutConfig(group_size=2, max_new_tokens=2)
    runner = EpisodeRunner(engine, tokenizer, registry.factory(env), rollout)
    actor = RolloutActor.of_parts(3, ActorsConfig(max_inflight_episodes=4), rollout, runner,
                                  registry.factory(env)(), BufferClient(server.address, timeout_s=5.0))
    watcher = BufferClient(server.address, timeout_s=5.0)
    try:
        stats = actor.run(max_groups=3)
        assert stats["groups"] == 3 and stats["actor_id"] == 3 and stats["generated_tokens"] > 0
        assert watcher.stats()["size"] == 3   # every group it made is in the buffer
    finally:
        actor.close()
        watcher.close()


class _UnevenEngine(ScriptedEngine):
    """A scripted engine whose replies take 0.02 s, one in ten 0.4 s (a fixed draw): the
    episodes of one group end at different times. It keeps the time-weighted number of
    requests in flight."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, lambda text: "w3 w3")
        self.rng, self.live, self.peak = random.Random(0), 0, 0
        self.area, self.since, self.start = 0.0, None, None

    def _count(self, change: int) -> None:
        now = time.monotonic()
        if self.since is not None:
            self.area += self.live * (now - self.since)
        self.start = self.start or now
        self.since, self.live = now, self.live + change
        self.peak = max(self.peak, self.live)

    async def generate(self, prompt, max_new_tokens, temperature):
        self._count(+1)
        try:
            await asyncio.sleep(0.4 if self.rng.random() < 0.1 else 0.02)
            return await super().generate(prompt, max_new_tokens, temperature)
        finally:
            self._count(-1)


def test_a_group_starts_as_soon_as_enough_episode_slots_are_free_not_when_a_whole_group_ends(
        tiny_model_path, buffer_server):
    from transformers import AutoTokenizer

    from actors.rollout import EpisodeRunner
    from envs import registry

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = _UnevenEngine(tokenizer)
    env = EnvConfig(name="token_match", args={"words": 16, "target": "w3"})
    rollout = RolloutConfig(group_size=4, max_new_tokens=4)
    runner = EpisodeRunner(engine, tokenizer, registry.factory(env), rollout)
    server = buffer_server(max_size=1000)
    actor = RolloutActor.of_parts(0, ActorsConfig(max_inflight_episodes=16), rollout, runner,
                                  registry.factory(env)(), BufferClient(server.address, timeout_s=5.0))
    try:
        stats = actor.run(max_groups=60)
    finally:
        actor.close()
    assert stats["groups"] == 60 and engine.peak <= 16   # never more episodes than the slots
    # Counting whole groups (4 of 4 episodes) kept about 5 of the 16 slots generating: most
    # groups wait on one slow episode. Freed slot by slot, the slow episodes of many groups
    # overlap and the engine stays nearly full (the last groups drain it).
    mean_live = engine.area / (engine.since - engine.start)
    assert mean_live > 8, f"mean requests in flight {mean_live:.1f} of 16"


def test_a_group_cancelled_before_or_while_its_episodes_play_frees_every_slot(tiny_model_path, buffer_server):
    from transformers import AutoTokenizer

    from actors.actor import _StartGate
    from actors.rollout import EpisodeRunner
    from envs import registry

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    env = EnvConfig(name="token_match", args={"words": 16, "target": "w3"})
    rollout = RolloutConfig(group_size=4, max_new_tokens=4)
    engine = _UnevenEngine(tokenizer)
    runner = EpisodeRunner(engine, tokenizer, registry.factory(env), rollout)
    server = buffer_server()
    actor = RolloutActor.of_parts(0, ActorsConfig(max_inflight_episodes=8), rollout, runner,
                                  registry.factory(env)(), BufferClient(server.address, timeout_s=5.0))
    gate = _StartGate(actor)

    async def start():
        slots = gate.started()
        group = asyncio.ensure_future(runner.group(actor.tasks.sample(actor.rng), 0, slots.episode_ended))
        group.add_done_callback(slots.group_done)
        return group

    async def scenario():
        seen = []
        for cancel in ("before it began", "while it plays", "never"):
            group = await start()
            assert gate.live_episodes == 4
            deadline = time.monotonic() + 10
            while cancel == "while it plays" and engine.live == 0:   # an episode waits on the engine
                assert time.monotonic() < deadline, "no episode reached the engine"
                await asyncio.sleep(0.001)
            if cancel != "never":
                group.cancel()
            await asyncio.gather(group, return_exceptions=True)
            await asyncio.sleep(0.05)   # the episodes' own finally blocks, after the group's
            seen.append((group.cancelled(), gate.live_episodes))
        return seen
    try:
        assert asyncio.run(scenario()) == [(True, 0), (True, 0), (False, 0)]
    finally:
        actor.close()


def test_actor_groups_share_the_buffers_room_evenly_rounded_up():
    from types import SimpleNamespace

    from actors.actor import _StartGate

    actor = SimpleNamespace(engine=SimpleNamespace(version=0), config=ActorsConfig(count=3, max_inflight_episodes=64),
                            rollout=RolloutConfig(group_size=2), groups=0)
    gate = _StartGate(actor)
    assert gate.room == 0 and not gate.may_start(0, None)   # not asked yet: the first start waits for room
    gate.told(4)
    assert gate.room == 2 and gate.may_start(1, None) and not gate.may_start(2, None)   # 4 among 3: 2 each
    gate.told(1)
    assert gate.room == 1   # each may still go on; what overshoots waits in a held insert
    gate.told(None)
    assert gate.room is None and gate.may_start(30, None)   # a limiter that never holds: the slots decide


def _scripted_actor(tiny_model_path, server, reply, engine=ScriptedEngine, **actors) -> RolloutActor:
    """An actor over a scripted engine (version 0 throughout) on token_match with groups of 2:
    a reply's reward is its share of the word w3."""
    from transformers import AutoTokenizer

    from actors.rollout import EpisodeRunner
    from envs import registry

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    env = EnvConfig(name="token_match", args={"words": 16, "target": "w3"})
    rollout = RolloutConfig(group_size=2, max_new_tokens=4)
    runner = EpisodeRunner(engine(tokenizer, reply), tokenizer, registry.factory(env), rollout)
    return RolloutActor.of_parts(0, ActorsConfig(max_inflight_episodes=4, **actors), rollout, runner,
                                 registry.factory(env)(), BufferClient(server.address, timeout_s=5.0))


def test_flat_groups_are_dropped_for_others_and_only_unflat_ones_reach_the_buffer(tiny_model_path, buffer_server):
    draws = random.Random(0)
    server = buffer_server(max_size=1000)
    actor = _scripted_actor(tiny_model_path, server, lambda text: draws.choice(["w3", "w1"]), drop_flat_groups=1000)
    learner = BufferClient(server.address, timeout_s=5.0)
    try:
        stats = actor.run(max_groups=10)
        groups, _, _ = learner.sample(10, timeout_s=5.0)
    finally:
        actor.close()
        learner.close()
    # a group of two is flat half of the time: about ten were dropped on the way to ten kept
    assert stats["groups"] == 10 and stats["flat_groups_dropped"] >= 1
    assert all(not g.flat and sorted(g.rewards) == [0.0, 1.0] for g in groups)


def test_past_its_drops_on_one_version_an_actor_inserts_flat_groups_rather_than_starve_the_learner(
        tiny_model_path, buffer_server):
    server = buffer_server(max_size=1000)
    actor = _scripted_actor(tiny_model_path, server, lambda text: "w1", drop_flat_groups=3)   # every group flat
    try:
        stats = actor.run(max_groups=2)
    finally:
        actor.close()
    assert stats["groups"] == 2 and stats["flat_groups_dropped"] == 3


class _SilentAtFirstEngine(ScriptedEngine):
    """Answers its first four requests with no token at all (the two groups that start first
    generate nothing), then as scripted."""

    def __init__(self, tokenizer, reply):
        super().__init__(tokenizer, reply)
        self.silent = 4

    async def generate(self, prompt, max_new_tokens, temperature):
        if self.silent:
            self.silent -= 1
            return Sample([], [], [], "stop")
        return await super().generate(prompt, max_new_tokens, temperature)


# groups_per_version=2 starts two groups on a version, then waits for the next; a group that
# reaches no learner frees its place, or the learner would wait for groups no actor makes
@pytest.mark.parametrize("lost", ["flat, dropped", "no row generated"])
def test_a_synchronous_actor_replaces_each_group_that_reaches_no_learner_on_the_same_version(tiny_model_path,
                                                                                           buffer_server, lost):
    server = buffer_server(max_size=1000)
    if lost == "flat, dropped":
        actor = _scripted_actor(tiny_model_path, server, lambda text: "w1", drop_flat_groups=3, groups_per_version=2)
    else:
        actor = _scripted_actor(tiny_model_path, server, lambda text: "w3", engine=_SilentAtFirstEngine,
                                groups_per_version=2)
    watcher = BufferClient(server.address, timeout_s=5.0)
    run = threading.Thread(target=actor.run)
    run.start()
    try:
        _wait_for(lambda: watcher.stats()["size"] == 2, "two groups inserted", run)
        time.sleep(0.5)   # the actor now waits for new weights: nothing more starts
        assert (actor.flat_groups_dropped, actor.runner.groups_unusable) == ((3, 0) if lost == "flat, dropped" else (0, 2))
        assert actor.groups == 2 and watcher.stats()["size"] == 2
    finally:
        actor.stop()
        run.join(10)
        actor.close()
        watcher.close()


class _SilentEngine(_SilentAtFirstEngine):
    def __init__(self, tokenizer, reply):
        super().__init__(tokenizer, reply)
        self.silent = 10 ** 9


def test_an_actor_whose_groups_generate_nothing_fails_past_its_limit_saying_why(tiny_model_path, buffer_server):
    actor = _scripted_actor(tiny_model_path, buffer_server(), lambda text: "w3", engine=_SilentEngine,
                            max_unusable_in_a_row=3)
    try:
        # two groups run at once (4 episode slots, groups of 2): the third or fourth to end trips it
        with pytest.raises(RuntimeError, match=r"actor 0: [34] groups in a row generated no token "
                                               r"\(actors.max_unusable_in_a_row=3\); the last one's episodes ended "
                                               r"with: no error: the engine returned no token"):
            actor.run(max_groups=10)
        assert actor.groups == 0 and actor.runner.groups_unusable in (3, 4)
    finally:
        actor.close()


def test_a_flat_group_with_an_episode_error_goes_to_the_learner_which_counts_errors(tiny_model_path, buffer_server):
    from actors.actor import _StartGate
    from tests.conftest import make_group

    actor = _scripted_actor(tiny_model_path, buffer_server(), lambda text: "w1", drop_flat_groups=10)
    try:
        gate = _StartGate(actor)
        failed = make_group(rewards=[0, 0, 0, 0])
        failed.errors[1] = "episode ended: row grew past rollout.max_seq_len"
        assert not gate.drops(failed) and gate.drops(make_group(rewards=[0, 0, 0, 0]))
        assert actor.flat_groups_dropped == 1
    finally:
        actor.close()

"""A rollout actor group against a real buffer server: back-pressure is the buffer's, and a
held actor still stops when asked."""
import threading
import time

from actors.actor import ActorsConfig, RolloutActor
from actors.rollout import RolloutConfig
from buffer.client import BufferClient
from common.weights import LocalWeightChannel
from envs.registry import EnvConfig


def test_an_actor_held_by_a_full_queue_waits_and_still_stops_when_asked(tiny_model_path, buffer_server):
    server = buffer_server(rate_limiter="queue", max_size=2)
    actor = RolloutActor(0, tiny_model_path, "float32", ActorsConfig(max_inflight_episodes=4),
                         RolloutConfig(group_size=2, max_new_tokens=2),
                         EnvConfig(name="token_match", args={"words": 16, "target": "w3"}),
                         server.address, 5.0, LocalWeightChannel())
    watcher = BufferClient(server.address, timeout_s=5.0)
    finished = {}
    run = threading.Thread(target=lambda: finished.update(stats=actor.run()))
    run.start()
    try:
        deadline = time.monotonic() + 60
        while watcher.stats()["held_inserts"] == 0:   # the queue is full and holds the actor's next insert
            assert time.monotonic() < deadline and run.is_alive(), "the actor never filled the queue"
            time.sleep(0.05)
        time.sleep(1.5)   # held across more than one of the actor's asks (HELD_POLL_S)
        assert watcher.stats()["size"] == 2 and actor.groups == 2   # it waited; nothing was evicted
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

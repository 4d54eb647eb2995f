"""async_grpo: actors generate continuously into the buffer; the learner trains on what it
holds, publishing weights every `trainer.sync_every` steps. Reads top to bottom."""
from __future__ import annotations

import time
from pathlib import Path

import ray

from buffer.client import BufferClient
from buffer.server import BufferServer
from common.config import to_yaml
from common.metrics import MetricsLogger
from envs import registry
from launch import cluster, models
from launch.config import Config

CONFIG_FILES = ["async_grpo"]  # configs/*.yaml applied over the dataclass defaults, before --config


def main(config: Config) -> Path:
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    registry.make(config.env)  # a bad environment name or argument fails here, before anything starts
    model_path = models.resolve(config.model, run_dir, config.run.seed)

    cluster.start_ray(config)
    buffer = BufferServer(config.buffer, seed=config.run.seed).start()
    buffer_stats = BufferClient(buffer.address, timeout_s=config.buffer.timeout_s)
    actors, actor_runs, ranks, group = [], {}, [], None
    try:
        weights = cluster.start_weight_channel(config)
        ranks, group = cluster.start_learners(config, model_path, buffer.address, weights)
        actors = cluster.start_actors(config, model_path, buffer.address, weights)
        actor_runs = {a.run.remote(): i for i, a in enumerate(actors)}
        train(config, run_dir, ranks, actors, actor_runs, buffer_stats)
        if config.trainer.export_final:
            cluster.get([r.export.remote(str(run_dir / "final")) for r in ranks], config.run.step_timeout_s,
                        "learner export")
    finally:
        cluster.stop_all(actors, actor_runs, ranks, group, config.run.actor_timeout_s)
        buffer_stats.close()
        buffer.stop()
        ray.shutdown()
    print(f"asyncrl: run finished; metrics in {run_dir / 'metrics.jsonl'}", flush=True)
    return run_dir


def train(config: Config, run_dir: Path, ranks, actors, actor_runs, buffer_stats) -> None:
    logger = MetricsLogger(run_dir, config.trainer.max_steps)
    tokens_before, time_before = 0, time.monotonic()
    try:
        for _ in range(config.trainer.max_steps):
            metrics = cluster.learner_step(ranks, actor_runs, config.run.step_timeout_s)
            actor_stats = cluster.get([a.stats.remote() for a in actors], config.run.actor_timeout_s, "actor stats")
            tokens, now = sum(s["generated_tokens"] for s in actor_stats), time.monotonic()
            table = buffer_stats.stats()
            metrics.update({
                "buffer/size": table["size"], "buffer/inserts": table["inserts"],
                "buffer/dropped_stale": table["dropped_stale"], "buffer/evicted": table["evicted"],
                "actor/tokens_per_s": (tokens - tokens_before) / max(now - time_before, 1e-9),
                "actor/versions": [s["version"] for s in actor_stats],
            })
            tokens_before, time_before = tokens, now
            logger.log(metrics)
    finally:
        logger.close()

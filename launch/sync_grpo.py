"""sync_grpo: the synchronous baseline, for comparison with async_grpo on the same hardware.

The same parts and config, run in lock-step: each actor generates its share of one step's
groups per weight version, all at once, and then waits; the learner trains on them and
publishes every step; the buffer accepts no staleness. Generation and training alternate instead of overlapping.
"""
from __future__ import annotations

from pathlib import Path

from common.config import ConfigError, validate
from launch import async_grpo
from launch.config import Config

CONFIG_FILES = async_grpo.CONFIG_FILES  # the same defaults as the asynchronous recipe


def main(config: Config) -> Path:
    actors, batch = config.actors.count, config.trainer.batch_groups
    if batch % actors:
        raise ConfigError("trainer.batch_groups", f"must be a multiple of actors.count={actors} in sync_grpo, "
                          f"got {batch}")
    config.actors.groups_per_version = batch // actors  # each actor's share of one step, then wait
    config.actors.max_inflight_episodes = max(config.actors.max_inflight_episodes,
                                              config.actors.groups_per_version * config.rollout.group_size)
    config.trainer.sync_every = 1
    config.buffer.table.max_staleness = 0
    validate(config)   # the recipe's settings against the rest (a publish_lag is refused here)
    return async_grpo.main(config)

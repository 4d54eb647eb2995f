"""sync_grpo: the synchronous baseline, for comparison with async_grpo on the same hardware.

The same parts and config, run in lock-step: the actors generate exactly one batch per
weight version and then wait; the learner trains on it and publishes every step; the buffer
accepts no staleness. Generation and training alternate instead of overlapping.
"""
from __future__ import annotations

from pathlib import Path

from common.config import ConfigError
from launch import async_grpo
from launch.config import Config

CONFIG_FILES = async_grpo.CONFIG_FILES  # the same defaults as the asynchronous recipe


def main(config: Config) -> Path:
    per_batch = config.actors.count * config.actors.groups_per_batch
    if config.trainer.batch_groups % per_batch:
        raise ConfigError("trainer.batch_groups", f"must be a multiple of actors.count x actors.groups_per_batch "
                          f"= {per_batch} in sync_grpo, got {config.trainer.batch_groups}")
    config.actors.batches_per_version = config.trainer.batch_groups // per_batch
    config.trainer.sync_every = 1
    config.buffer.table.max_staleness = 0
    return async_grpo.main(config)

"""Shared test fixtures: a tiny model and tokenizer built once per session, and a running
buffer server on loopback."""
from __future__ import annotations

import numpy as np
import pytest

from buffer.server import BufferConfig, BufferServer
from buffer.table import TableConfig
from common.rollout import RolloutGroup
from launch.models import TinyModelConfig, build_tiny


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return str(build_tiny(TinyModelConfig(), tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture
def buffer_server():
    servers = []

    def start(**table):
        server = BufferServer(BufferConfig(timeout_s=5.0, table=TableConfig(**table))).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def make_group(version: int = 0, group_size: int = 4, length: int = 6, rewards=None, seed: int = 0,
               **meta) -> RolloutGroup:
    """A valid group with random tokens: 2 prompt tokens, then policy tokens."""
    rng = np.random.default_rng(seed)
    rewards = rng.random(group_size) if rewards is None else rewards
    rows = []
    for g in range(group_size):
        n = length - (g % 2)  # rows of different lengths exercise the padding
        mask = [0, 0] + [1] * (n - 2)
        rows.append({"tokens": rng.integers(3, 19, n).tolist(), "loss_mask": mask,
                     "behaviour_logprobs": [-float(rng.random()) * m for m in mask],
                     "reward": float(rewards[g]), "turn_rewards": [float(rewards[g])], "error": "",
                     "version_first": version, "version_last": version})
    return RolloutGroup.from_rows(rows, **meta)

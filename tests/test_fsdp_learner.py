"""Two learner ranks sharded with FSDP2 over gloo compute the same gradient as one rank on
the whole batch: the loss is normalised over the global batch, not per rank or micro-batch."""
import faulthandler
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.weights import LocalWeightChannel
from learner.learner import Learner, TrainerConfig
from learner.loss import LossConfig
from tests.conftest import make_group


def groups():
    # Different lengths and rewards per group, so per-rank token counts differ.
    return [make_group(group_size=4, length=6 + 3 * i, seed=i, rewards=[i % 2, 1, 0, i / 3]) for i in range(4)]


def gradients(learner: Learner) -> dict:
    out = {}
    for name, p in learner.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().clone().numpy()
    return out


def trainer(world: int, micro_rows: int, micro_tokens: int = 0) -> TrainerConfig:
    return TrainerConfig(cpu_workers=world, batch_groups=4, micro_batch_rows=micro_rows, lr=1e-3,
                         max_grad_norm=1e9, dist_timeout_s=60, micro_batch_tokens=micro_tokens)


def _rank(rank, model_path, port, out_path, buffer_address, aggregation, micro_tokens):
    faulthandler.enable()   # a crash in C++ (once, in CI: SIGABRT) shows where Python was
    channel = LocalWeightChannel()
    # rank 0 holds rows of 6 and 9 tokens, rank 1 of 12 and 15: packed by a token budget, they
    # need different numbers of passes, and must still make the same number
    learner = Learner(rank, model_path, "float32", trainer(2, micro_rows=3, micro_tokens=micro_tokens),
                      LossConfig(aggregation=aggregation),
                      buffer_address,
                      5.0, channel, master_port=port)
    mine = groups()[rank * 2:(rank + 1) * 2]
    metrics = learner.train_on(mine, staleness=[rank, rank])
    grads = gradients(learner)
    weights = learner.publish() is not None and channel.poll(0)  # rank 0 sends the full weights
    if rank == 0:
        np.savez(out_path, **grads)
        torch.save({"metrics": metrics, "version": weights[0],
                    "weights": {k: np.array(v) for k, v in weights[1].items()}}, str(out_path) + ".pt")
    learner.close()


@pytest.mark.parametrize("aggregation, micro_tokens", [("token_mean", 0), ("seq_mean_token_mean", 0),
                                                      ("token_mean", 40)])
def test_invariance_two_sharded_ranks_match_one_rank_on_the_whole_batch(tiny_model_path, tmp_path, buffer_server,
                                                                       aggregation, micro_tokens):
    server = buffer_server()
    single = Learner(0, tiny_model_path, "float32", trainer(1, micro_rows=16), LossConfig(aggregation=aggregation),
                     "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    expected_metrics = single.train_on(groups(), staleness=[0, 0, 1, 1])
    expected = gradients(single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(tiny_model_path, port, tmp_path / "grads.npz", server.address, aggregation, micro_tokens), nprocs=2, join=True)
    got = np.load(tmp_path / "grads.npz")
    assert set(got.files) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    result = torch.load(str(tmp_path / "grads.npz") + ".pt", weights_only=False)
    for key in ("reward/mean", "staleness/mean", "staleness/max", "learner/tokens", "loss/policy"):
        assert result["metrics"][key] == pytest.approx(expected_metrics[key], rel=1e-4), key
    # The published full weights are the single rank's weights after the same step.
    assert result["version"] == 1 and server.table.learner_version == 1  # the buffer heard of it
    for name, p in single.model.named_parameters():
        # Adam turns a gradient difference of float rounding into ~1e-6 steps where the gradient is ~0
        np.testing.assert_allclose(result["weights"][name], p.detach().numpy(), rtol=1e-4, atol=1e-5)

"""Two learner ranks sharded with FSDP2 over gloo compute the same gradient as one rank on
the whole batch: the loss is normalised over the global batch, not per rank or micro-batch."""
import faulthandler

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.weights import LocalWeightChannel
from learner import fsdp
from learner.learner import Learner, TrainerConfig
from learner.loss import LossConfig
from common.rendezvous import RendezvousHost
from tests.conftest import end_rank, make_group


def groups():
    # Different lengths and rewards per group, so per-rank token counts differ.
    return [make_group(group_size=4, length=6 + 3 * i, seed=i, rewards=[i % 2, 1, 0, i / 3]) for i in range(4)]


def gradients(learner: Learner) -> dict:
    """This rank's gradients: the local shards when sharded (dim 0, in rank order), read
    without a collective, so that the check does not go through the learner's own gather."""
    return {name: fsdp.local(p.grad).detach().clone().numpy() for name, p in learner.model.named_parameters()}


def trainer(world: int, micro_rows: int, micro_tokens: int = 0, max_grad_norm: float = 1e9) -> TrainerConfig:
    return TrainerConfig(cpu_workers=world, batch_groups=4, micro_batch_rows=micro_rows, lr=1e-3,
                         max_grad_norm=max_grad_norm, dist_timeout_s=60, micro_batch_tokens=micro_tokens)


def _rank(rank, model_path, rendezvous, out_path, buffer_address, aggregation, micro_tokens, max_grad_norm):
    faulthandler.enable()   # a crash in C++ shows where Python was (a SIGABRT in CI showed none: end_rank)
    channel = LocalWeightChannel()
    # rank 0 holds rows of 6 and 9 tokens, rank 1 of 12 and 15: packed by a token budget, they
    # need different numbers of passes, and must still make the same number
    learner = Learner(rank, model_path, "float32", trainer(2, micro_rows=3, micro_tokens=micro_tokens, max_grad_norm=max_grad_norm),
                      LossConfig(aggregation=aggregation),
                      buffer_address,
                      5.0, channel, rendezvous)
    mine = groups()[rank * 2:(rank + 1) * 2]
    metrics = learner.train_on(mine, staleness=[rank, rank])
    grads = gradients(learner)
    weights = learner.publish() is not None and channel.poll(0)  # rank 0 sends the full weights
    np.savez(f"{out_path}.{rank}.npz", **grads)
    if rank == 0:
        torch.save({"metrics": metrics, "version": weights[0],
                    "weights": {k: np.array(v) for k, v in weights[1].items()}}, str(out_path) + ".pt")
    learner.close()
    end_rank()


# The middle case clips the gradient (its norm is far above 1e-2): the sharded norm must be the
# whole model's, so that both scale their gradients alike.
@pytest.mark.parametrize("aggregation, micro_tokens, max_grad_norm", [("token_mean", 0, 1e9),
                                                                     ("seq_mean_token_mean", 0, 1e-2),
                                                                     ("token_mean", 40, 1e9)])
def test_invariance_two_sharded_ranks_match_one_rank_on_the_whole_batch(tiny_model_path, tmp_path, buffer_server,
                                                                       aggregation, micro_tokens, max_grad_norm):
    server = buffer_server()
    single = Learner(0, tiny_model_path, "float32", trainer(1, micro_rows=16, max_grad_norm=max_grad_norm),
                     LossConfig(aggregation=aggregation),
                     "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    expected_metrics = single.train_on(groups(), staleness=[0, 0, 1, 1])
    expected = gradients(single)
    host = RendezvousHost("127.0.0.1")
    mp.spawn(_rank, args=(tiny_model_path, host.rendezvous(), tmp_path / "grads.npz", server.address, aggregation, micro_tokens,
                                max_grad_norm), nprocs=2, join=True)
    shards = [np.load(f"{tmp_path / 'grads.npz'}.{rank}.npz") for rank in (0, 1)]
    assert set(shards[0].files) == set(shards[1].files) == set(expected)
    for name in expected:
        got = np.concatenate([shards[0][name], shards[1][name]])
        np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    result = torch.load(str(tmp_path / "grads.npz") + ".pt", weights_only=False)
    if max_grad_norm < 1:
        assert expected_metrics["learner/grad_norm"] > 10 * max_grad_norm   # the clip acted
    for key in ("reward/mean", "staleness/mean", "staleness/max", "learner/tokens", "loss/policy", "learner/grad_norm"):
        assert result["metrics"][key] == pytest.approx(expected_metrics[key], rel=1e-4), key
    # The published full weights are the single rank's weights after the same step.
    assert result["version"] == 1 and server.table.learner_version == 1  # the buffer heard of it
    for name, p in single.model.named_parameters():
        # Adam turns a gradient difference of float rounding into ~1e-6 steps where the gradient is ~0
        np.testing.assert_allclose(result["weights"][name], p.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_the_full_weights_gather_unpacks_each_rank_as_torch_chunk_split_it(world):
    for n in range(0, 30):
        split = [c.shape[0] for c in torch.chunk(torch.empty(n), world)] if n else []
        assert [fsdp._rows(n, r, world) for r in range(world)] == split + [0] * (world - len(split))


def _gather_rank(rank, model_path, rendezvous, out_path):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    faulthandler.enable()
    rendezvous.join("gloo", rank, 2, timeout_s=60)
    try:
        model = fsdp.shard(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), "cpu", 2)
        oracle = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        whole = fsdp.full_state_dict(model, True)
        cast = fsdp.full_state_dict(model, True, torch.bfloat16, bucket_bytes=1024)   # many buckets
        if rank == 0:
            torch.save({"oracle": oracle, "whole": whole, "cast": cast}, out_path)
        else:
            assert whole == {} and cast == {}
    finally:
        dist.destroy_process_group()
    end_rank()


def test_the_full_weights_gathered_in_buckets_equal_torchs_full_state_dict_cast_where_they_live(tiny_model_path,
                                                                                                tmp_path):
    host = RendezvousHost("127.0.0.1")
    mp.spawn(_gather_rank, args=(tiny_model_path, host.rendezvous(), tmp_path / "state.pt"), nprocs=2, join=True)
    got = torch.load(tmp_path / "state.pt")
    oracle = got["oracle"]
    assert got["whole"].keys() == got["cast"].keys() == oracle.keys()
    for key, value in oracle.items():
        assert torch.equal(got["whole"][key], value), key
        assert got["cast"][key].dtype == torch.bfloat16 and torch.equal(got["cast"][key], value.bfloat16()), key

"""Learner faults and the settings that would cause them: a failing rank is named at once,
settings that deadlock or time out in the wrong place are refused at start, and the learner
scores tokens without dropout noise."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from buffer.client import BufferClient
from common.config import ConfigError
from common.weights import LocalWeightChannel
from launch import cluster
from launch.config import build_config
from launch.models import TinyModelConfig, build_tiny
from learner.batch import make_batch, token_logprobs
from learner.learner import Learner, TrainerConfig
from learner.loss import LossConfig
from tests.conftest import make_group

ROOT = Path(__file__).resolve().parent.parent


class FailsOnRankOne(Learner):
    """Rank 1 raises as its step begins; rank 0 samples, trains and waits for it in a collective."""

    def step(self) -> dict:
        if self.rank == 1:
            raise RuntimeError("fault injected on purpose in rank 1")
        return super().step()


@pytest.fixture(scope="module")
def local_ray():
    # Ray workers import this module to build FailsOnRankOne.
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield
    ray.shutdown()


def test_a_failing_rank_is_named_at_once_not_after_the_collective_deadline(local_ray, tiny_model_path,
                                                                           buffer_server):
    server = buffer_server()
    client = BufferClient(server.address)
    client.insert(make_group(seed=0))  # rank 0's share of the batch; rank 1 never asks for its own
    client.close()
    config = build_config("async_grpo", "tiny", ["trainer.cpu_workers=2", "trainer.batch_groups=2",
                                                 "trainer.sample_timeout_s=60", "trainer.dist_timeout_s=120"])
    weights = cluster.start_weight_channel(config, None)  # Ray's object store: rank 0 never gets to publish
    remote = ray.remote(FailsOnRankOne).options(num_cpus=1)
    rendezvous = cluster.start_rendezvous(config, None)
    ranks = [remote.remote(rank, tiny_model_path, "float32", config.trainer, config.loss, server.address, 5.0,
                           weights, rendezvous) for rank in range(2)]
    try:
        ray.get([r.__ray_ready__.remote() for r in ranks], timeout=120)
        t = time.monotonic()
        with pytest.raises(cluster.PeerError, match=r"learner rank 1 failed(.|\n)*fault injected on purpose"):
            cluster.learner_step(ranks, {}, timeout_s=15)
        assert time.monotonic() - t < 5, "rank 0's collective deadline (120 s) must not delay the report"
    finally:
        for r in ranks:
            ray.kill(r)


class MeetsAgain(Learner):
    def new_group_sum(self) -> float:
        """A group formed after start-up reads the rendezvous store again (as NCCL's lazily built
        communicators do)."""
        group = torch.distributed.new_group([0, 1])
        one = torch.ones(1)
        torch.distributed.all_reduce(one, group=group)
        return one.item()


def test_the_rendezvous_store_outlives_the_launchers_reference_while_the_ranks_live(local_ray, tiny_model_path,
                                                                                    buffer_server):
    config = build_config("async_grpo", "tiny", ["trainer.cpu_workers=2", "trainer.batch_groups=2"])
    weights = cluster.start_weight_channel(config, None)
    rendezvous = cluster.start_rendezvous(config, None)
    remote = ray.remote(MeetsAgain).options(num_cpus=1)
    ranks = [remote.remote(rank, tiny_model_path, "float32", config.trainer, config.loss, buffer_server().address,
                           5.0, weights, rendezvous) for rank in range(2)]
    del rendezvous   # the ranks' references alone keep the store's actor (the launcher's ends with the run)
    try:
        ray.get([r.__ray_ready__.remote() for r in ranks], timeout=120)
        time.sleep(2)   # time for Ray to end an actor nobody refers to
        assert ray.get([r.new_group_sum.remote() for r in ranks], timeout=60) == [2.0, 2.0]
    finally:
        for r in ranks:
            ray.kill(r)


def test_a_collective_deadline_within_the_sample_wait_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="sample_timeout_s") as info:
        build_config("async_grpo", "tiny", ["trainer.sample_timeout_s=600", "trainer.dist_timeout_s=600"])
    assert info.value.key == "trainer.dist_timeout_s"
    defaults = build_config("async_grpo", "tiny").trainer
    assert defaults.dist_timeout_s > defaults.sample_timeout_s


def test_a_step_deadline_within_the_sample_wait_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="trainer.sample_timeout_s") as info:
        build_config("async_grpo", "tiny", ["trainer.sample_timeout_s=900", "trainer.dist_timeout_s=1000",
                                            "run.step_timeout_s=900"])
    assert info.value.key == "run.step_timeout_s"


@pytest.mark.parametrize("overrides, key", [
    (["buffer.table.rate_limiter=queue", "buffer.table.max_size=2", "trainer.batch_groups=8"], "buffer.table.max_size"),
    (["buffer.table.max_size=4", "trainer.batch_groups=16", "trainer.cpu_workers=2"], "buffer.table.max_size"),
    (["buffer.table.max_size=4", "buffer.table.min_size_to_sample=5"], "buffer.table.min_size_to_sample"),
])
def test_a_table_smaller_than_what_one_learner_rank_samples_is_refused(overrides, key):
    with pytest.raises(ConfigError, match="must (be|lie)") as info:
        build_config("async_grpo", "tiny", overrides)
    assert info.value.key == key


def test_a_table_that_holds_one_rank_sample_is_accepted():
    # Each of the 2 ranks samples 8 // 2 = 4 groups; the queue holds 4.
    build_config("async_grpo", "tiny", ["buffer.table.rate_limiter=queue", "buffer.table.max_size=4",
                                        "trainer.batch_groups=8", "trainer.cpu_workers=2"])


def test_cli_refuses_back_pressure_that_would_deadlock_before_starting_ray(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch", "async_grpo", "--config", "tiny",
                             "buffer.table.rate_limiter=queue", "buffer.table.max_size=2", "trainer.batch_groups=8",
                             f"run.dir={tmp_path}/r"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "'buffer.table.max_size'" in result.stderr and "trainer.batch_groups" in result.stderr
    assert "Ray" not in result.stdout + result.stderr and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def dropout_model_path(tmp_path_factory) -> str:
    path = build_tiny(TinyModelConfig(), tmp_path_factory.mktemp("tiny-dropout"), seed=0)
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.5
    config.save_pretrained(path)
    return str(path)


def eval_logprobs(model_path: str, batch) -> torch.Tensor:
    """log pi(token t+1 | tokens <= t) [B, T-1] from a plain HF forward in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits / batch.temperature, dim=-1)
    return logprobs.gather(-1, batch.tokens[:, 1:, None])[..., 0]


def test_learner_scores_tokens_without_dropout_noise_and_still_trains(dropout_model_path):
    assert AutoConfig.from_pretrained(dropout_model_path).attention_dropout == 0.5
    groups = [make_group(group_size=4, length=8, seed=i, rewards=[0, 1, 0, 1]) for i in range(2)]
    learner = Learner(0, dropout_model_path, "float32", TrainerConfig(batch_groups=2, lr=1e-2),
                      LossConfig(), "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    batch = make_batch(groups)
    start, first = token_logprobs(learner.model, batch)
    _, second = token_logprobs(learner.model, batch)
    expected = eval_logprobs(dropout_model_path, batch)                             # [B, T-1]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first.detach(), expected[:, start:], rtol=1e-5, atol=1e-5)

    # As if the actors had sampled with these very weights: the step's importance weights are 1.
    for i, g in enumerate(groups):
        g.behaviour_logprobs[:, 1:] = expected[4 * i:4 * (i + 1)].numpy() * g.loss_mask[:, 1:]
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics = learner.train_on(groups, staleness=[0, 0])
    assert metrics["loss/kl_behaviour"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    changed = [n for n, p in learner.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "a training step must still change the weights"

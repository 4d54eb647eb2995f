"""GPU runs of the whole system: the learner on GPUs (FSDP2 over NCCL with two), actors on a
GPU. Skipped where CUDA is absent (CI); run on the lent GPU machine (docs/benchmarks.md)."""
import importlib.util
import subprocess
import sys

import pytest
import torch
import yaml

from common.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def launch(run_dir, *args):
    result = subprocess.run([sys.executable, "-m", "launch", "async_grpo", "--config", "tiny",
                             f"run.dir={run_dir}", "run.wandb=disabled", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(run_dir)


def learns(metrics):
    first = sum(m["reward/mean"] for m in metrics[:3]) / 3
    last = sum(m["reward/mean"] for m in metrics[-5:]) / 5
    return first < 0.4 and last > 0.9 and metrics[-1]["weights/version"] == len(metrics)


def test_learner_on_every_gpu_trains_the_tiny_model(tmp_path):
    gpus = min(torch.cuda.device_count(), 2)
    metrics = launch(tmp_path, "--actors", "2", "--learner-gpus", str(gpus), f"trainer.batch_groups={4 * gpus}")
    assert learns(metrics), [round(m["reward/mean"], 2) for m in metrics]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: one for the learner, one for the actor")
def test_actor_engine_on_a_gpu(tmp_path):
    metrics = launch(tmp_path, "--actors", "1", "--learner-gpus", "1", "actors.gpus_per_group=1")
    assert learns(metrics), [round(m["reward/mean"], 2) for m in metrics]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install -e '.[vllm]')")
def test_colocated_vllm_actor_and_learner_share_one_gpu_and_train_over_cuda_ipc(tmp_path):
    metrics = launch(tmp_path, "--actors", "1", "--learner-gpus", "1", "actors.engine=vllm", "actors.gpus_per_group=1",
                     "run.colocate=true", "model.dtype=bfloat16", "model.tiny.hidden_size=256",  # head_dim 64 for vLLM
                     "rollout.max_seq_len=256", "actors.gpu_memory_utilization=0.3", "actors.enforce_eager=true",
                     "actors.max_inflight_episodes=64", "eval.every=10", "eval.tasks=16")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["run"]["weight_transport"] == "ipc"
    assert config["actors"]["engine_process"] == "own"   # vLLM's frontend in a process of its own
    assert learns(metrics), [round(m["reward/mean"], 2) for m in metrics]
    evals = read_metrics(tmp_path, kind="eval")
    assert evals[-1]["step"] == len(metrics) and evals[-1]["eval/version_first"] >= len(metrics)
    assert evals[0]["eval/reward"] < evals[-1]["eval/reward"]


def _gpu_learner_figures(model_path, **trainer) -> list:
    from common.weights import LocalWeightChannel
    from learner.learner import Learner, TrainerConfig
    from learner.loss import LossConfig
    from tests.conftest import make_group

    config = TrainerConfig(gpus=1, batch_groups=2, micro_batch_rows=4, minibatches=2, lr=1e-3, **trainer)
    learner = Learner(0, model_path, "bfloat16", config, LossConfig(entropy_coef=0.01),
                      "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    try:
        out = []
        for step in range(3):
            groups = [make_group(group_size=4, length=24, seed=10 * step + i, rewards=[i, 1, 0, 0.5]) for i in range(2)]
            metrics = learner.train_on(groups, [0, 0])
            out.append([metrics[k] for k in ("loss/policy", "learner/grad_norm", "loss/entropy")])
        return out
    finally:
        learner.close()


def test_compiled_blocks_and_the_chunked_head_train_as_the_plain_learner_on_a_gpu(tiny_model_path):
    plain = _gpu_learner_figures(tiny_model_path, logprob_chunk=0)
    fast = _gpu_learner_figures(tiny_model_path, logprob_chunk=16, compile=True)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-2, atol=2e-3)   # bf16 both


def _gather_on_one_gpu(rank, model_path, out_path):
    import datetime

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from learner import fsdp

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = fsdp.shard(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda(), "cuda", 1,
                           torch.bfloat16)
        held = {k: fsdp.local(v).detach().to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}
        on_gpu = fsdp.full_state_dict(model, True, torch.bfloat16, "cuda", bucket_bytes=4096)
        on_host = fsdp.full_state_dict(model, True, torch.bfloat16, "cpu")
        torch.save({"held": held, "gpu_devices": {v.device.type for v in on_gpu.values()},
                    "on_gpu": {k: v.cpu() for k, v in on_gpu.items()}, "on_host": on_host}, out_path)
    finally:
        dist.destroy_process_group()


def test_a_one_rank_gpu_learners_full_weights_come_cast_on_the_gpu_or_on_the_host(tiny_model_path, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_on_one_gpu, args=(tiny_model_path, tmp_path / "state.pt"), nprocs=1, join=True)
    got = torch.load(tmp_path / "state.pt")
    assert got["gpu_devices"] == {"cuda"}
    assert got["on_gpu"].keys() == got["on_host"].keys() == got["held"].keys()
    for key, value in got["held"].items():
        assert torch.equal(got["on_gpu"][key], value) and torch.equal(got["on_host"][key], value), key
        assert got["on_host"][key].device.type == "cpu" and value.dtype == torch.bfloat16

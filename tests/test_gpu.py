"""GPU runs of the whole system: the learner on GPUs (FSDP2 over NCCL with two), actors on a
GPU. Skipped where CUDA is absent (CI); run on the lent GPU machine (docs/benchmarks.md)."""
import subprocess
import sys

import pytest
import torch

from common.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def launch(run_dir, *args):
    result = subprocess.run([sys.executable, "-m", "launch", "async_grpo", "--config", "tiny",
                             f"run.dir={run_dir}", *args], capture_output=True, text=True, timeout=600)
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

"""GPU telemetry through NVML: nothing, and no error, without a GPU; real readings with one."""
import pytest
import torch

from common import telemetry


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_telemetry_is_empty_and_raises_nothing(monkeypatch):
    assert telemetry.sample("learner") == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert telemetry.sample("actor0") == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_with_a_gpu_each_visible_one_reports_utilization_memory_and_power(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    x = torch.ones(1 << 28, device="cuda")   # 1 GiB in use by this process
    readings = telemetry.sample("learner")
    assert 0 <= readings["learner/gpu0/util"] <= 100 and readings["learner/gpu0/mem_gb"] >= 1.0
    assert "learner/gpu1/util" not in readings
    del x

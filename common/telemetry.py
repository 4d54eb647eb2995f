"""GPU telemetry through NVML (the nvidia-ml-py package, module `pynvml`): utilization, memory
used and power of the GPUs this process may use (CUDA_VISIBLE_DEVICES, as Ray sets it for each
actor and learner rank). Each part samples its own; on a machine without a GPU, or without NVML,
`sample` returns {} and never raises.
"""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_state: dict = {}   # "nvml": the module once initialised, or None when NVML is not there


def _nvml():
    with _lock:
        if "nvml" not in _state:
            try:
                import pynvml
                pynvml.nvmlInit()
                _state["nvml"] = pynvml
            except Exception:  # no package, no driver, no GPU: no telemetry
                _state["nvml"] = None
        return _state["nvml"]


def visible_handles(nvml) -> list:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES shows this process (indices or UUIDs),
    in CUDA's order; every GPU when it is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for token in (t.strip() for t in visible.split(",") if t.strip()):
        try:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(token) if token.startswith(("GPU-", "MIG-"))
                           else nvml.nvmlDeviceGetHandleByIndex(int(token)))
        except Exception:  # a token NVML does not know: CUDA ignores the rest of the list too
            break
    return handles


def sample(prefix: str) -> dict:
    """{f"{prefix}/gpu{i}/util": percent, .../mem_gb, .../power_w} for every visible GPU i;
    {} without a GPU or NVML."""
    nvml = _nvml()
    if nvml is None:
        return {}
    out = {}
    try:
        handles = visible_handles(nvml)
    except Exception:
        return {}
    for i, handle in enumerate(handles):
        for name, read in (("util", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                           ("mem_gb", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30),
                           ("power_w", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000)):
            try:
                out[f"{prefix}/gpu{i}/{name}"] = round(float(read(handle)), 2)
            except Exception:  # a reading this GPU does not offer (power on some boards)
                pass
    return out

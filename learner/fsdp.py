"""FSDP2 for Hugging Face causal LMs: shard each decoder block, then the root."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def decoder_blocks(model: torch.nn.Module) -> list:
    """The repeated blocks, found by the class names the model declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its blocks to shard")
    return blocks


def shard(model: torch.nn.Module, device_type: str, world_size: int) -> torch.nn.Module:
    mesh = init_device_mesh(device_type, (world_size,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict:
    """Full (unsharded) weights on CPU. A collective when sharded: every rank must call it;
    only rank 0 receives the tensors."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

"""FSDP2 for Hugging Face causal LMs: shard each decoder block, then the root."""
from __future__ import annotations

import functools

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


def decoder_blocks(model: torch.nn.Module) -> list:
    """The repeated blocks, found by the class names the model declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its blocks to shard")
    return blocks


def shard(model: torch.nn.Module, device_type: str, world_size: int, compute_dtype: torch.dtype | None = None):
    """fully_shard each block, then the root. With a compute dtype other than the weights',
    the blocks run in it (weights cast when gathered) and gradients are reduced in the
    weights' own dtype."""
    mesh = init_device_mesh(device_type, (world_size,))
    master = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy() if compute_dtype in (None, master) else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=master)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def checkpoint_activations(model: torch.nn.Module, blocks: list | None = None) -> None:
    """Recompute every decoder block's activations in the backward pass (torch's checkpoint:
    the recomputation runs under the forward's autocast). The checkpoint wraps each block's
    forward inside its module call, so FSDP's hooks (which gather the block's weights) stay
    outside it and run again for the recomputation. `blocks`: other than the model's
    declared ones (Megatron's layers)."""
    for block in decoder_blocks(model) if blocks is None else blocks:
        block.forward = functools.partial(_recomputed, block.forward)


def compile_blocks(model: torch.nn.Module, blocks: list | None = None) -> None:
    """torch.compile every decoder block in place (the module stays itself, so FSDP2 shards it
    and its hooks run around the compiled forward). `blocks`: other than the model's declared ones."""
    for block in decoder_blocks(model) if blocks is None else blocks:
        block.compile()


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # no backward to come (the proximal and reference passes)
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's own storage: the local shard of a DTensor (the whole tensor on one rank)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict:
    """Full (unsharded) weights on CPU. A collective when sharded: every rank must call it;
    only rank 0 receives the tensors."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

"""FSDP2 for Hugging Face causal LMs: shard each decoder block, then the root."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

GATHER_BUCKET_BYTES = 256 << 20
"""Largest flat buffer a rank sends in one gather of the full weights."""


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


def full_state_dict(model: torch.nn.Module, sharded: bool, dtype: torch.dtype | None = None, device="cpu",
                    bucket_bytes: int = GATHER_BUCKET_BYTES) -> dict:
    """Full (unsharded) weights on `device`, floating-point ones cast to `dtype` (None: as
    held) where they live, before they travel. A collective when sharded: every rank must call
    it; only rank 0 receives the tensors ({} elsewhere). The shards travel packed in flat
    buckets of one dtype, one plain gather to rank 0 each, where torch's full state dict makes
    an all-gather of every tensor on every rank through functional collectives (one of which
    crashed a gloo rank in CI with SIGSEGV) and casts on the host."""
    state = model.state_dict()
    if not sharded:
        return {k: _cast(v.detach(), dtype, device) for k, v in state.items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    full, first_key, shards = {}, {}, {}
    for key, value in state.items():
        if id(value) in first_key:      # tied weights: gathered once
            continue
        first_key[id(value)] = key
        if not isinstance(value, DTensor):
            full[key] = _cast(value.detach(), dtype, device)
        elif value.placements != (Shard(0),):
            raise ValueError(f"{key} is placed {value.placements}; only FSDP2's Shard(0) is gathered")
        else:
            shards[key] = value
    for bucket in _buckets(shards, dtype, bucket_bytes, world):
        flat = _pack(bucket, dtype, rank, world)
        if world == 1:
            received = [flat]
        else:
            received = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
            dist.gather(flat, received, dst=0)
        if rank == 0:
            full.update(_unpack(bucket, [r.to(device) for r in received], world))
    if rank != 0:
        return {}
    return {key: full[first_key[id(value)]] for key, value in state.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    return tensor.to(device, dtype if dtype is not None and tensor.is_floating_point() else None)


def _rows(n: int, rank: int, world: int) -> int:
    """Rows of a dim-0 size n that FSDP2 gives this rank: torch.chunk's split (the last ranks
    may get fewer or none)."""
    chunk = -(-n // world)
    return max(0, min(n - rank * chunk, chunk))


def _slot(value: torch.Tensor, world: int) -> int:
    """Elements every rank reserves for this tensor in a bucket: its largest shard."""
    n = value.shape[0]
    return -(-n // world) * (value.numel() // n) if n else 0


def _buckets(shards: dict, dtype: torch.dtype | None, bucket_bytes: int, world: int) -> list:
    """Lists of (key, DTensor), one dtype each as sent, of at most bucket_bytes a rank (or one
    tensor)."""
    def sent(value):
        return dtype or value.dtype
    buckets, current, size = [], [], 0
    for key, value in sorted(shards.items(), key=lambda kv: str(sent(kv[1]))):
        nbytes = _slot(value, world) * sent(value).itemsize
        if current and (sent(current[0][1]) != sent(value) or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append((key, value))
        size += nbytes
    return buckets + [current] if current else buckets


def _pack(bucket: list, dtype: torch.dtype | None, rank: int, world: int) -> torch.Tensor:
    """This rank's shards of the bucket, cast to dtype, each at the start of its slot."""
    local = [value.to_local().detach() for _, value in bucket]
    flat = torch.zeros(sum(_slot(v, world) for _, v in bucket), dtype=dtype or local[0].dtype, device=local[0].device)
    offset = 0
    for (key, value), shard in zip(bucket, local):
        if shard.shape[0] != _rows(value.shape[0], rank, world):
            raise RuntimeError(f"{key}: rank {rank} holds {shard.shape[0]} of {value.shape[0]} rows, "
                               f"not torch.chunk's {_rows(value.shape[0], rank, world)}")
        flat[offset:offset + shard.numel()] = shard.reshape(-1)
        offset += _slot(value, world)
    return flat


def _unpack(bucket: list, received: list, world: int) -> dict:
    """The full tensors, from every rank's packed buffer (rank 0)."""
    out, offset = {}, 0
    for key, value in bucket:
        per_row = value.numel() // value.shape[0] if value.shape[0] else 0
        pieces = [received[r][offset:offset + _rows(value.shape[0], r, world) * per_row] for r in range(world)]
        # one rank: a view of the bucket (no copy)
        out[key] = (pieces[0] if world == 1 else torch.cat(pieces)).view(value.shape)
        offset += _slot(value, world)
    return out


def clip_grad_norm(parameters, max_norm: float, sharded: bool) -> float:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm
    before. Sharded, each rank sums the squares of its own shards and one all-reduce adds
    them (torch's clip_grad_norm_ on DTensors goes through functional collectives); otherwise
    each rank's gradients are the whole model's (one rank, or Megatron's replicas)."""
    grads = [local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.stack([g.detach().float().square().sum() for g in grads]).sum()
    if sharded:
        dist.all_reduce(squares)
    norm = squares.sqrt()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].dtype))
    return float(norm)

"""Learner checkpoints: sharded saves with torch.distributed.checkpoint, resumed exactly.

A checkpoint is a folder `<run.dir>/checkpoints/step-<N>/`: the model and optimizer state
through DCP (each rank writes its shards; one rank's world or two, the same call), plus one
`rank-<r>.pt` per rank with what DCP does not hold: the learner step, the policy version, the
LR schedule and the RNG states. A folder is written as `step-<N>.partial` and renamed when
complete, so a run killed while saving leaves the previous checkpoint as the newest. A learner
restored from step N and fed the same batches computes the same losses, bit for bit, as one
that never stopped (tests/test_checkpoint.py).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PREFIX = "step-"


def save(learner, folder: Path, keep: int = 2) -> Path:
    """Write the learner's state as `folder/step-<step>` (every rank calls it together) and
    keep only the newest `keep` checkpoints; returns the checkpoint's path."""
    folder = Path(folder)
    final = folder / f"{PREFIX}{learner.step_count}"
    partial = final.with_name(final.name + ".partial")
    model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    torch.save(_extras(learner), partial / f"rank-{learner.rank}.pt")
    if learner.distributed:
        dist.barrier()  # every rank's files are in place
    if learner.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    if learner.distributed:
        dist.barrier()
    return final


def restore(learner, path: Path) -> None:
    """Load a checkpoint written by save() into the learner (every rank calls it together)."""
    path = Path(path)
    model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(learner.model, learner.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extras = torch.load(path / f"rank-{learner.rank}.pt", weights_only=False)
    learner.step_count, learner.version = extras["step"], extras["version"]
    learner.scheduler.load_state_dict(extras["scheduler"])
    torch.set_rng_state(extras["rng"]["torch"])
    if extras["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(extras["rng"]["cuda"])
    random.setstate(extras["rng"]["python"])
    np.random.set_state(extras["rng"]["numpy"])


def save_hf(state: dict, model_path: str, out) -> None:
    """Write full weights (a state dict) with model_path's config and tokenizer as a Hugging
    Face folder that transformers and vLLM load."""
    config = AutoConfig.from_pretrained(model_path)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    if unexpected or set(missing) - tied:   # a tied head may come as the embedding alone
        raise ValueError(f"weights do not fit {model_path}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    plain.tie_weights()
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def export(path: Path, model_path: str, out) -> None:
    """A checkpoint's weights (saved by any number of ranks, either backend) as a Hugging Face
    folder, in one process (a Megatron checkpoint needs no megatron-core: its names are
    converted)."""
    path = Path(path)
    if backend(path) == "megatron":
        from learner import megatron

        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        weights = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                   for k, m in meta.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        state = {"model": weights}
        dcp.load(state, checkpoint_id=str(path))
        gpt = {k.removeprefix("gpt."): v for k, v in state["model"].items()}
        save_hf(megatron.to_hugging_face(gpt, AutoConfig.from_pretrained(model_path).get_text_config()),
                model_path, out)
        return
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    save_hf(state["model"], model_path, out)


def backend(path: Path) -> str:
    """The learner backend that wrote a checkpoint (fsdp2 for those written before it was recorded)."""
    return torch.load(Path(path) / "rank-0.pt", weights_only=False).get("backend", "fsdp2")


def checkpoints(folder: Path) -> list:
    """Complete checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def _extras(learner) -> dict:
    return {"step": learner.step_count, "version": learner.version, "scheduler": learner.scheduler.state_dict(),
            "backend": learner.config.backend,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                    "python": random.getstate(), "numpy": np.random.get_state()}}

"""Learner throughput and MFU on one GPU: asyncrl's Learner.train_on (bf16 compute, fp32 master
weights and AdamW) on Qwen2-0.5B / -1.5B-shaped models with random weights, at 4k-token rows,
for each backend (FSDP2 over the Hugging Face model; Megatron-core's GPTModel, where
megatron-core is installed), plus the time to gather and publish all weights.

  python -m bench.learner_bench --models 0.5b 1.5b --backends fsdp2 megatron --out $OUT/learner_bench.json

Each step is what the learner does per sampled batch: forward and backward per micro-batch
(packed by trainer.micro_batch_tokens), gradient clipping and the optimizer step; with one update
a batch (the default, trainer.minibatches x epochs = 1) the training forward gives the proximal
log-probs, otherwise a no-grad pass comes first. Model FLOPs of one forward pass per token
(learner/flops.py): 2 x the matmul weights (embedding lookup excluded), 2 x 2 x layers x
attention width x context / 2 for causal scores and values, and 2 x hidden x vocabulary for the
projection, counted only at the positions the learner computes (it skips the prompt's). A step
is 3 such passes (forward, backward as two), 4 with the proximal forward; the bench takes the
step's FLOPs from the learner's own count (learner/tflops x learner/train_s; the passes it
implies are forward_passes in the results). MFU = FLOPs / (seconds x the device's dense bf16
peak); recomputation under activation checkpointing is not counted (work, not model FLOPs).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learner import flops  # noqa: E402

def peak_flops(name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    value = flops.peak(name)
    if value is None:
        raise SystemExit(f"unknown peak for {name!r}: pass --peak-tflops")
    return value


def make_groups(rows: int, prompt: int, length: int, vocab: int, group_size: int = 8):
    import numpy as np

    from common.rollout import RolloutGroup

    rng = np.random.default_rng(0)
    groups = []
    for g in range(rows // group_size):
        out = []
        for r in range(group_size):
            tokens = rng.integers(0, vocab, length).tolist()
            out.append({"tokens": tokens, "loss_mask": [0] * prompt + [1] * (length - prompt),
                        "behaviour_logprobs": [0.0] * prompt + (-rng.random(length - prompt) * 3).tolist(),
                        "token_versions": [-1] * prompt + [0] * (length - prompt), "reward": float(r % 2),
                        "turn_rewards": [float(r % 2)], "error": ""})
        groups.append(RolloutGroup.from_rows(out, prompt_id=str(g), temperature=1.0))
    return groups


VARIANTS = {   # trainer settings compared: the plain logits, the chunked log-prob head, and compiled blocks
    "plain": dict(logprob_chunk=0),
    "chunked": dict(logprob_chunk=4096),
    "compiled": dict(logprob_chunk=4096, compile=True),
}


def profile(learner, groups, path: str) -> None:
    """One more step under torch.profiler; its kernels by GPU time, to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        learner.train_on(groups, [0] * len(groups))
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60))


def bench_one(shape: str, backend: str, args, peak: float) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.actor_bench import write_config
    from buffer.server import BufferConfig, BufferServer
    from common.weights import LocalWeightChannel
    from learner.learner import Learner, TrainerConfig
    from learner.loss import LossConfig

    folder = write_config(os.path.join(args.work, shape), shape)
    cfg = AutoConfig.from_pretrained(folder)
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        torch.manual_seed(0)
        with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on CPU
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
    results = {}
    buffer = BufferServer(BufferConfig()).start()  # publish() tells the buffer the new version
    for ac, variant in [(ac, v) for ac in args.activation_checkpointing for v in args.variants]:
        name = f"{shape}_{backend}_ac{int(ac)}_{variant}"
        trainer = TrainerConfig(gpus=1, backend=backend, batch_groups=args.rows // 8, micro_batch_tokens=args.micro_tokens,
                                activation_checkpointing=bool(ac), lr=1e-6, max_steps=100, **VARIANTS[variant])
        t = time.monotonic()
        torch.cuda.reset_peak_memory_stats()
        learner = None
        groups = make_groups(args.rows, args.prompt, args.seq, cfg.vocab_size)
        try:
            learner = Learner(0, folder, "bfloat16", trainer, LossConfig(), buffer.address, 5.0, LocalWeightChannel())
            load_s = time.monotonic() - t
            times = []
            for step in range(args.warmup + args.steps):
                torch.cuda.synchronize()
                t = time.monotonic()
                metrics = learner.train_on(groups, [0] * len(groups))
                torch.cuda.synchronize()
                times.append(time.monotonic() - t)
            if args.profile_dir:
                profile(learner, groups, os.path.join(args.profile_dir, name + ".txt"))
            step_s = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]
            tokens = args.rows * args.seq
            trained = args.rows * (args.seq - args.prompt)        # positions with a vocabulary projection
            # the learner's own count of the step's model FLOPs (learner/tflops x its train_s): a
            # proximal forward only where it makes one (more than one update a batch), then
            # forward and backward (2x)
            step_flops = metrics["learner/tflops"] * 1e12 * metrics["learner/train_s"]
            passes = round(step_flops / flops.forward(cfg, [args.seq] * args.rows, trained))
            t = time.monotonic()
            learner.publish()                                      # gather the full weights to CPU, send
            publish_s = time.monotonic() - t
            results[name] = {
                "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s), "mfu": round(step_flops / step_s / peak, 4),
                "tflops": round(step_flops / step_s / 1e12, 1), "backend": backend, "rows": args.rows, "seq": args.seq,
                "micro_batch_tokens": args.micro_tokens, "activation_checkpointing": bool(ac), "variant": variant,
                "forward_passes": passes,
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "load_s": round(load_s, 1),
                "publish_s": round(publish_s, 3), "loss": metrics["loss/policy"], "steps_s": [round(x, 3) for x in times]}
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"out of memory: {str(e)[:200]}"}
        except Exception as e:   # one backend failing leaves the others' figures
            import traceback
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps({name: results[name]}), flush=True)
        if learner is not None:
            learner.close()
        del learner
        torch.cuda.empty_cache()
    buffer.stop()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["0.5b", "1.5b"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fsdp2 and/or megatron (default: both where megatron-core is installed)")
    parser.add_argument("--rows", type=int, default=32, help="rows per step (groups of 8)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row (not trained)")
    parser.add_argument("--micro-tokens", type=int, default=16384, help="trainer.micro_batch_tokens")
    parser.add_argument("--activation-checkpointing", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["plain", "chunked", "compiled"], choices=sorted(VARIANTS),
                        help="trainer settings to compare (see VARIANTS)")
    parser.add_argument("--profile-dir", help="write each case's kernel table (one profiled step) here")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "asyncrl-learner-bench"))
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device, args.peak_tflops)
    out = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "peak_tflops": peak / 1e12}
    from learner import megatron
    backends = args.backends or (["fsdp2", "megatron"] if megatron.available() else ["fsdp2"])
    for shape in args.models:
        for backend in backends:
            out.update(bench_one(shape, backend, args, peak))
    for shape in args.models:
        tag = shape.replace(".", "p")
        for backend in ("fsdp2", "megatron"):
            best = max((v for k, v in out.items() if k.startswith(f"{shape}_{backend}_ac") and "mfu" in v),
                       key=lambda v: v["mfu"], default=None)
            out[f"mfu_{backend}_{tag}"] = best and best["mfu"]   # None where not run or failed
            out[f"tokens_per_s_{backend}_{tag}"] = best and best["tokens_per_s"]
            if best is not None:
                out[f"publish_s_{backend}_{tag}"] = best["publish_s"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The learner: sample groups, take one clipped, importance-weighted policy-gradient step,
publish weights every `sync_every` steps.

One Learner per process (rank). With more than one rank the model is sharded with FSDP2
(gloo on CPU, NCCL on GPU), each rank samples its own share of the batch, and the loss is
normalised by the policy-token count of the whole global batch. `trainer.backend=megatron`
trains Megatron-core's GPTModel instead (learner/megatron.py, GPU only) with the same loss,
batches and checkpoints; weights leave it in Hugging Face names. Plain Python; launch/ runs
the ranks as Ray actors.
"""
from __future__ import annotations

import collections
import copy
import datetime
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from buffer.client import BufferClient
from common import telemetry
from common.config import check
from learner import checkpoint, flops, fsdp, logprob_head, megatron
from learner.batch import make_batch, token_logprobs
from learner.loss import LossConfig, policy_loss, token_weights
from common.rendezvous import Rendezvous


LR_SCHEDULES = ("constant", "cosine")
BACKENDS = ("fsdp2", "megatron")
MASTER_DTYPES = ("float32", "bfloat16", "float16")
CLOSE_BARRIER_S = 60.0   # how long close() waits for the other ranks


def lr_factor(config: "TrainerConfig", step: int) -> float:
    """The learning rate at optimizer step `step` (0-based), as a multiple of config.lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    total = config.max_steps * config.minibatches * config.epochs
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Learner steps to run (one sampled batch each)."""
    sync_every: int = 1
    """Publish weights to the actors every this many steps (version += 1 each time)."""
    publish_lag: int = 0
    """For off-policy experiments (bench/staleness_study.py): at version v the actors get the
    weights of version v - publish_lag (the initial ones until then), so every group is exactly
    that many versions old when the learner first can sample it. The learner keeps that many
    versions in host memory. 0: the actors get each version as it is made."""
    gpus: int = 0
    """Learner GPUs, one rank each (--learner-gpus); 0 trains on CPU."""
    backend: str = "fsdp2"
    """fsdp2: the Hugging Face model, sharded with FSDP2 (CPU or GPU). megatron: Megatron-core's
    GPTModel built from the same checkpoint (Qwen2 and Llama families; GPU only;
    `pip install -e '.[megatron]'`)."""
    tensor_parallel: int = 1
    """Megatron: ranks per model replica. Only 1 for now (see learner/megatron.py)."""
    cpu_workers: int = 1
    """Learner ranks when gpus=0; more than one shards the model with FSDP2 over gloo."""
    batch_groups: int = 8
    """Groups per optimizer step, over all ranks (a multiple of the rank count)."""
    micro_batch_rows: int = 8
    """Rows (completions) per forward/backward pass (when micro_batch_tokens is 0)."""
    micro_batch_tokens: int = 0
    """Padded tokens (rows x longest row) per forward/backward pass: rows are sorted by length
    and packed up to this budget, so short rows go many at a time and long ones few. Every
    rank makes the same number of passes (the largest any rank needs). 0: micro_batch_rows."""
    master_dtype: str = "float32"
    """Dtype of the learner's weights and optimizer state. The forward and backward passes run
    in model.dtype (bf16 mixed precision with model.dtype=bfloat16), the actors serve
    model.dtype, and gradients are reduced in master_dtype."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass instead of keeping
    them: less memory for long sequences, about a third more compute."""
    logprob_chunk: int = 4096
    """Positions projected onto the vocabulary at a time when taking token log-probs
    (learner/logprob_head.py: the [rows, positions, vocabulary] logits are never whole, and
    their backward recomputes each chunk). 0: the plain projection, all logits at once. Hugging
    Face models (trainer.backend=fsdp2) only."""
    compile: bool = False
    """torch.compile each decoder block (fuses its norms, rotary embedding, activation and
    residual adds; the first steps of each new batch shape pay the compilation)."""
    minibatches: int = 1
    """Optimizer steps per sampled batch, each on its share of the rows (PPO mini-batches)."""
    epochs: int = 1
    """Passes over the batch's mini-batches."""
    lr: float = 1e-6
    """Peak learning rate."""
    lr_schedule: str = "constant"
    """constant, or cosine: from lr down to min_lr_ratio x lr over the run's optimizer steps
    (max_steps x minibatches x epochs)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_nonfinite_updates: int = 3
    """Optimizer updates in a row whose gradient norm is inf or NaN that are skipped (the
    weights and optimizer state left as they were; counted in learner/skipped_updates) before
    the run fails naming the step. 0: fail at the first."""
    torch_threads: int = 1
    """Torch intra-op threads of each CPU learner rank."""
    sample_timeout_s: float = 600.0
    """How long one step waits for the buffer to hold enough fresh groups."""
    dist_timeout_s: float = 900.0
    """Deadline of every collective between learner ranks; longer than sample_timeout_s, since
    the other ranks wait in a collective while one waits for its batch."""
    checkpoint_every: int = 0
    """Save a checkpoint (learner/checkpoint.py) every this many learner steps and at the end;
    0 saves none."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are deleted."""
    export_final: bool = True
    """Save the final weights in Hugging Face format under <run.dir>/final."""

    @property
    def world_size(self) -> int:
        return self.gpus if self.gpus > 0 else self.cpu_workers

    def validate(self):
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.sync_every >= 1, "sync_every", f"must be >= 1, got {self.sync_every}")
        check(self.gpus >= 0, "gpus", f"must be >= 0, got {self.gpus}")
        check(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        check(self.tensor_parallel == 1, "tensor_parallel",
              f"must be 1 for now (tensor parallel above 1 is not built), got {self.tensor_parallel}")
        if self.backend == "megatron":
            check(self.gpus > 0, "backend", "megatron runs on GPUs only, and trainer.gpus is 0")
            check(megatron.available(), "backend",
                  "megatron needs megatron-core, which is not installed (pip install -e '.[megatron]')")
        check(self.cpu_workers >= 1, "cpu_workers", f"must be >= 1, got {self.cpu_workers}")
        check(self.batch_groups >= 1 and self.batch_groups % self.world_size == 0, "batch_groups",
              f"must be a positive multiple of the learner's {self.world_size} rank(s), got {self.batch_groups}")
        check(self.micro_batch_rows >= 1, "micro_batch_rows", "must be >= 1")
        check(self.logprob_chunk >= 0, "logprob_chunk", f"must be >= 0, got {self.logprob_chunk}")
        check(self.micro_batch_tokens >= 0, "micro_batch_tokens", f"must be >= 0, got {self.micro_batch_tokens}")
        check(self.master_dtype in MASTER_DTYPES, "master_dtype",
              f"must be one of {MASTER_DTYPES}, got {self.master_dtype!r}")
        check(self.minibatches >= 1, "minibatches", f"must be >= 1, got {self.minibatches}")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.publish_lag >= 0, "publish_lag", f"must be >= 0, got {self.publish_lag}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule",
              f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        check(0 <= self.warmup_steps, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        check(self.max_nonfinite_updates >= 0, "max_nonfinite_updates", f"must be >= 0, got {self.max_nonfinite_updates}")
        check(self.sample_timeout_s > 0, "sample_timeout_s", "must be > 0")
        check(self.dist_timeout_s > self.sample_timeout_s, "dist_timeout_s",
              f"must be larger than sample_timeout_s ({self.sample_timeout_s:g}s), got {self.dist_timeout_s:g}s: "
              "ranks wait in a collective while one rank waits that long for its batch")


class Learner:
    def __init__(self, rank: int, model_path: str, dtype: str, trainer: TrainerConfig, loss: LossConfig,
                 buffer_address: str, buffer_timeout_s: float, weights,
                 rendezvous: Rendezvous | None = None, seed: int = 0, buffer_token: str = ""):
        self.rank, self.world_size, self.config, self.loss_config = rank, trainer.world_size, trainer, loss
        transformers.logging.disable_progress_bar()  # one bar per process per load floods the driver's log
        self.weights = weights.sender() if rank == 0 else None  # a channel spec (common/weights.py)
        torch.manual_seed(seed + rank)
        torch.set_num_threads(trainer.torch_threads)
        if trainer.gpus:
            torch.cuda.set_device(0)  # Ray shows each rank only its own GPU
        self.device = torch.device("cuda:0" if trainer.gpus else "cpu")
        # A process group on GPU, even on one rank (FSDP2's mixed precision and the multi-GPU path
        # are then the same code; Megatron's parallel_state needs one); on CPU only with more
        # than one rank. The FSDP2 backend then shards the model.
        self.distributed = self.world_size > 1 or trainer.gpus > 0
        self.megatron = trainer.backend == "megatron"
        self.sharded = self.distributed and not self.megatron   # FSDP2 holds the model
        if self.distributed:
            backend, timeout = "nccl" if trainer.gpus else "gloo", datetime.timedelta(seconds=trainer.dist_timeout_s)
            if self.world_size == 1:  # nobody to meet: an in-process store
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            elif rendezvous is None:
                raise ValueError(f"{self.world_size} learner ranks need a rendezvous (common/rendezvous.py)")
            else:
                rendezvous.join(backend, rank, self.world_size, trainer.dist_timeout_s)
        self.rendezvous = rendezvous   # holds the store's Ray actor alive (common/rendezvous.py)
        self.compute_dtype, master = getattr(torch, dtype), getattr(torch, trainer.master_dtype)
        self.peak_flops = flops.peak(torch.cuda.get_device_name(0)) if self.device.type == "cuda" else None
        if self.megatron:
            megatron.initialize(trainer.tensor_parallel, seed, trainer.dist_timeout_s)
            model = self._build_megatron(model_path, master)
            self.model_config = model.hf_config
            self.param_names = list(model.hugging_face_state_dict())  # what actors load; tied weights once
            # pi_ref: built again (Megatron modules hold process groups, which do not deepcopy)
            self.reference = self._build_megatron(model_path, master).requires_grad_(False).eval() \
                if loss.kl_coef > 0 else None
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=master)
            self.model_config = model.config.get_text_config()   # for the model FLOPs of a step
            self.param_names = [n for n, _ in model.named_parameters()]  # what actors load; tied weights once
            model.to(self.device)
            logprob_head.install(model, trainer.logprob_chunk)   # before the copy: pi_ref gets one too
            # pi_ref for the KL term: the initial weights, frozen, sharded like the policy
            self.reference = copy.deepcopy(model).requires_grad_(False).eval() if loss.kl_coef > 0 else None
            if trainer.activation_checkpointing:
                fsdp.checkpoint_activations(model)
        # Eval mode (dropout off) while training, as RL fine-tuning of LMs does: the log-probs
        # that enter the importance weights must be the policy's, not one dropout draw of it.
        model.eval()
        if trainer.compile:   # inside FSDP's per-block hooks, outside nothing else (as torchtitan does)
            fsdp.compile_blocks(model, megatron.layers(model) if self.megatron else None)
        if self.sharded:
            fsdp.shard(model, self.device.type, self.world_size, self.compute_dtype)
            if self.reference is not None:
                fsdp.shard(self.reference, self.device.type, self.world_size, self.compute_dtype)
        # Not FSDP2 (CPU with one rank, or Megatron) with a compute dtype other than the master's:
        # autocast.
        self.autocast = not self.sharded and self.compute_dtype != master
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.lr, weight_decay=trainer.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(trainer, step))
        self.buffer = BufferClient(buffer_address, timeout_s=buffer_timeout_s, version_token=buffer_token)
        self.model_path = model_path
        self.step_count = 0
        self.version = 0
        self.lagged = collections.deque()   # (version, host tensors) made but not yet sent (publish_lag)
        self.published = 0                  # the newest version the actors were sent
        self.skipped_updates = 0            # optimizer updates skipped for a non-finite gradient
        self.nonfinite_in_a_row = 0

    def _build_megatron(self, model_path: str, master: torch.dtype):
        return megatron.build(model_path, master, self.device, self.config.tensor_parallel,
                              self.config.activation_checkpointing, self.config.logprob_chunk)

    def _all_reduce(self, values: list, op=None) -> list:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def step(self) -> dict:
        """Sample this rank's share of the batch, train on it, publish if due. Returns the
        metrics of the whole global batch (the same on every rank)."""
        t0 = time.monotonic()
        groups, staleness, _ = self.buffer.sample(self.config.batch_groups // self.world_size,
                                                  timeout_s=self.config.sample_timeout_s)
        wait_s = time.monotonic() - t0
        metrics = self.train_on(groups, staleness)
        gather_s = send_s = 0.0
        if self.step_count % self.config.sync_every == 0:
            gather_s, send_s = self._publish()
        metrics.update({"weights/version": self.version, "weights/published": self.published,
                        "weights/sync_s": gather_s + send_s,
                        "weights/gather_s": gather_s, "weights/send_s": send_s, "learner/wait_s": wait_s,
                        "learner/step_s": time.monotonic() - t0})
        if self.device.type == "cuda":
            metrics.update(telemetry.sample("learner"))   # this rank's GPU: utilization, memory, power
        return metrics

    def train_on(self, groups: list, staleness: list) -> dict:
        """Train on this rank's groups: trainer.epochs passes over trainer.minibatches
        mini-batches, one optimizer step each (every rank calls it together). pi_prox (and
        pi_ref) log-probs are taken once, before the first update; with one update in all,
        pi_prox is the policy that update starts from, so its training forward gives them."""
        t0 = time.monotonic()
        c, lc = self.config, self.loss_config
        batch = make_batch(groups, lc.scale_by_std)
        if batch.rows < c.minibatches:
            raise ValueError(f"trainer.minibatches={c.minibatches} needs at least that many rows per rank, "
                             f"got {batch.rows}")
        minibatches = [[_to(m, self.device) for m in micro]
                       for micro in self._micro_batches(batch.split(-(-batch.rows // c.minibatches)))]  # [mini][micro]
        self._check_equal_micro_batches(sum(len(mb) for mb in minibatches))
        one_update = c.minibatches * c.epochs == 1
        fixed = [[self._fixed_logprobs(m, proximal=not one_update) for m in mb] for mb in minibatches]
        shares = [[token_weights(m.loss_mask, lc.aggregation)[1] for m in mb] for mb in minibatches]
        counts = self._all_reduce([sum(s) for s in shares] + [float(sum(m.loss_mask.sum() for m in mb))
                                                              for mb in minibatches])
        divisors, tokens = counts[:len(minibatches)], counts[len(minibatches):]        # per mini-batch, global
        # model FLOPs of this rank's step: pi_prox (unless one update) and pi_ref forward once,
        # then per epoch a forward and a backward (2 forwards) over every row
        forwards = (not one_update) + (self.reference is not None) + 3 * c.epochs
        step_flops = forwards * flops.forward(self.model_config, batch.attention_mask.sum(1).tolist(),
                                              int(batch.loss_mask.sum()))

        sums, maxes, clip_fracs, grad_norms, loss = {}, {}, [], [], 0.0
        lr = self.optimizer.param_groups[0]["lr"]  # of this batch's first optimizer step
        for _ in range(c.epochs):
            for mb, mb_fixed, divisor, mb_tokens in zip(minibatches, fixed, divisors, tokens):
                mb_sums, mb_maxes, mb_loss, grad_norm = self._update(mb, mb_fixed, divisor)
                for k, v in mb_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                for k, v in mb_maxes.items():
                    maxes[k] = max(maxes.get(k, v), v)
                clip_fracs.append(mb_sums["loss/clip_frac"] / max(mb_tokens, 1.0))  # this rank's share
                grad_norms.append(grad_norm)
                loss += mb_loss
        self.step_count += 1

        passes = c.epochs * len(minibatches)
        rewards = np.concatenate([g.rewards for g in groups])
        errors = sum(bool(e) for g in groups for e in g.errors)
        # groups whose completions all scored alike: their advantages are 0, so they teach nothing
        # (a run whose batches are all flat, every answer wrong say, cannot learn its way out)
        flat = sum(g.flat for g in groups)
        keys = sorted(sums)
        totals = self._all_reduce([float(rewards.sum()), len(rewards), float(sum(staleness)), len(staleness),
                                   errors, loss] + [sums[k] for k in keys] + clip_fracs + [flat, step_flops])
        step_flops = totals.pop()   # every rank's
        flat = totals.pop()
        max_keys = sorted(maxes)
        top = self._all_reduce([float(max(staleness))] + [maxes[k] for k in max_keys], op=dist.ReduceOp.MAX)
        reward_sum, rows, stale_sum, n_groups, errors, loss = totals[:6]
        global_tokens = sum(tokens)
        train_s = time.monotonic() - t0
        metrics = {
            "step": self.step_count, "reward/mean": reward_sum / rows, "reward/flat_groups": flat / n_groups,
            "staleness/mean": stale_sum / n_groups, "staleness/max": top[0],
            "learner/train_s": train_s, "learner/tokens": global_tokens,
            "learner/tokens_per_s": global_tokens / train_s, "learner/tflops": step_flops / train_s / 1e12,
            "learner/grad_norm": sum(grad_norms) / passes, "rollout/episode_errors": errors,
            "loss/policy": loss / passes, "loss/clip_frac_per_minibatch": totals[6 + len(keys):],
            "learner/lr": lr, "learner/skipped_updates": self.skipped_updates,
        }
        metrics.update({k: v / max(global_tokens * c.epochs, 1.0) for k, v in zip(keys, totals[6:6 + len(keys)])})
        metrics.update(dict(zip(max_keys, top[1:])))
        if self.peak_flops:   # on a GPU whose peak is known: the share of it the step used
            metrics["learner/mfu"] = step_flops / train_s / (self.peak_flops * self.world_size)
        return metrics

    def _micro_batches(self, minibatches: list) -> list:
        """Each mini-batch's micro-batches: by rows, or packed to trainer.micro_batch_tokens
        with every rank making the same number of passes per mini-batch."""
        if not self.config.micro_batch_tokens:
            return [mb.split(self.config.micro_batch_rows) for mb in minibatches]
        budget = self.config.micro_batch_tokens
        packed = [mb.pack(budget) for mb in minibatches]
        counts = self._all_reduce([float(len(p)) for p in packed], op=dist.ReduceOp.MAX)
        return [p if len(p) == n else mb.pack(budget, count=int(n)) for mb, p, n in zip(minibatches, packed, counts)]

    def _forward(self, model, micro, entropy: bool = False) -> tuple:
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
            return token_logprobs(model, micro, entropy=entropy)

    def _check_equal_micro_batches(self, count: int) -> None:
        if self.distributed:  # FSDP's backward is a collective: unequal counts would hang, not fail
            neg_fewest, most = self._all_reduce([-count, count], op=dist.ReduceOp.MAX)
            if -neg_fewest != most:  # every rank sees it and raises
                raise RuntimeError(f"learner ranks hold between {int(-neg_fewest)} and {int(most)} micro-batches; "
                                   "every rank needs the same number of rows (equal rollout.group_size)")

    @torch.no_grad()
    def _fixed_logprobs(self, micro, proximal: bool = True) -> tuple:
        """(pi_prox log-probs, pi_ref log-probs or None) of a micro-batch, before any update;
        pi_prox is None where the update's own forward is to give it (`proximal=False`)."""
        values = self._forward(self.model, micro)[1] if proximal else None
        reference = self._forward(self.reference, micro)[1] if self.reference is not None else None
        return values, reference

    def _update(self, micro_batches: list, fixed: list, divisor: float) -> tuple:
        """One optimizer step on a mini-batch; returns (metric sums, maxima, its share of the
        normalised loss, the gradient norm)."""
        lc = self.loss_config
        self.optimizer.zero_grad(set_to_none=True)
        sums, maxes, loss = {}, {}, 0.0
        for micro, (proximal, reference) in zip(micro_batches, fixed):
            start, logprobs, *entropy = self._forward(self.model, micro, entropy=lc.entropy_coef > 0)  # [b, T-1-start]
            if proximal is None:   # the only update: pi_prox is the policy of this very forward
                proximal = logprobs.detach()
            mask = micro.loss_mask[:, start:]
            weights, _ = token_weights(mask, lc.aggregation)
            loss_sum, metric_sums = policy_loss(
                logprobs, proximal, micro.behaviour_logprobs[:, start:], micro.advantages[:, start:], mask, lc,
                weights=weights, reference_logprobs=reference, entropy=entropy[0] if entropy else None)
            # Ranks average gradients (FSDP2 in its backward, Megatron below); scale so the
            # result is sum / the global divisor.
            (loss_sum * self.world_size / max(divisor, 1.0)).backward()
            loss += float(loss_sum.detach()) / max(divisor, 1.0)
            for k, v in metric_sums.items():
                if k.endswith("_max"):
                    maxes[k] = max(maxes.get(k, float(v)), float(v))
                else:
                    sums[k] = sums.get(k, 0.0) + float(v)
        if self.megatron and self.world_size > 1:
            megatron.average_gradients(self.model)
        grad_norm = fsdp.clip_grad_norm(self.model.parameters(), self.config.max_grad_norm, self.sharded)
        if not math.isfinite(grad_norm):   # the same norm on every rank: they skip, or fail, together
            self.skipped_updates += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row > self.config.max_nonfinite_updates:
                raise FloatingPointError(
                    f"learner step {self.step_count + 1}: the gradient norm was {grad_norm} in "
                    f"{self.nonfinite_in_a_row} optimizer update(s) in a row, more than "
                    f"trainer.max_nonfinite_updates={self.config.max_nonfinite_updates} (this mini-batch's loss: "
                    f"{loss}); the weights are those of the last finite update")
            self.optimizer.zero_grad(set_to_none=True)
            return sums, maxes, loss, grad_norm
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        return sums, maxes, loss, grad_norm

    def checkpoint(self, folder: str) -> str:
        """Save a checkpoint under `folder` (every rank together); returns its path."""
        return str(checkpoint.save(self, Path(folder), keep=self.config.keep_checkpoints))

    def restore(self, path: str) -> dict:
        """Continue from a checkpoint: its weights, optimizer, schedule, step, version and RNG,
        then publish those weights as the next version: the actors start from the initial
        weights, and with sync_every > 1 the checkpoint may hold weights newer than its last
        version. Returns {step, version}."""
        checkpoint.restore(self, Path(path))
        self.publish()
        return {"step": self.step_count, "version": self.version}

    def publish(self) -> float:
        """Publish the current weights as version+1 and tell the buffer; returns seconds taken."""
        return sum(self._publish())

    def _publish(self) -> tuple:
        """Publish as version+1; returns the seconds (gathering the weights, sending them):
        the gather is a collective when sharded; the send lasts as long as the channel holds
        it (common/weights.py); the actors then swap the version in on their own. With
        trainer.publish_lag = k the version is kept on the host and version+1-k is sent."""
        t = time.monotonic()
        self.version += 1
        tensors = self._gather_weights()
        gathered = time.monotonic()
        if self.rank == 0:
            if self.config.publish_lag:
                self.lagged.append((self.version, {n: v.detach().to("cpu", copy=True) for n, v in tensors.items()}))
                tensors = None
                if len(self.lagged) > self.config.publish_lag:
                    version, host = self.lagged.popleft()
                    tensors = {n: v.to(self.device) for n, v in host.items()} if self.weights.device_tensors else host
            else:
                version = self.version
            if tensors is not None:
                self.weights.send(version, tensors)
                self.published = version
            self.buffer.set_learner_version(self.version, published=self.published)
        if self.distributed and self.world_size > 1:
            # no rank samples (which makes room for the actors) before rank 0 has told the buffer
            # what it sent: an actor given room starts its groups on that version (actors/actor.py)
            dist.barrier()
        return gathered - t, time.monotonic() - gathered

    def publish_unlagged(self) -> int:
        """Send the current weights as the current version, past any publish_lag (the end of a
        lagged run: its held-out evaluation scores the weights the learner made). Every rank
        calls it; returns the version sent."""
        tensors = self._gather_weights()
        if self.rank == 0 and self.version > self.published:
            self.lagged.clear()
            self.weights.send(self.version, tensors)
            self.published = self.version
        return self.version

    def _gather_weights(self) -> dict:
        """The tensors rank 0 sends as this version (a collective when sharded; {} elsewhere)."""
        if self.megatron:  # every rank holds the whole model (tensor parallel 1); rank 0 sends it
            state = self.model.hugging_face_state_dict() if self.rank == 0 else {}
            tensors = {n: state[n].detach().to(self.compute_dtype) for n in self.param_names} if state else {}
            if tensors and not self.weights.device_tensors:
                tensors = {n: v.cpu() for n, v in tensors.items()}
        elif self.world_size == 1 and self.weights is not None and self.weights.device_tensors:
            # one rank and a GPU channel (CUDA IPC): its own parameters, read in place, in the
            # master dtype; receivers cast as they copy (send returns once they copied out)
            params = dict(self.model.named_parameters())
            tensors = {n: fsdp.local(params[n]).detach() for n in self.param_names}
        else:
            # cast on the device before they travel; to the host only for a host channel
            device = self.device if self.rank == 0 and self.weights.device_tensors else "cpu"
            state = fsdp.full_state_dict(self.model, self.sharded, self.compute_dtype, device)
            tensors = {n: state[n] for n in self.param_names} if self.rank == 0 else {}
        return tensors

    def export(self, path: str) -> None:
        """Save the current weights and the tokenizer in Hugging Face format (rank 0 writes)."""
        if self.megatron:
            state = {k: v.detach().cpu() for k, v in self.model.hugging_face_state_dict().items()}
        else:
            state = fsdp.full_state_dict(self.model, self.sharded)
        if self.rank == 0:
            checkpoint.save_hf(state, self.model_path, path)

    def close(self) -> None:
        """Every rank calls it, at the end: the buffer connection and, when sharded, the process
        group are released, and the model and optimizer with them, so that the group's threads
        stop while the interpreter is alive. (A gloo worker thread that drops the last
        reference to a tensor during interpreter exit aborts the process.)"""
        self.buffer.close()
        try:
            if self.distributed and dist.is_initialized():
                # no rank takes the group down while a peer's collective still needs it; a
                # peer that never comes fails the close after CLOSE_BARRIER_S, not
                # dist_timeout_s (gloo names the rank; NCCL's barrier cannot)
                deadline = datetime.timedelta(seconds=CLOSE_BARRIER_S)
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=deadline)
                else:
                    dist.barrier(async_op=True).wait(timeout=deadline)
        finally:
            if self.distributed and dist.is_initialized():
                if self.megatron:
                    from megatron.core import parallel_state
                    parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
            self.model = self.reference = self.optimizer = self.scheduler = None
            gc.collect()


def _to(batch, device):
    if device.type == "cpu":
        return batch
    return type(batch)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})

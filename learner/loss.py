"""Policy-gradient losses with off-policy correction. Tensors in, loss and metrics out.

Three policies meet here:
  mu         the behaviour policy: the actor's weights that sampled the tokens (old, stale)
  pi_prox    the proximal policy: the learner's weights at the start of this step
  pi_theta   the policy being optimised (equal to pi_prox in value; only its gradient differs,
             since the learner takes one optimizer step per batch)

objective=decoupled (default) is the decoupled PPO objective: clip pi_theta/pi_prox to a
trust region around the learner's own weights, and correct for the actors being behind with
an importance weight w = pi_prox/mu per token, either truncated at is_cap (truncated IS) or
zeroed outside [1/is_cap, is_cap] (masked IS, is_correction=mask).
objective=behaviour is plain off-policy PPO: clip pi_theta/mu directly, no separate weight.

The loss returned is a *sum* over tokens; the caller divides by the number of policy tokens
in the whole global batch (all micro-batches, all ranks), so every token weighs the same
however the batch is split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import check

OBJECTIVES = ("decoupled", "behaviour")
IS_CORRECTIONS = ("truncate", "mask", "none")


@dataclass
class LossConfig:
    objective: str = "decoupled"
    """decoupled (clip against the learner's weights, importance weight pi_prox/mu) or
    behaviour (clip pi_theta/mu directly)."""
    clip_low: float = 0.2
    """The ratio is clipped to [1 - clip_low, 1 + clip_high]."""
    clip_high: float = 0.28
    is_correction: str = "truncate"
    """For objective=decoupled: truncate (w = min(w, is_cap)), mask (w, but 0 outside
    [1/is_cap, is_cap]) or none (w = 1)."""
    is_cap: float = 2.0
    scale_by_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); False keeps
    only the centring (Dr. GRPO)."""

    def validate(self):
        check(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        check(self.is_correction in IS_CORRECTIONS, "is_correction",
              f"must be one of {IS_CORRECTIONS}, got {self.is_correction!r}")
        check(0 < self.clip_low < 1, "clip_low", f"must lie in (0, 1), got {self.clip_low}")
        check(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")
        check(self.is_cap > 1, "is_cap", f"must be > 1, got {self.is_cap}")


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, valid: torch.Tensor | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] -> advantages [N, G]: each reward minus its group's mean, divided by the
    group's standard deviation if scale_by_std. Only `valid` completions ([N, G] bool; rows that
    generated) enter the mean and deviation, and the others get 0, as does a group whose
    rewards are all equal."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    weight = valid.float()
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (rewards * weight).sum(dim=1, keepdim=True) / count
    centred = (rewards - mean) * weight
    if not scale_by_std:
        return centred
    std = ((centred ** 2).sum(dim=1, keepdim=True) / count).sqrt()
    return centred / (std + eps)


def policy_loss(logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, config: LossConfig):
    """All inputs [B, T]; `mask` is 1.0 on policy tokens. Returns (loss_sum, metric_sums) where
    loss_sum is a scalar summed over masked tokens and metric_sums maps names to sums over the
    same tokens (divide by the token count to get means)."""
    mask = mask.float()
    if config.objective == "behaviour":
        proximal_logprobs = behaviour_logprobs
    ratio = torch.exp(logprobs - proximal_logprobs)                                 # pi_theta / pi_prox
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)                                     # [B, T]

    behaviour_weight = torch.exp(proximal_logprobs.detach() - behaviour_logprobs)   # pi_prox / mu
    if config.objective == "behaviour" or config.is_correction == "none":
        is_weight = torch.ones_like(behaviour_weight)
    elif config.is_correction == "truncate":
        is_weight = torch.clamp(behaviour_weight, max=config.is_cap)
    else:  # mask
        keep = (behaviour_weight <= config.is_cap) & (behaviour_weight >= 1.0 / config.is_cap)
        is_weight = behaviour_weight * keep.float()
    token_loss = is_weight * pg_loss

    with torch.no_grad():
        log_w = proximal_logprobs.detach() - behaviour_logprobs
        metrics = {
            "loss/clip_frac": ((pg_loss2 > pg_loss1).float() * mask).sum(),
            "loss/is_weight_mean": (is_weight * mask).sum(),
            "loss/is_truncated_frac": ((behaviour_weight > config.is_cap).float() * mask).sum(),
            "loss/is_masked_frac": ((is_weight == 0).float() * mask).sum(),
            "loss/kl_behaviour": ((torch.exp(log_w) - 1 - log_w) * mask).sum(),  # k3 estimate of KL(mu || pi)
            "loss/entropy_proxy": (-logprobs.detach() * mask).sum(),
        }
    return (token_loss * mask).sum(), metrics

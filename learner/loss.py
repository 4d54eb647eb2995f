"""Policy-gradient losses with off-policy correction. Tensors in, loss and metrics out.

Three policies meet here:
  mu         the behaviour policy: the actor's weights that sampled the tokens (old, stale)
  pi_prox    the proximal policy: the learner's weights before the first update on this batch
             (its log-probs are computed once; with trainer.minibatches > 1 pi_theta moves
             away from it, mini-batch after mini-batch)
  pi_theta   the policy being optimised

objective=decoupled (default) is the decoupled PPO objective: clip pi_theta/pi_prox to a
trust region around the learner's own weights, and correct for the actors being behind with
an importance weight w = pi_prox/mu: per token truncated at is_cap (truncated IS), zeroed
outside [1/is_cap, is_cap] (masked IS), or one weight per sequence, the geometric mean of its
tokens' weights, truncated at is_cap (sequence-level IS).
objective=behaviour is plain off-policy PPO: clip pi_theta/mu directly, no separate weight.
Optional terms: kl_coef x KL(pi_theta || pi_ref) to the initial weights (k1 or k3 estimate)
and -entropy_coef x the entropy of pi_theta.

The loss returned is a weighted *sum* over tokens. `aggregation` says what a token weighs and
what the sum is divided by, over the whole global batch (all micro-batches, all ranks), so the
gradient does not depend on how the batch is split:
  token_mean            weight 1, divided by the policy tokens of the batch
  seq_mean_token_sum    weight 1, divided by the sequences (rows with a policy token)
  seq_mean_token_mean   weight 1 / (the row's policy tokens), divided by the sequences
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import check

OBJECTIVES = ("decoupled", "behaviour")
IS_CORRECTIONS = ("truncate", "mask", "sequence", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KL_ESTIMATORS = ("k1", "k3")


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
    [1/is_cap, is_cap]), sequence (one weight per row: the geometric mean of its tokens' w,
    truncated at is_cap) or none (w = 1)."""
    is_cap: float = 8.0
    """8, not the usual 2: in the off-policy study (docs/off-policy.md) a cap of 8 lost nothing
    against 2 on fresh data and kept groups 8 versions old at fresh data's accuracy, where 2 lost
    12 % on the tiny task and collapsed the GPU job's task (held-out 0.09 against 0.72)."""
    aggregation: str = "token_mean"
    """token_mean, seq_mean_token_sum or seq_mean_token_mean (see the module docstring)."""
    kl_coef: float = 0.0
    """Weight of KL(pi_theta || pi_ref), pi_ref being the initial weights (kept by the learner
    when > 0)."""
    kl_estimator: str = "k3"
    """k1 (log pi_theta - log pi_ref) or k3 (r - log r - 1, r = pi_ref / pi_theta)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (the loss subtracts entropy_coef x entropy)."""
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
        check(self.aggregation in AGGREGATIONS, "aggregation",
              f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        check(self.kl_estimator in KL_ESTIMATORS, "kl_estimator",
              f"must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")


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


def token_weights(mask: torch.Tensor, aggregation: str) -> tuple:
    """mask [B, T] -> (what each token weighs [B, T], this micro-batch's share of the global
    divisor: its policy tokens for token_mean, else its sequences)."""
    mask = mask.float()
    row_tokens = mask.sum(dim=1, keepdim=True)                                      # [B, 1]
    if aggregation == "token_mean":
        return mask, float(row_tokens.sum())
    sequences = float((row_tokens > 0).sum())
    if aggregation == "seq_mean_token_sum":
        return mask, sequences
    return mask / row_tokens.clamp(min=1.0), sequences


def policy_loss(logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, config: LossConfig, weights: torch.Tensor | None = None,
                reference_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None):
    """All inputs [B, T]; `mask` is 1.0 on policy tokens; `weights` what each token weighs in
    the sum (token_weights; default the mask); `reference_logprobs` needed when kl_coef > 0,
    `entropy` (of pi_theta, with its gradient) when entropy_coef > 0. Returns (loss_sum,
    metric_sums): loss_sum is the weighted sum over tokens; metric_sums maps names to sums over
    the policy tokens (divide by the token count for means), except `*_max`, maxima."""
    mask = mask.float()
    weights = mask if weights is None else weights
    # how far the data is off policy, whatever the objective (its metrics are what a user watches)
    log_w = proximal_logprobs.detach() - behaviour_logprobs                         # log pi_prox / mu
    if config.objective == "behaviour":   # the clip's anchor is mu itself
        proximal_logprobs = behaviour_logprobs
    ratio = torch.exp(logprobs - proximal_logprobs)                                 # pi_theta / pi_prox
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)                                     # [B, T]

    behaviour_weight = torch.exp(log_w)
    if config.objective == "behaviour" or config.is_correction == "none":
        is_weight = torch.ones_like(behaviour_weight)
    elif config.is_correction == "truncate":
        is_weight = torch.clamp(behaviour_weight, max=config.is_cap)
    elif config.is_correction == "mask":
        keep = (behaviour_weight <= config.is_cap) & (behaviour_weight >= 1.0 / config.is_cap)
        is_weight = behaviour_weight * keep.float()
    else:  # sequence: the geometric mean of the row's token weights, truncated
        row_log_w = (log_w * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        behaviour_weight = torch.exp(row_log_w).expand_as(log_w)
        is_weight = torch.clamp(behaviour_weight, max=config.is_cap)
    token_loss = is_weight * pg_loss

    if config.kl_coef > 0:
        log_r = reference_logprobs - logprobs                                       # log pi_ref / pi_theta
        kl = -log_r if config.kl_estimator == "k1" else torch.exp(log_r) - log_r - 1
        token_loss = token_loss + config.kl_coef * kl
    if config.entropy_coef > 0:
        token_loss = token_loss - config.entropy_coef * entropy

    with torch.no_grad():
        metrics = {
            "loss/clip_frac": ((pg_loss2 > pg_loss1).float() * mask).sum(),
            "loss/is_weight_mean": (is_weight * mask).sum(),
            "loss/is_weight_max": (is_weight * mask).max() if mask.any() else torch.zeros(()),
            "loss/is_truncated_frac": ((behaviour_weight > config.is_cap).float() * mask).sum(),
            "loss/is_masked_frac": ((is_weight == 0).float() * mask).sum(),
            "loss/kl_behaviour": ((torch.exp(log_w) - 1 - log_w) * mask).sum(),     # k3 estimate of KL(mu || pi)
            "loss/entropy_proxy": (-logprobs.detach() * mask).sum(),
        }
        if config.kl_coef > 0:
            metrics["loss/kl_reference"] = (kl.detach() * mask).sum()
        if entropy is not None:
            metrics["loss/entropy"] = (entropy.detach() * mask).sum()
    return (token_loss * weights).sum(), metrics

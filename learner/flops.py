"""Model FLOPs of the learner's work, for tokens/s and MFU (model FLOPs utilization).

A forward pass over a row of n tokens of a Qwen2/Llama-family model costs, per token,
2 x the matmul weights (q, k, v, o and the gated MLP; the embedding lookup is no matmul),
plus 2 x 2 x layers x attention width x n / 2 for causal scores and values, plus
2 x hidden x vocabulary for the projection at the positions where it is computed. A backward
pass costs twice a forward. Recomputation under activation checkpointing is work, not model
FLOPs, and is not counted (as MFU is usually defined).
"""
from __future__ import annotations

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, SXM parts


def per_token(cfg) -> dict:
    """Forward FLOPs per token: `matmul`, `attention_per_context` (times the causal context) and
    `vocab` (where the projection is computed)."""
    d, layers, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    head = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, (cfg.num_key_value_heads or cfg.num_attention_heads) * head
    weights = d * (q + 2 * kv) + q * d + 3 * d * ff          # qkv, o, gate + up + down
    return {"matmul": 2 * layers * weights, "attention_per_context": 2 * layers * q, "vocab": 2 * d * cfg.vocab_size}


def forward(cfg, lengths, vocab_positions: int) -> float:
    """FLOPs of one forward pass over rows of these lengths, the vocabulary projected at
    `vocab_positions` positions."""
    f = per_token(cfg)
    return float(sum(n * f["matmul"] + f["attention_per_context"] * n * n for n in lengths)
                 + vocab_positions * f["vocab"])


def peak(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s; None when it is not in the table."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)

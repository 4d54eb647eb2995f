"""From rollout groups to padded training tensors, split into micro-batches."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from common.rollout import RolloutGroup
from learner import logprob_head
from learner.loss import group_advantages


@dataclass
class Batch:
    tokens: torch.Tensor              # [B, T] long, right-padded
    attention_mask: torch.Tensor      # [B, T] long, 1 on valid tokens
    loss_mask: torch.Tensor           # [B, T-1] float, 1 where token t+1 is a policy token
    behaviour_logprobs: torch.Tensor  # [B, T-1] float, log mu of token t+1
    advantages: torch.Tensor          # [B, T-1] float, the row's advantage on every position
    temperature: float

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows) -> "Batch":
        """The given rows (a slice or a list of indices), trimmed to their longest row."""
        rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        width = max(int(self.attention_mask[rows].sum(1).max().item()), 2)
        return Batch(self.tokens[rows, :width], self.attention_mask[rows, :width],
                     self.loss_mask[rows, :width - 1], self.behaviour_logprobs[rows, :width - 1],
                     self.advantages[rows, :width - 1], self.temperature)

    def split(self, rows: int) -> list["Batch"]:
        """Micro-batches of at most `rows` rows, each trimmed to its own longest row."""
        return [self.select(slice(i, i + rows)) for i in range(0, self.rows, rows)]

    def pack(self, budget: int, count: int | None = None) -> list["Batch"]:
        """Micro-batches of the rows sorted by length, longest first, each of at most `budget`
        padded tokens (rows x its longest row; a row longer than the budget goes alone). With
        `count` (at least the packed number, at most the rows) exactly that many: the costliest
        are halved until there are."""
        lengths = self.attention_mask.sum(1).tolist()
        chunks, current = [], []
        for i in sorted(range(self.rows), key=lambda i: -lengths[i]):
            if current and (len(current) + 1) * lengths[current[0]] > budget:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
        if count is not None:
            if not len(chunks) <= count <= self.rows:
                raise ValueError(f"cannot make {count} micro-batches of {self.rows} rows packed into {len(chunks)}")
            while len(chunks) < count:
                j = max((k for k, c in enumerate(chunks) if len(c) > 1), key=lambda k: len(chunks[k]) * lengths[chunks[k][0]])
                half = len(chunks[j]) // 2
                chunks[j:j + 1] = [chunks[j][:half], chunks[j][half:]]
        return [self.select(c) for c in chunks]


def make_batch(groups: list[RolloutGroup], scale_by_std: bool = True) -> Batch:
    """Concatenate the groups' rows. Advantages are normalised within each group, over the
    rows that generated (a row whose episode failed before its first turn has none)."""
    temperatures = {g.temperature for g in groups}
    if len(temperatures) != 1:
        raise ValueError(f"groups sampled at different temperatures {sorted(temperatures)} in one batch")
    width = max(2, max(g.tokens.shape[1] for g in groups))

    def stack(name, dtype):
        out = np.zeros((sum(g.group_size for g in groups), width), dtype=dtype)
        row = 0
        for g in groups:
            value = getattr(g, name)
            out[row:row + g.group_size, :value.shape[1]] = value
            row += g.group_size
        return torch.from_numpy(out)

    tokens = stack("tokens", np.int64)
    lengths = torch.from_numpy(np.concatenate([g.lengths for g in groups]).astype(np.int64))
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    advantages = torch.cat([
        group_advantages(torch.from_numpy(np.asarray(g.rewards, dtype=np.float32))[None, :], scale_by_std,
                         valid=torch.from_numpy(g.generated)[None, :])[0]
        for g in groups])                                                           # [B]
    return Batch(
        tokens=tokens, attention_mask=attention_mask,
        loss_mask=stack("loss_mask", np.float32)[:, 1:],
        behaviour_logprobs=stack("behaviour_logprobs", np.float32)[:, 1:],
        advantages=advantages[:, None].expand(-1, width - 1).contiguous(),
        temperature=temperatures.pop())


def token_logprobs(model, batch: Batch, entropy: bool = False) -> tuple:
    """log pi(token t+1 | tokens <= t) at the batch's sampling temperature, from the first
    position any row trains on: returns (start, logprobs [B, T-1-start]), and with `entropy`
    also the entropy of pi at each of those positions [B, T-1-start]. Positions before
    `start` are prompt in every row; skipping them skips most of the vocabulary projection.
    A model with a LogprobHead (learner/logprob_head.py) never makes the logits whole."""
    trained = batch.loss_mask.sum(0).nonzero()
    start = int(trained[0]) if len(trained) else batch.loss_mask.shape[1] - 1
    width = batch.tokens.shape[1]
    targets = batch.tokens[:, start + 1:]                                             # [B, T-1-start]
    head = logprob_head.head_of(model)
    with head.request(targets, batch.temperature, entropy) if head else contextlib.nullcontext():
        out = model(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                    logits_to_keep=width - start, use_cache=False).logits
    if head:                                                                          # [B, T-1-start, 1 or 2]
        return (start, out[..., 0]) + ((out[..., 1],) if entropy else ())
    logits = out[:, :-1]                                                              # [B, T-1-start, V]
    logprobs = torch.log_softmax(logits.float() / batch.temperature, dim=-1)         # [B, T-1-start, V]
    chosen = logprobs.gather(-1, targets[..., None])[..., 0]
    if not entropy:
        return start, chosen
    return start, chosen, -(logprobs.exp() * logprobs).sum(-1)

"""The log-probs of chosen tokens without the [rows, positions, vocabulary] logits in memory.

The learner needs log pi(token t+1 | tokens <= t) at the sampling temperature (and, for the
entropy term, the entropy of pi), never the logits themselves. Projecting a micro-batch of
16k positions onto a 152k vocabulary makes 2.5e9 logits: 5 GB in bf16, then an fp32 copy, its
log-softmax and their gradients, some 40 GB and a dozen passes over memory per micro-batch.
`chosen_logprobs` projects `chunk` positions at a time, keeps one fp32 number per position
(the log-sum-exp) for the backward pass, and recomputes each chunk's logits there: the same
matmul FLOPs twice for the projection (once more than unfused), a few GB at most.

`LogprobHead` takes the place of a Hugging Face causal LM's output projection (`lm_head`,
sharing its weight, so tied embeddings stay tied and checkpoints keep their names). Called
inside the model's forward, FSDP2 has gathered its weight as for the plain projection. With
no request pending it returns plain logits (evaluation, generation, other callers).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _chunk_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool) -> tuple:
    """logits [c, V] (the model's dtype) -> (log-sum-exp [c], log pi(target) [c], entropy [c]
    or None), in fp32: pi = softmax(logits / T)."""
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    chosen = z.gather(-1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.exp(z - lse[:, None]) * z).sum(-1) if with_entropy else None   # H = lse - E_pi[z]
    return lse, chosen, entropy


def _chunk_backward(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature: float) -> torch.Tensor:
    """The gradient with respect to the chunk's logits [c, V], in their dtype."""
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    logp = z - lse[:, None]
    p = torch.exp(logp)
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
    g = (onehot.float() - p) * grad_logprobs[:, None]                 # d log p_target / dz = onehot - p
    if grad_entropy is not None:                                     # dH/dz_j = -p_j (log p_j + H)
        g = g - grad_entropy[:, None] * p * (logp + entropy[:, None])
    return (g / temperature if temperature != 1.0 else g).to(logits.dtype)


# On a GPU each is compiled into a few fused kernels that read the chunk's logits once or twice
# (eager, they are a dozen passes over an fp32 copy: ~30% of a 1.5B learner step on an H100).
# On CPU they run eager: compiling them there costs more than it saves.
_compiled = {}


def _fused(fn, device: torch.device):
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


class _ChosenLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> (log pi(target) [N],
    entropy of pi [N] or an empty tensor), both fp32, pi = softmax(hidden @ weight.T / T)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool, chunk: int):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        math = _fused(_chunk_forward, hidden.device)
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias)                        # [c, V]
            lse[s:s + chunk], logprobs[s:s + chunk], ent = math(logits, targets[s:s + chunk], temperature,
                                                                with_entropy)
            if with_entropy:
                entropy[s:s + chunk] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        math = _fused(_chunk_backward, hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            g = math(F.linear(h, weight, bias), targets[s:s + chunk], lse[s:s + chunk],
                     entropy[s:s + chunk] if grad_entropy is not None else None, grad_logprobs[s:s + chunk],
                     grad_entropy[s:s + chunk] if grad_entropy is not None else None, temperature)   # [c, V]
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
            if grad_bias is not None:
                grad_bias += g.float().sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def chosen_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    temperature: float, entropy: bool = False, chunk: int = 4096) -> tuple:
    """(log pi(targets) [...], entropy [...] or None) for hidden [..., H] and targets [...],
    pi = softmax((hidden @ weight.T + bias) / temperature), `chunk` positions at a time. Under
    autocast the projection runs in the autocast dtype, as the plain projection would."""
    shape = targets.shape
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, ent = _ChosenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                              targets.reshape(-1), float(temperature), entropy, max(1, chunk))
    return logprobs.view(shape), (ent.view(shape) if entropy else None)


class ChosenRequest:
    """The one request a head answers inside `request(...)`: the chosen tokens' log-probs (and
    entropy) in place of logits. Shared by LogprobHead (Hugging Face models) and the Megatron
    backend's output processor (learner/megatron.py)."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self._request = None                   # (targets [B, L-1], temperature, entropy)

    @contextlib.contextmanager
    def request(self, targets: torch.Tensor, temperature: float, entropy: bool):
        self._request = (targets, temperature, entropy)
        try:
            yield
        finally:
            self._request = None

    @property
    def requested(self) -> bool:
        return self._request is not None

    @property
    def kept(self) -> int:
        """The positions the pending request needs: one per target, and the last."""
        return self._request[0].shape[1] + 1

    def scored(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """hidden [B, L, H] -> [B, L-1, 1] (or [B, L-1, 2] with the entropy): position i scored on
        target i (the last position has no target)."""
        targets, temperature, entropy = self._request
        logprobs, ent = chosen_logprobs(hidden[:, :-1], weight, bias, targets, temperature,
                                        entropy=entropy, chunk=self.chunk)
        return torch.stack([logprobs, ent], -1) if entropy else logprobs[..., None]


class LogprobHead(ChosenRequest, torch.nn.Module):
    """A causal LM's output projection that, inside `request(...)`, returns the chosen tokens'
    log-probs (and entropy) instead of logits: [B, L-1, 1] (or [B, L-1, 2]) for hidden
    [B, L, H]."""

    def __init__(self, linear: torch.nn.Linear, chunk: int):
        torch.nn.Module.__init__(self)
        ChosenRequest.__init__(self, chunk)
        self.weight = linear.weight            # the same Parameter: a tied embedding stays tied
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._request is None:
            return F.linear(hidden, self.weight, self.bias)
        return self.scored(hidden, self.weight, self.bias)


def install(model: torch.nn.Module, chunk: int) -> bool:
    """Put a LogprobHead in place of the model's output projection (before sharding); False
    where the model has none that is a plain Linear (its logits then stay the path)."""
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    # models that change the logits after the projection (Gemma's soft-capping, Cohere's scale)
    transformed = any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if not isinstance(linear, torch.nn.Linear) or chunk <= 0 or transformed:
        return False
    model.set_output_embeddings(LogprobHead(linear, chunk))
    return True


def head_of(model: torch.nn.Module) -> ChosenRequest | None:
    """The model's chosen-log-prob head (a LogprobHead, or the Megatron backend's processor), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, ChosenRequest) else None

"""The Megatron-core backend (`trainer.backend=megatron`, GPU only): a Hugging Face
Qwen2- or Llama-family checkpoint as Megatron-core's GPTModel, trained by the same learner
and loss as the FSDP2 backend.

- Weights come in from the Hugging Face checkpoint and go out (published versions, exports)
  in Hugging Face names and layout, so actors, checkpoint export and vLLM never see Megatron's
  own: `to_megatron` / `to_hugging_face` are the two conversions, plain torch, usable without
  megatron-core (the export of a Megatron checkpoint needs only them).
- Megatron's layout differs in two places: q, k and v are one `linear_qkv` weight grouped per
  key-value head ([q of the heads of group 0, k0, v0, q of group 1, k1, v1, ...]), and gate and
  up are one `linear_fc1` ([gate; up]).
- The layers are Megatron-core's local (torch-only) ones; attention is torch's
  scaled_dot_product_attention (flash or memory-efficient kernels, causal) in place of the
  local spec's unfused softmax, which materialises every [sequence x sequence] score.
- Log-probs as the FSDP2 backend's chunked head (learner/logprob_head.py): the decoder's output
  goes to `ChosenLogprobs` through GPTModel's `output_processor` hook (megatron-core 0.19; an
  older one, or trainer.logprob_chunk=0, gives the full logits as before), so the
  [rows, positions, vocabulary] logits are never whole. Where GPTModel's logits path does more
  than the projection (MuP's logit scale; a vocabulary split over tensor-parallel ranks), the
  full logits serve, chosen when the model is built.
- Precision as the FSDP2 backend: weights and optimizer state in trainer.master_dtype,
  forward and backward under autocast in model.dtype.
- Parallelism: `trainer.tensor_parallel` ranks per model replica through parallel_state; the
  other ranks are data parallel, their gradients averaged after each backward. Tensor parallel
  above 1 is refused for now: it needs the batch shared within each tensor-parallel group and
  two GPUs to prove (the two-GPU issue). Pipeline parallel is not built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from learner.logprob_head import ChosenRequest

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def available() -> bool:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the Hugging Face config as Megatron's shape ------------------------------------------

def check_supported(hf) -> None:
    """Raise ValueError naming what a Hugging Face config has that this backend cannot hold."""
    kind = getattr(hf, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"trainer.backend=megatron supports model types {SUPPORTED_MODEL_TYPES}, got {kind!r}")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"trainer.backend=megatron needs hidden_act silu, the model has {hf.hidden_act!r}")
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"trainer.backend=megatron supports plain RoPE only; the model has {rope}")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("trainer.backend=megatron does not hold sliding-window attention (use_sliding_window=true)")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("trainer.backend=megatron does not hold MLP biases (mlp_bias=true)")


def _shape(hf) -> dict:
    heads, groups = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return {"layers": hf.num_hidden_layers, "heads": heads, "groups": groups,
            "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            "qkv_bias": True if hf.model_type == "qwen2" else bool(getattr(hf, "attention_bias", False)),
            "tied": bool(getattr(hf, "tie_word_embeddings", False))}


def _rope_theta(hf) -> float:
    rope = getattr(hf, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


# ---- conversions (plain torch) --------------------------------------------------------------

def to_megatron(state: dict, hf) -> dict:
    """Hugging Face state dict -> GPTModel state dict (full tensors)."""
    s = _shape(hf)
    per_group = s["heads"] // s["groups"]
    out = {"embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": state["model.norm.weight"]}
    if not s["tied"]:
        out["output_layer.weight"] = state["lm_head.weight"]
    for i in range(s["layers"]):
        hf_, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[mc + "input_layernorm.weight"] = state[hf_ + "input_layernorm.weight"]
        out[mc + "pre_mlp_layernorm.weight"] = state[hf_ + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if s["qkv_bias"] else ("weight",):
            q, k, v = (state[f"{hf_}self_attn.{p}_proj.{kind}"] for p in "qkv")
            rest = q.shape[1:]   # (hidden,) for weights, () for biases
            grouped = torch.cat([q.reshape(s["groups"], per_group * s["head_dim"], *rest),
                                 k.reshape(s["groups"], s["head_dim"], *rest),
                                 v.reshape(s["groups"], s["head_dim"], *rest)], dim=1)
            out[f"{mc}self_attention.linear_qkv.{kind}"] = grouped.reshape(-1, *rest)
        out[mc + "self_attention.linear_proj.weight"] = state[hf_ + "self_attn.o_proj.weight"]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([state[hf_ + "mlp.gate_proj.weight"],
                                                       state[hf_ + "mlp.up_proj.weight"]])
        out[mc + "mlp.linear_fc2.weight"] = state[hf_ + "mlp.down_proj.weight"]
    return out


def to_hugging_face(state: dict, hf) -> dict:
    """GPTModel state dict -> Hugging Face state dict (full tensors; views where the layouts
    agree). Keys other than weights (Megatron's `_extra_state`) are ignored."""
    s = _shape(hf)
    per_group = s["heads"] // s["groups"]
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}   # in the model's order
    for i in range(s["layers"]):
        hf_, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[hf_ + "input_layernorm.weight"] = state[mc + "input_layernorm.weight"]
        out[hf_ + "post_attention_layernorm.weight"] = state[mc + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if s["qkv_bias"] else ("weight",):
            fused = state[f"{mc}self_attention.linear_qkv.{kind}"]
            rest = fused.shape[1:]
            grouped = fused.reshape(s["groups"], (per_group + 2) * s["head_dim"], *rest)
            q, k, v = grouped.split([per_group * s["head_dim"], s["head_dim"], s["head_dim"]], dim=1)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{hf_}self_attn.{name}_proj.{kind}"] = part.reshape(-1, *rest)
        out[hf_ + "self_attn.o_proj.weight"] = state[mc + "self_attention.linear_proj.weight"]
        gate, up = state[mc + "mlp.linear_fc1.weight"].chunk(2)
        out[hf_ + "mlp.gate_proj.weight"], out[hf_ + "mlp.up_proj.weight"] = gate, up
        out[hf_ + "mlp.down_proj.weight"] = state[mc + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not s["tied"]:
        out["lm_head.weight"] = state["output_layer.weight"]
    return out


# ---- the model --------------------------------------------------------------------------------

class SdpaAttention(torch.nn.Module):
    """Megatron-core core attention over torch's scaled_dot_product_attention, causal.
    Takes query [s, b, heads, d] and key/value [s, b, groups, d] of this tensor-parallel rank;
    returns [s, b, heads x d]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, cp_comm_type=None,
                 softmax_scale=None, pg_collection=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SdpaAttention takes neither packed sequences nor an attention bias")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)


class _Output:
    def __init__(self, logits):
        self.logits = logits


class ChosenLogprobs(ChosenRequest):
    """The chosen tokens' log-probs straight from the decoder's output, through GPTModel's
    `output_processor` hook (megatron-core 0.19): the [rows, positions, vocabulary] logits are
    never whole, as with the Hugging Face model's LogprobHead (learner/logprob_head.py). Not a
    module: the output weight stays the model's (the embedding's, when tied)."""

    def __call__(self, hidden_states, output_layer, output_weight=None, **_) -> torch.Tensor:
        weight = output_weight if output_weight is not None else output_layer.weight
        hidden = hidden_states[-self.kept:].transpose(0, 1)      # [s, b, h] -> [b, kept, h]
        return self.scored(hidden, weight, getattr(output_layer, "bias", None))   # GPTModel's: no bias


def takes_output_processor() -> bool:
    """Whether this megatron-core's GPTModel.forward has the `output_processor` hook."""
    import inspect

    from megatron.core.models.gpt.gpt_model import GPTModel
    return "output_processor" in inspect.signature(GPTModel.forward).parameters


class MegatronCausalLM(torch.nn.Module):
    """GPTModel behind the Hugging Face causal-LM call the learner makes:
    `model(input_ids=, attention_mask=, logits_to_keep=, use_cache=).logits` ([B, kept, V]).
    Rows are right-padded, so causal attention alone keeps padding out of every valid token.
    With a `logprob_chunk`, `get_output_embeddings()` is a ChosenRequest: inside its
    `request(...)` the call returns the chosen tokens' log-probs [B, kept-1, 1 or 2] instead."""

    def __init__(self, gpt, hf_config, logprob_chunk: int = 0):
        super().__init__()
        self.gpt, self.hf_config = gpt, hf_config
        self.chosen = ChosenLogprobs(logprob_chunk) if logprob_chunk > 0 else None

    def get_output_embeddings(self):
        return self.chosen

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, use_cache: bool = False):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if self.chosen is not None and self.chosen.requested:
            if logits_to_keep != self.chosen.kept:
                raise ValueError(f"logits_to_keep={logits_to_keep}, but the request scores "
                                 f"{self.chosen.kept - 1} positions")
            return _Output(self.gpt(input_ids, positions, attention_mask=None, output_processor=self.chosen))
        logits = self.gpt(input_ids, positions, attention_mask=None)   # [B, T, V], the vocabulary gathered
        return _Output(logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def hugging_face_state_dict(self) -> dict:
        """This replica's weights in Hugging Face names (tensor parallel 1: full tensors)."""
        state = {k.removeprefix("gpt."): v for k, v in self.state_dict().items() if not k.endswith("_extra_state")}
        return to_hugging_face(state, self.hf_config)

    def load_hugging_face_state_dict(self, state: dict) -> None:
        converted = {"gpt." + k: v for k, v in to_megatron(state, self.hf_config).items()}
        missing, unexpected = self.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"Megatron model and converted checkpoint disagree: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def layers(model: "MegatronCausalLM") -> list:
    """The decoder layers (what activation checkpointing and compilation act on)."""
    return list(model.gpt.decoder.layers)


def initialize(tensor_parallel: int, seed: int, timeout_s: float) -> None:
    """parallel_state on the default process group (already initialised), its groups under the
    learner's collective deadline (trainer.dist_timeout_s; Megatron's own default is 30 min),
    and on GPU the model-parallel RNG that Megatron's layers draw from."""
    from megatron.core import parallel_state, tensor_parallel as tp

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=1,
                                                 distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
    if torch.cuda.is_available():
        tp.model_parallel_cuda_manual_seed(seed)


def build(model_path: str, master_dtype: torch.dtype, device: torch.device, tensor_parallel: int = 1,
          activation_checkpointing: bool = False, logprob_chunk: int = 0) -> MegatronCausalLM:
    """The Hugging Face checkpoint at model_path as a MegatronCausalLM on `device`, its
    weights in master_dtype (parallel_state initialised first: `initialize`). `logprob_chunk`
    (trainer.logprob_chunk): positions scored at a time without whole logits, where this
    megatron-core has GPTModel's output_processor hook (0 or an older one: full logits)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.from_pretrained(model_path).get_text_config()
    check_supported(hf)
    s = _shape(hf)
    config = TransformerConfig(
        num_layers=s["layers"], hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=s["heads"], num_query_groups=s["groups"], kv_channels=s["head_dim"],
        normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=s["qkv_bias"],
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tensor_parallel,
        params_dtype=master_dtype, use_cpu_initialization=device.type == "cpu", perform_initialization=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    gpt = GPTModel(config, spec, vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
                   parallel_output=False, share_embeddings_and_output_weights=s["tied"],
                   position_embedding_type="rope", rotary_base=int(_rope_theta(hf)))
    # the head replaces the logits path, so where that path does more (MuP's logit scale, the
    # vocabulary split over tensor-parallel ranks) the full logits serve instead
    chunked = tensor_parallel == 1 and not getattr(config, "use_mup", False) and takes_output_processor()
    chunk = logprob_chunk if logprob_chunk > 0 and chunked else 0
    model = MegatronCausalLM(gpt, hf, chunk).to(device)
    if activation_checkpointing:   # not Megatron's own recompute: it runs only in train mode and drops autocast
        from learner import fsdp
        fsdp.checkpoint_activations(model, layers(model))
    weights = AutoModelForCausalLM.from_pretrained(model_path, dtype=master_dtype).state_dict()
    model.load_hugging_face_state_dict({k: v.to(device) for k, v in weights.items()})
    return model


def average_gradients(model: torch.nn.Module, group=None) -> None:
    """Average the gradients of data-parallel replicas (one all-reduce per dtype, flattened)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

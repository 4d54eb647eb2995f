"""The Megatron-core backend (learner/megatron.py). The conversions and the config checks run
everywhere; the model itself runs only on a GPU with megatron-core installed (run on the lent
GPU machine: bash bench/gpu_session.sh tests), against the FSDP2 backend and transformers on
the same weights as the oracle."""
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from common.config import ConfigError
from launch.config import build_config
from learner import megatron
from tests.conftest import make_group

on_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and megatron.available()),
                            reason="needs CUDA and megatron-core")


def qwen2(**kw) -> Qwen2Config:
    return Qwen2Config(**{"vocab_size": 19, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                          "max_position_embeddings": 512, "rope_theta": 1e6, **kw})


def llama(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 19, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": False,
                          "max_position_embeddings": 512, **kw})


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_megatron_output_processor_gives_the_full_logits_log_probs_and_entropy(tied):
    """GPTModel's output_processor hook hands over the decoder's output [s, b, h]: the chosen
    tokens' log-probs and entropy of the kept positions, chunked, equal those of the whole
    logits at the sampling temperature (plain torch: runs without megatron-core)."""
    torch.manual_seed(0)
    s, b, h, vocab, kept, temperature = 11, 3, 16, 37, 7, 0.7
    hidden = torch.randn(s, b, h, dtype=torch.float64)
    layer = torch.nn.Linear(h, vocab, bias=False).double()
    shared = torch.randn(vocab, h, dtype=torch.float64) / h ** 0.5   # a tied head: the embedding's weight, passed in
    if tied:
        layer.weight = None
    targets = torch.randint(vocab, (b, kept - 1))
    head = megatron.ChosenLogprobs(chunk=4)
    with head.request(targets, temperature, entropy=True):
        out = head(hidden_states=hidden, output_layer=layer, output_weight=shared if tied else None, labels=None)
    weight = shared if tied else layer.weight
    logits = hidden.transpose(0, 1)[:, -kept:-1] @ weight.T / temperature          # [b, kept-1, V]
    logp = torch.log_softmax(logits, -1)
    assert out.shape == (b, kept - 1, 2)
    torch.testing.assert_close(out[..., 0].double(), logp.gather(-1, targets[..., None])[..., 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., 1].double(), -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [qwen2(), llama()], ids=["qwen2-gqa-bias-tied", "llama-mqa-untied"])
def test_megatron_conversion_round_trip_keeps_every_tensor(config):
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    fused = megatron.to_megatron(state, config)
    back = megatron.to_hugging_face(fused, config)
    expected = {k for k in state if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    assert all(torch.equal(back[k], state[k]) for k in back)
    # Megatron's layout, indexed by hand: per key-value group, its query heads, then k, then v
    d, per = 16, config.num_attention_heads // config.num_key_value_heads
    qkv = fused["decoder.layers.1.self_attention.linear_qkv.weight"]
    q, k, v = (state[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    for g in range(config.num_key_value_heads):
        base = g * (per + 2) * d
        assert torch.equal(qkv[base:base + per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(qkv[base + per * d:base + (per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(qkv[base + (per + 1) * d:base + (per + 2) * d], v[g * d:(g + 1) * d])
    fc1 = fused["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:96], state["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[96:], state["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("config, words", [
    (qwen2(use_sliding_window=True), "sliding-window"),
    (llama(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "plain RoPE"),
    (llama(hidden_act="gelu"), "silu"),
    (llama(mlp_bias=True), "MLP biases"),
])
def test_megatron_refuses_models_it_cannot_hold(config, words):
    with pytest.raises(ValueError, match=words):
        megatron.check_supported(config)


@pytest.mark.parametrize("overrides, key, words", [
    (["trainer.backend=megatron"], "trainer.backend", "GPUs only"),
    (["trainer.backend=deepspeed"], "trainer.backend", "must be one of"),
    (["trainer.tensor_parallel=2"], "trainer.tensor_parallel", "not built"),
])
def test_megatron_config_errors_name_their_key(overrides, key, words):
    with pytest.raises(ConfigError, match=words) as info:
        build_config("async_grpo", "tiny", ["run.wandb=disabled", *overrides])  # wandb: not this test's key
    assert info.value.key == key


# ---- on a GPU -----------------------------------------------------------------------------

def tiny_qwen2(folder, tokenizer_from) -> str:
    """A Qwen2-shaped tiny model (GQA, q/k/v biases, tied head) with the tiny tokenizer."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(qwen2())
    with torch.no_grad():   # biases and norms away from their zero/one init, so a mix-up shows
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src := tokenizer_from / f).exists():
            shutil.copy(src, folder / f)
    return str(folder)


def tiny_llama(folder, tokenizer_from) -> str:
    """A Llama-shaped tiny model (MQA, an untied head) with the tiny tokenizer."""
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(llama())
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src := tokenizer_from / f).exists():
            shutil.copy(src, folder / f)
    return str(folder)


def batch(step: int) -> list:
    return [make_group(group_size=4, length=10 + 3 * i, seed=10 * step + i, rewards=[i % 2, 1, 0, step / 4])
            for i in range(4)]


def learner(model_path, backend, dtype="float32", buffer_address="tcp://127.0.0.1:9", **trainer):
    from common.weights import LocalWeightChannel
    from learner.learner import Learner, TrainerConfig
    from learner.loss import LossConfig

    config = TrainerConfig(gpus=1, backend=backend, batch_groups=4, micro_batch_rows=3, minibatches=2, lr=1e-3,
                           lr_schedule="cosine", warmup_steps=2, max_steps=4, **trainer)
    return Learner(0, model_path, dtype, config, LossConfig(), buffer_address, 5.0, LocalWeightChannel())


def logprobs(one, groups) -> torch.Tensor:
    """The learner's log-probs of the groups' tokens (0 off the policy's tokens), on the CPU."""
    from learner.batch import make_batch
    from learner.learner import _to

    micro = _to(make_batch(groups), one.device)
    with torch.no_grad():
        start, values = one._forward(one.model, micro)
    return (values.float() * micro.loss_mask[:, start:]).cpu()


def hf_logprobs(folder, groups) -> torch.Tensor:
    from learner.batch import make_batch, token_logprobs

    micro = make_batch(groups)
    with torch.no_grad():
        start, values = token_logprobs(AutoModelForCausalLM.from_pretrained(folder).eval(), micro)
    return values * micro.loss_mask[:, start:]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_megatron_logprobs_match_the_fsdp2_backend(tiny_model_path, tmp_path, dtype, tolerance):
    path = tiny_qwen2(tmp_path / "qwen2", Path(tiny_model_path))
    got = {}
    for backend in ("fsdp2", "megatron"):
        one = learner(path, backend, dtype)
        got[backend] = logprobs(one, batch(0))
        one.close()
    diff = (got["fsdp2"] - got["megatron"]).abs().max().item()
    print(f"max |log-prob difference| megatron vs fsdp2, {dtype}: {diff:.3g}")
    assert diff < tolerance


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama], ids=["tied", "untied"])
def test_megatron_chunked_head_gives_its_full_logits_log_probs_entropy_and_gradients(make, tiny_model_path, tmp_path):
    """The output_processor path (trainer.logprob_chunk > 0) against Megatron's own logits
    (logprob_chunk=0) on the same weights and batch, fp32: forward and one backward."""
    from learner.batch import make_batch
    from learner.learner import _to

    path = make(tmp_path / "model", Path(tiny_model_path))
    got = {}
    for chunk in (0, 4):
        one = learner(path, "megatron", "float32", logprob_chunk=chunk)
        assert (one.model.get_output_embeddings() is None) == (chunk == 0)
        micro = _to(make_batch(batch(0)), one.device)
        start, values, entropy = one._forward(one.model, micro, entropy=True)
        mask = micro.loss_mask[:, start:]
        ((values * mask).sum() + 0.1 * (entropy * mask).sum()).backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in one.model.named_parameters() if p.grad is not None}
        got[chunk] = ((values * mask).detach().cpu(), (entropy * mask).detach().cpu(), grads)
        one.close()
    (v0, e0, g0), (v1, e1, g1) = got[0], got[4]
    torch.testing.assert_close(v1, v0, rtol=0, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


@on_gpu
@pytest.mark.gpu
def test_megatron_resume_gives_bit_identical_losses_and_export_gives_its_log_probs(tiny_model_path, tmp_path,
                                                                                  buffer_server):
    from learner import checkpoint

    path = tiny_qwen2(tmp_path / "qwen2", Path(tiny_model_path))
    address = buffer_server().address
    keys = ("loss/policy", "learner/grad_norm", "loss/clip_frac", "learner/lr")
    probe = batch(9)

    def run(one, steps):
        return [[metrics[k] for k in keys] for metrics in (one.train_on(batch(s), [0] * 4) for s in steps)]

    one = learner(path, "megatron", buffer_address=address, activation_checkpointing=True)
    unbroken = run(one, range(4))
    one.close()
    first = learner(path, "megatron", buffer_address=address, activation_checkpointing=True)
    before = run(first, range(2))
    saved = first.checkpoint(str(tmp_path / "checkpoints"))
    at_checkpoint = logprobs(first, probe)
    first.close()
    resumed = learner(path, "megatron", buffer_address=address, activation_checkpointing=True)
    resumed.restore(saved)
    after = run(resumed, range(2, 4))
    assert before + after == unbroken   # exactly: floats compared with ==
    assert checkpoint.backend(saved) == "megatron"

    # Hugging Face folders, from the checkpoint (converted without Megatron) and from the live
    # learner: transformers loads each and gives the learner's log-probs of those weights
    resumed.export(str(tmp_path / "from-learner"))
    at_end = logprobs(resumed, probe)
    resumed.close()
    checkpoint.export(saved, path, tmp_path / "from-checkpoint")
    assert (hf_logprobs(tmp_path / "from-checkpoint", probe) - at_checkpoint).abs().max().item() < 1e-4
    assert (hf_logprobs(tmp_path / "from-learner", probe) - at_end).abs().max().item() < 1e-4
    assert not torch.equal(at_checkpoint, at_end)   # the two exports hold different weights

"""The chunked log-prob head gives the plain projection's log-probs, entropies and gradients."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner import logprob_head
from learner.batch import make_batch, token_logprobs
from tests.conftest import make_group


def _loss_and_grads(model, batch, entropy: bool, autocast: bool) -> tuple:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        start, logprobs, *ent = token_logprobs(model, batch, entropy=entropy)
    mask = batch.loss_mask[:, start:]
    # a loss that weighs every position differently, so a misplaced gradient shows
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view_as(mask) * mask
    loss = (logprobs * weights).sum() + (0.3 * (ent[0] * mask).sum() if entropy else 0.0)
    loss.backward()
    return start, logprobs.detach(), ent[0].detach() if entropy else None, \
        {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_logprob_loss_gives_the_plain_log_probs_entropy_and_gradients(tiny_model_path, temperature, entropy):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    fused = copy.deepcopy(plain)
    assert logprob_head.install(fused, chunk=5)   # several chunks, the last one short
    assert fused.lm_head.weight is fused.model.embed_tokens.weight or not plain.config.tie_word_embeddings
    batch = make_batch([make_group(group_size=4, length=9, seed=s, temperature=temperature) for s in range(2)])
    start, lp, ent, grads = _loss_and_grads(plain, batch, entropy, autocast=False)
    f_start, f_lp, f_ent, f_grads = _loss_and_grads(fused, batch, entropy, autocast=False)
    assert f_start == start
    torch.testing.assert_close(f_lp, lp, rtol=0, atol=1e-5)
    if entropy:
        torch.testing.assert_close(f_ent, ent, rtol=0, atol=1e-5)
    assert grads.keys() == f_grads.keys()
    for name in grads:
        torch.testing.assert_close(f_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_logprobs_under_bf16_autocast_match_the_plain_projection(tiny_model_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    fused = copy.deepcopy(plain)
    logprob_head.install(fused, chunk=3)
    batch = make_batch([make_group(group_size=4, length=9, seed=3)])
    _, lp, _, grads = _loss_and_grads(plain, batch, entropy=False, autocast=True)
    _, f_lp, _, f_grads = _loss_and_grads(fused, batch, entropy=False, autocast=True)
    torch.testing.assert_close(f_lp, lp, rtol=0, atol=2e-2)   # bf16 projection on both sides
    for name in grads:
        torch.testing.assert_close(f_grads[name], grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_the_head_gives_plain_logits_outside_a_request(tiny_model_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    fused = copy.deepcopy(plain)
    logprob_head.install(fused, chunk=4)
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(fused(input_ids=tokens).logits, plain(input_ids=tokens).logits)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert fused.state_dict().keys() == plain.state_dict().keys()


def _learner_figures(model_path, **trainer) -> list:
    from common.weights import LocalWeightChannel
    from learner.learner import Learner, TrainerConfig
    from learner.loss import LossConfig

    config = TrainerConfig(batch_groups=2, micro_batch_rows=3, minibatches=2, lr=1e-2, **trainer)
    learner = Learner(0, model_path, "float32", config, LossConfig(kl_coef=0.01, entropy_coef=0.01),
                      "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    out = []
    for step in range(3):
        groups = [make_group(group_size=4, length=7 + i, seed=10 * step + i, rewards=[i, 1, 0, 0.5]) for i in range(2)]
        metrics = learner.train_on(groups, [0, 0])
        out.append([metrics[k] for k in ("loss/policy", "learner/grad_norm", "loss/kl_reference", "loss/entropy")])
    return out


def test_learner_with_the_chunked_head_trains_as_with_plain_logits(tiny_model_path):
    plain = _learner_figures(tiny_model_path, logprob_chunk=0)
    chunked = _learner_figures(tiny_model_path, logprob_chunk=4)
    torch.testing.assert_close(torch.tensor(chunked[0]), torch.tensor(plain[0]), rtol=1e-4, atol=1e-6)
    # later steps: rounding differences grow through the optimizer (by 3e-4 on another CPU)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=2e-3, atol=1e-5)

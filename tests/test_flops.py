"""Model FLOPs and MFU (learner/flops.py), checked against a count by hand and against the
model's own parameter count; the learner reports tokens/s and TFLOP/s of every step."""
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from learner import flops


def test_the_matmul_flops_are_twice_the_matmul_weights_of_the_model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters()
                         if n.endswith("proj.weight"))   # q k v o gate up down, every layer
    f = flops.per_token(cfg)
    assert f["matmul"] == 2 * matmul_weights
    assert f["vocab"] == 2 * model.lm_head.weight.numel()
    # a row of 10 tokens, the vocabulary projected at 4 of them: 10 x matmul + causal attention
    # (2 x 2 x layers x 32 x 10 / 2 per token) + 4 projections
    assert flops.forward(cfg, [10], 4) == 10 * f["matmul"] + 10 * (2 * 2 * 2 * 32 * 10 // 2) + 4 * f["vocab"]


def test_the_peak_is_known_for_the_lent_gpu_and_unknown_elsewhere():
    assert flops.peak("NVIDIA H200") == pytest.approx(989e12)
    assert flops.peak("cpu") is None


def test_the_learner_reports_tokens_per_second_and_model_tflops_of_each_step(tiny_model_path):
    from common.weights import LocalWeightChannel
    from learner.learner import Learner, TrainerConfig
    from learner.loss import LossConfig
    from tests.conftest import make_group

    groups = [make_group(group_size=4, length=6 + 3 * i, seed=i, rewards=[i % 2, 1, 0, 0.5]) for i in range(2)]
    learner = Learner(0, tiny_model_path, "float32", TrainerConfig(batch_groups=2, epochs=2), LossConfig(),
                      "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    m = learner.train_on(groups, [0, 0])
    rows = [int(n) for g in groups for n in g.lengths]
    policy = sum(int(g.loss_mask.sum()) for g in groups)
    # what the step computed: pi_prox once, then two epochs of forward + backward; the
    # projection at the positions predicting a policy token
    expected = (1 + 3 * 2) * flops.forward(learner.model_config, rows, policy)
    assert m["learner/tflops"] * m["learner/train_s"] * 1e12 == pytest.approx(expected, rel=1e-9)
    assert m["learner/tokens_per_s"] == pytest.approx(m["learner/tokens"] / m["learner/train_s"])
    assert "learner/mfu" not in m   # on a CPU: no known peak

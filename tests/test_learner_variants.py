"""The learner's loss variants end to end on a tiny model: the gradient does not depend on the
micro-batch size under any aggregation, and mini-batches move pi_theta away from pi_prox so the
PPO clip acts."""
import pytest
import torch

from common.weights import LocalWeightChannel
from learner.learner import Learner, TrainerConfig
from learner.loss import AGGREGATIONS, LossConfig
from tests.conftest import make_group


def groups():
    # Groups of different lengths and rewards, behaviour log-probs off-policy.
    return [make_group(group_size=4, length=6 + 3 * i, seed=i, rewards=[i % 2, 1, 0, i / 3]) for i in range(4)]


def learner(model_path, loss: LossConfig, **trainer) -> Learner:
    config = TrainerConfig(batch_groups=4, lr=1e-3, max_grad_norm=1e9, **trainer)
    return Learner(0, model_path, "float32", config, loss, "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())


def gradients(learner: Learner) -> dict:
    return {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_invariance_of_the_gradient_to_the_micro_batch_size(tiny_model_path, aggregation):
    loss = LossConfig(aggregation=aggregation, kl_coef=0.05, entropy_coef=0.01)
    whole, split = learner(tiny_model_path, loss, micro_batch_rows=16), learner(tiny_model_path, loss, micro_batch_rows=3)
    m_whole, m_split = whole.train_on(groups(), [0] * 4), split.train_on(groups(), [0] * 4)
    for name, g in gradients(whole).items():
        torch.testing.assert_close(gradients(split)[name], g, rtol=1e-4, atol=1e-7, msg=name)
    for key in ("loss/policy", "loss/clip_frac", "loss/is_weight_mean", "loss/kl_reference", "loss/entropy"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-4, abs=1e-7), key


def test_loss_aggregations_give_different_gradients(tiny_model_path):
    grads = []
    for aggregation in AGGREGATIONS:
        one = learner(tiny_model_path, LossConfig(aggregation=aggregation), micro_batch_rows=16)
        one.train_on(groups(), [0] * 4)
        grads.append(gradients(one)["model.norm.weight"])
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])


def test_minibatches_move_the_policy_from_the_proximal_one_so_the_clip_acts(tiny_model_path):
    one = learner(tiny_model_path, LossConfig(), micro_batch_rows=4, minibatches=4, epochs=2)
    one.config.lr = 3e-2
    one.optimizer.param_groups[0]["lr"] = 3e-2
    metrics = one.train_on(groups(), [0] * 4)
    clip = metrics["loss/clip_frac_per_minibatch"]
    assert len(clip) == 8 and clip[0] == 0.0  # the first update starts at pi_prox: ratio 1
    assert max(clip[1:]) > 0.0                # later ones left the trust region somewhere
    assert metrics["step"] == 1 and metrics["loss/is_weight_max"] >= metrics["loss/is_weight_mean"]


def test_with_one_update_pi_prox_from_its_own_forward_equals_a_separate_pass(tiny_model_path):
    """minibatches x epochs = 1: the update's forward gives pi_prox (one forward fewer a step);
    the loss and the gradient equal those with pi_prox from a pass of its own before it."""
    from learner.batch import make_batch

    loss = LossConfig(kl_coef=0.05, entropy_coef=0.01)
    results = []
    for separate in (False, True):
        one = learner(tiny_model_path, loss, micro_batch_rows=5)
        micro = one._micro_batches([make_batch(groups())])[0]
        fixed = [one._fixed_logprobs(m, proximal=separate) for m in micro]
        assert (fixed[0][0] is None) != separate
        divisor = float(sum(m.loss_mask.sum() for m in micro))
        sums, _, loss_value, _ = one._update(micro, fixed, divisor)
        results.append((loss_value, sums, gradients(one)))
    (loss_a, sums_a, grads_a), (loss_b, sums_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and sums_a.keys() == sums_b.keys()
    for key in sums_a:
        assert sums_a[key] == pytest.approx(sums_b[key], rel=1e-5, abs=1e-8), key
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_fewer_rows_than_minibatches_is_refused_naming_the_key(tiny_model_path):
    one = learner(tiny_model_path, LossConfig(), minibatches=64)
    with pytest.raises(ValueError, match="trainer.minibatches=64"):
        one.train_on(groups(), [0] * 4)


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    from learner.learner import lr_factor
    config = TrainerConfig(max_steps=10, minibatches=2, lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(config, s) for s in range(20)]  # 10 learner steps x 2 mini-batches
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] > 0.1
    assert lr_factor(config, 20) == pytest.approx(0.1)
    assert lr_factor(TrainerConfig(), 500) == 1.0  # constant, no warm-up


def test_the_learner_reports_the_learning_rate_it_stepped_with(tiny_model_path):
    one = learner(tiny_model_path, LossConfig(), micro_batch_rows=16, warmup_steps=4)
    assert one.train_on(groups(), [0] * 4)["learner/lr"] == pytest.approx(1e-3 / 4)
    assert one.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)


@pytest.mark.parametrize("budget", [40, 90, 10_000])
def test_invariance_of_the_gradient_to_a_token_budget_for_micro_batches(tiny_model_path, budget):
    loss = LossConfig(aggregation="seq_mean_token_sum", kl_coef=0.05)
    rows, packed = learner(tiny_model_path, loss, micro_batch_rows=16), learner(tiny_model_path, loss,
                                                                                 micro_batch_tokens=budget)
    m_rows, m_packed = rows.train_on(groups(), [0] * 4), packed.train_on(groups(), [0] * 4)
    for name, g in gradients(rows).items():
        torch.testing.assert_close(gradients(packed)[name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert m_packed["loss/policy"] == pytest.approx(m_rows["loss/policy"], rel=1e-4)


def test_packing_by_tokens_respects_the_budget_and_keeps_every_row_once():
    from learner.batch import make_batch

    batch = make_batch(groups())                       # 16 rows of 6, 9, 12 and 15 tokens
    lengths = batch.attention_mask.sum(1)
    packed = batch.pack(40)
    assert all(m.rows * m.tokens.shape[1] <= 40 or m.rows == 1 for m in packed)
    assert sorted(int(m.attention_mask.sum()) for m in packed) != [] and \
        sum(int(m.attention_mask.sum()) for m in packed) == int(lengths.sum())
    exact = batch.pack(40, count=len(packed) + 3)
    assert len(exact) == len(packed) + 3 and sum(m.rows for m in exact) == 16
    with pytest.raises(ValueError, match="cannot make 17 micro-batches"):
        batch.pack(40, count=17)


def test_bf16_compute_keeps_float32_master_weights_and_optimizer_state(tiny_model_path):
    """Mixed precision on CPU (autocast): forward in bf16, weights and Adam moments in fp32,
    and the update lands (bf16 weights would lose steps of lr 1e-5 to rounding)."""
    config = TrainerConfig(batch_groups=4, lr=1e-5, micro_batch_rows=16)
    one = Learner(0, tiny_model_path, "bfloat16", config, LossConfig(), "tcp://127.0.0.1:9", 5.0, LocalWeightChannel())
    before = {n: p.detach().clone() for n, p in one.model.named_parameters()}
    one.train_on(groups(), [0] * 4)
    assert all(p.dtype == torch.float32 for p in one.model.parameters())
    assert all(v.dtype == torch.float32 for s in one.optimizer.state.values() for v in s.values() if v.dim())
    moved = [n for n, p in one.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert all((p - before[n]).abs().max() < 1e-4 for n, p in one.model.named_parameters())


def test_activation_checkpointing_gives_the_same_gradient(tiny_model_path):
    loss = LossConfig(kl_coef=0.05)
    plain, recomputed = learner(tiny_model_path, loss), learner(tiny_model_path, loss, activation_checkpointing=True)
    plain.train_on(groups(), [0] * 4)
    recomputed.train_on(groups(), [0] * 4)
    for name, g in gradients(plain).items():
        torch.testing.assert_close(gradients(recomputed)[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_an_update_with_a_non_finite_gradient_is_skipped_and_too_many_in_a_row_fail_naming_the_step(tiny_model_path):
    one = learner(tiny_model_path, LossConfig(), micro_batch_rows=16, max_nonfinite_updates=1)
    embedding = one.model.get_input_embeddings().weight
    finite = embedding.detach().clone()
    with torch.no_grad():
        embedding[3:, 0] = float("inf")   # a fault injected on purpose: every token's hidden state overflows
    before = {n: p.detach().clone() for n, p in one.model.named_parameters()}
    metrics = one.train_on(groups(), [0] * 4)
    assert metrics["learner/skipped_updates"] == 1 and not torch.isfinite(torch.tensor(metrics["learner/grad_norm"]))
    for name, p in one.model.named_parameters():   # nothing moved: the update was skipped
        assert torch.equal(p.detach(), before[name]), name
    assert not one.optimizer.state   # nor did Adam's moments start
    with pytest.raises(FloatingPointError, match=r"learner step 2: .* 2 optimizer update\(s\) in a row, more than "
                                                 r"trainer.max_nonfinite_updates=1"):
        one.train_on(groups(), [0] * 4)
    with torch.no_grad():
        embedding.copy_(finite)
    metrics = one.train_on(groups(), [0] * 4)   # finite again: it trains, and the count in a row restarts
    assert metrics["learner/skipped_updates"] == 2 and one.nonfinite_in_a_row == 0
    assert not torch.equal(embedding.detach(), finite)


def test_the_share_of_flat_groups_is_of_those_whose_completions_all_scored_alike(tiny_model_path):
    # a flat group's advantages are all 0: it moves nothing, and a batch of them trains nothing
    one = learner(tiny_model_path, LossConfig())
    batch = [make_group(group_size=4, length=6, seed=i, rewards=r)
             for i, r in enumerate([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.25]])]
    assert one.train_on(batch, [0] * 4)["reward/flat_groups"] == 0.5
    metrics = one.train_on(batch[:2], [0] * 2)
    assert metrics["reward/flat_groups"] == 1.0 and metrics["learner/grad_norm"] == 0.0


def test_a_group_flat_among_the_rows_that_generated_is_flat_as_the_learner_weighs_it(tiny_model_path):
    # a row that never generated (its episode failed at reset, say) scores 0 and takes no part
    # in the advantages: the other three, all 1, leave the group with no gradient; flat says so
    group = make_group(group_size=4, length=6, seed=0, rewards=[1, 1, 1, 0])
    group.loss_mask[3], group.token_versions[3], group.behaviour_logprobs[3] = 0, -1, 0.0
    group.validate()
    assert group.flat and not make_group(group_size=4, rewards=[1, 1, 1, 0]).flat
    metrics = learner(tiny_model_path, LossConfig()).train_on([group], [0])
    assert metrics["reward/flat_groups"] == 1.0 and metrics["learner/grad_norm"] == 0.0

"""The loss on hand-computed cases: its sign, the clipping, the importance weights, and the
normalisation over the global batch."""
import math

import pytest
import torch

from learner.loss import LossConfig, group_advantages, policy_loss


def one_token(logprob: float, proximal: float, behaviour: float, advantage: float, **config):
    lp = torch.tensor([[logprob]], requires_grad=True)
    loss, metrics = policy_loss(lp, torch.tensor([[proximal]]), torch.tensor([[behaviour]]),
                                torch.tensor([[advantage]]), torch.ones(1, 1), LossConfig(**config))
    loss.backward()
    return loss.item(), lp.grad.item(), {k: float(v) for k, v in metrics.items()}


def test_a_positive_advantage_pushes_the_token_up_and_a_negative_one_down():
    # On-policy (all log-probs equal): loss = -A * exp(0) = -A, d loss / d logprob = -A.
    loss, grad, _ = one_token(-1.0, -1.0, -1.0, advantage=2.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-2.0)  # descent raises the log-prob
    loss, grad, _ = one_token(-1.0, -1.0, -1.0, advantage=-0.5)
    assert loss == pytest.approx(0.5) and grad == pytest.approx(0.5)


def test_ratio_beyond_the_clip_gives_no_gradient_in_the_advantage_direction():
    # ratio pi/pi_prox = e^0.5 = 1.65 > 1 + 0.28 with A > 0: the clipped term wins, gradient 0.
    loss, grad, m = one_token(-0.5, -1.0, -1.0, advantage=1.0)
    assert loss == pytest.approx(-1.28) and grad == 0.0 and m["loss/clip_frac"] == 1.0
    # Same ratio with A < 0 is not clipped (pessimistic max): loss = 1.65, gradient = ratio.
    loss, grad, m = one_token(-0.5, -1.0, -1.0, advantage=-1.0)
    assert loss == pytest.approx(math.exp(0.5)) and grad == pytest.approx(math.exp(0.5))
    assert m["loss/clip_frac"] == 0.0
    # Below 1 - clip_low with A < 0: clipped, gradient 0.
    loss, grad, _ = one_token(-2.0, -1.0, -1.0, advantage=-1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0


def test_truncated_importance_weight_is_capped():
    # pi_prox / mu = e^(-1 - -3) = e^2 = 7.39 > cap 2: weight 2, so loss = -2 * A.
    loss, grad, m = one_token(-1.0, -1.0, -3.0, advantage=1.5, is_cap=2.0)
    assert loss == pytest.approx(-3.0) and grad == pytest.approx(-3.0)
    assert m["loss/is_weight_mean"] == 2.0 and m["loss/is_truncated_frac"] == 1.0
    # Below the cap the weight is the plain ratio: e^(-1 - -1.5) = e^0.5.
    loss, _, m = one_token(-1.0, -1.0, -1.5, advantage=1.0, is_cap=2.0)
    assert loss == pytest.approx(-math.exp(0.5)) and m["loss/is_weight_mean"] == pytest.approx(math.exp(0.5))


def test_masking_drops_tokens_with_extreme_weights_either_way():
    for behaviour in (-3.0, 0.0):  # weights e^2 (too high) and e^-1 (too low for cap 2)
        loss, grad, m = one_token(-1.0, -1.0, behaviour, advantage=1.0, is_correction="mask", is_cap=2.0)
        assert loss == 0.0 and grad == 0.0 and m["loss/is_masked_frac"] == 1.0
    loss, _, _ = one_token(-1.0, -1.0, -1.2, advantage=1.0, is_correction="mask", is_cap=2.0)
    assert loss == pytest.approx(-math.exp(0.2))  # e^0.2 lies inside [1/2, 2]: kept, weighted


def test_behaviour_objective_clips_against_the_actor_policy():
    # ratio pi/mu = e^1 = 2.72 with A > 0: clipped at 1.28, no gradient; no extra weight.
    loss, grad, m = one_token(-1.0, -1.0, -2.0, advantage=1.0, objective="behaviour", is_cap=2.0)
    assert loss == pytest.approx(-1.28) and grad == 0.0
    # the staleness signals still say how far the data is off policy: log pi_prox/mu = 1, w above the cap
    assert m["loss/kl_behaviour"] == pytest.approx(math.e - 2) and m["loss/is_truncated_frac"] == 1.0
    assert m["loss/is_weight_mean"] == 1.0   # and nothing was reweighted


def test_masked_tokens_contribute_nothing():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([[-1.0, -1.0]]), torch.tensor([[1.0, 1.0]]),
                          torch.tensor([[1.0, 0.0]]), LossConfig())
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and lp.grad.tolist() == [[-1.0, 0.0]]


def test_group_advantages_are_centred_and_scaled_within_each_group():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [5.0, 5.0, 5.0, 5.0]]))
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all-equal rewards carry no signal
    assert group_advantages(torch.tensor([[2.0, 0.0]]), scale_by_std=False).tolist() == [[1.0, -1.0]]


def test_loss_sequence_level_weight_is_the_truncated_geometric_mean_of_the_rows_tokens():
    lp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.2, -1.6, -9.0]])       # log w = 0.2, 0.6 on policy tokens; the third is masked
    mask, adv = torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3)
    config = LossConfig(is_correction="sequence", is_cap=2.0)
    loss, m = policy_loss(lp, lp.detach(), behaviour, adv, mask, config)
    w = math.exp(0.4)                                    # exp(mean(0.2, 0.6)), under the cap
    assert loss.item() == pytest.approx(-2 * w) and float(m["loss/is_weight_mean"]) == pytest.approx(2 * w)
    loss, m = policy_loss(lp, lp.detach(), torch.tensor([[-3.0, -3.0, 0.0]]), adv, mask, config)
    assert loss.item() == pytest.approx(-4.0) and float(m["loss/is_truncated_frac"]) == 2.0  # e^2 capped at 2


@pytest.mark.parametrize("estimator, value, grad", [
    ("k1", 0.5, 1.0),                                               # log pi - log ref
    ("k3", math.exp(-0.5) + 0.5 - 1, 1 - math.exp(-0.5)),           # r - log r - 1, r = ref / pi
])
def test_loss_kl_to_the_reference_policy(estimator, value, grad):
    lp = torch.tensor([[-1.0]], requires_grad=True)
    config = LossConfig(kl_coef=0.1, kl_estimator=estimator)
    loss, m = policy_loss(lp, lp.detach(), lp.detach(), torch.zeros(1, 1), torch.ones(1, 1), config,
                          reference_logprobs=torch.tensor([[-1.5]]))
    loss.backward()
    assert float(m["loss/kl_reference"]) == pytest.approx(value)
    assert loss.item() == pytest.approx(0.1 * value) and lp.grad.item() == pytest.approx(0.1 * grad)


def test_loss_entropy_bonus_lowers_the_loss_and_is_reported():
    lp = torch.tensor([[-1.0]], requires_grad=True)
    entropy = torch.tensor([[2.0]], requires_grad=True)
    loss, m = policy_loss(lp, lp.detach(), lp.detach(), torch.zeros(1, 1), torch.ones(1, 1),
                          LossConfig(entropy_coef=0.01), entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx(-0.02) and entropy.grad.item() == pytest.approx(-0.01)
    assert float(m["loss/entropy"]) == 2.0


@pytest.mark.parametrize("aggregation, weights, divisor", [
    ("token_mean", [[1, 1, 1, 0], [1, 0, 0, 0]], 4),
    ("seq_mean_token_sum", [[1, 1, 1, 0], [1, 0, 0, 0]], 2),
    ("seq_mean_token_mean", [[1 / 3, 1 / 3, 1 / 3, 0], [1, 0, 0, 0]], 2),
])
def test_loss_aggregation_weighs_tokens_and_counts_the_divisor(aggregation, weights, divisor):
    from learner.loss import token_weights
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got, count = token_weights(mask, aggregation)
    assert torch.allclose(got[:2], torch.tensor(weights, dtype=torch.float32)) and got[2].tolist() == [0.0] * 4
    assert count == divisor

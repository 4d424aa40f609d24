"""Losses: hand-computed values, layouts, reweighting sums, DPO signs."""

import math

import pytest
import torch

from vargpt.training.losses import (
    IGNORE_INDEX,
    bit_logprob,
    bit_loss,
    dpo_loss,
    dpo_metrics,
    published_text_labels,
    scale_weights,
    text_loss,
)

LN3 = math.log(3.0)


def test_text_loss_is_shifted_and_masked():
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([0.0, LN3])  # predicts label[1] = 0 with p = 1/4
    logits[0, 1] = torch.tensor([2.0, 2.0])  # predicts label[2] = 1 with p = 1/2
    logits[0, 2] = torch.tensor([9.0, -9.0])  # last position predicts nothing
    only_first = torch.tensor([[IGNORE_INDEX, 0, IGNORE_INDEX]])
    both = torch.tensor([[IGNORE_INDEX, 0, 1]])
    assert text_loss(logits, only_first).item() == pytest.approx(math.log(4))
    assert text_loss(logits, both).item() == pytest.approx((math.log(4) + math.log(2)) / 2)


def test_text_loss_without_labels_is_zero_with_a_graph():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = text_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_published_text_labels_supervise_everything_but_image_pads():
    ids = torch.tensor([[5, 6, 9, 9, 7]])
    assert published_text_labels(ids, 9).tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX, 7]]


def test_bit_loss_mean_by_hand_and_both_layouts():
    logits_BLD2 = torch.tensor([[[[0.0, LN3], [0.0, 0.0]]]])  # bit 0: p(1) = 3/4; bit 1: p(0) = 1/2
    bits = torch.tensor([[[1, 0]]])
    want = (math.log(4 / 3) + math.log(2)) / 2
    assert bit_loss(logits_BLD2, bits).item() == pytest.approx(want)
    assert bit_loss(logits_BLD2.flatten(-2), bits).item() == pytest.approx(want)  # columns 2d, 2d+1 = bit d


def test_scale_weights_sum_to_one_with_infinity_ratios():
    w = scale_weights(((1, 1, 1), (1, 2, 2)))  # areas 1 and 4: raw weights 2/1 and 2/2
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 6, 1 / 6, 1 / 6, 1 / 6]))
    assert scale_weights(((1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6))).sum().item() == pytest.approx(1.0)


def test_scale_reweighted_bit_loss_by_hand():
    schedule = ((1, 1, 1), (1, 2, 2))
    logits = torch.zeros(1, 5, 1, 2)
    logits[0, 0, 0] = torch.tensor([0.0, LN3])  # token 0 CE = ln(4/3), tokens 1..4 CE = ln 2
    bits = torch.ones(1, 5, 1, dtype=torch.long)
    got = bit_loss(logits, bits, reduction="scale_reweighted", schedule=schedule).item()
    assert got == pytest.approx(math.log(4 / 3) / 3 + 4 * math.log(2) / 6)
    assert bit_loss(logits, bits).item() == pytest.approx((math.log(4 / 3) + 4 * math.log(2)) / 5)
    with pytest.raises(ValueError):
        bit_loss(logits, bits, reduction="scale_reweighted")


def test_bit_logprob_sums_and_matches_mean_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 4, 2)
    bits = torch.randint(0, 2, (3, 7, 4))
    lp = bit_logprob(logits, bits)
    assert lp.shape == (3,)
    assert (-lp.sum() / (3 * 7 * 4)).item() == pytest.approx(bit_loss(logits, bits).item(), rel=1e-6)
    assert torch.allclose(bit_logprob(logits, bits, average=True), lp / 7)
    zero = bit_logprob(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, dtype=torch.long))
    assert zero.item() == pytest.approx(6 * math.log(0.5))


def test_bit_logprob_scale_weights_tie_to_the_scale_reweighted_loss():
    torch.manual_seed(0)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]  # 14 tokens
    logits, bits = torch.randn(2, 14, 4, 2), torch.randint(0, 2, (2, 14, 4))
    w_L = scale_weights(schedule) * 14
    lp = bit_logprob(logits, bits, weights_L=w_L)
    # the weighted sum over tokens and bits is minus the scale-reweighted loss, times tokens x bits
    assert (-lp.mean() / (14 * 4)).item() == pytest.approx(
        bit_loss(logits, bits, reduction="scale_reweighted", schedule=schedule).item(), rel=1e-5)
    assert torch.allclose(bit_logprob(logits, bits, weights_L=torch.ones(14)), bit_logprob(logits, bits))
    coarse = torch.zeros(14)
    coarse[0] = 1.0  # only the 1x1 scale counts
    assert torch.allclose(bit_logprob(logits, bits, weights_L=coarse), bit_logprob(logits[:, :1], bits[:, :1]))
    with pytest.raises(ValueError, match="token weights"):
        bit_logprob(logits, bits, weights_L=torch.ones(13))


def test_dpo_sigmoid_by_hand_and_sign_conventions():
    pol_c, pol_r, ref_c, ref_r = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    res = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert res.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))  # -log sigmoid(0.1 * 2)
    assert res.chosen_rewards.item() == pytest.approx(0.1) and res.rejected_rewards.item() == pytest.approx(-0.1)
    m = dpo_metrics(res.chosen_rewards, res.rejected_rewards)
    assert m["rewards_accuracy"].item() == 1.0 and m["rewards_margin"].item() == pytest.approx(0.2)
    same = dpo_loss(pol_c, pol_r, pol_c, pol_r, beta=0.5)  # policy = reference: ln 2, zero rewards
    assert same.loss.item() == pytest.approx(math.log(2)) and same.chosen_rewards.item() == 0.0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pol = torch.tensor([-5.0, -6.0], requires_grad=True)
    res = dpo_loss(pol[:1], pol[1:], torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.1)
    res.loss.backward()
    assert pol.grad[0] < 0 < pol.grad[1]


def test_dpo_other_losses_and_batch_mean():
    args = (torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -10.0]), torch.tensor([-11.0, -10.0]),
            torch.tensor([-11.0, -10.0]))
    assert dpo_loss(*args, beta=0.1, loss_type="ipo").loss.item() == pytest.approx(((2 - 5) ** 2 + 25) / 2)
    assert dpo_loss(*args, beta=0.1, loss_type="hinge").loss.item() == pytest.approx((0.8 + 1.0) / 2)
    smooth = dpo_loss(*(a[:1] for a in args), beta=0.1, label_smoothing=0.1).loss.item()
    want = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert smooth == pytest.approx(want)


def test_dpop_penalises_only_a_chosen_logprob_below_the_reference():
    ref_c, ref_r = torch.tensor([-10.0]), torch.tensor([-10.0])
    # both fell, the rejected one more: DPO sees margin 2; DPO-Positive subtracts 50 * 3 for the chosen's fall
    pol_c, pol_r = torch.tensor([-13.0]), torch.tensor([-15.0])
    assert dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1).loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    pos = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1, dpop_lambda=50.0).loss.item()
    assert pos == pytest.approx(math.log1p(math.exp(-0.1 * (2 - 150))))
    up = torch.tensor([-9.0])  # the chosen rose: no penalty
    assert dpo_loss(up, pol_r, ref_c, ref_r, beta=0.1, dpop_lambda=50.0).loss.item() == pytest.approx(
        dpo_loss(up, pol_r, ref_c, ref_r, beta=0.1).loss.item())
    pol = torch.tensor([-13.0, -15.0], requires_grad=True)  # the penalty's gradient raises the chosen log-prob
    dpo_loss(pol[:1], pol[1:], ref_c, ref_r, beta=0.1, dpop_lambda=50.0).loss.backward()
    assert pol.grad[0] < 0 and abs(pol.grad[0]) > 10 * abs(pol.grad[1])

"""Reward-model losses, PPO pieces and reward metrics against hand-worked numbers."""

import math

import pytest
import torch

from ulma.rlhf import losses as RL
from ulma.rlhf.metrics import calibration, rankdata, spearman
from ulma.rlhf.ppo import response_mask

t = torch.tensor


def close(x, expected, atol=1e-6):
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), atol=atol, rtol=0)


def test_bradley_terry_eq2():
    # equal rewards: -log sigma(0) = log 2; r_w - r_l = 2: log(1 + e^-2) = 0.126928
    out = RL.bradley_terry_loss(t([0.5, 3.0, 0.0]), t([0.5, 1.0, 2.0]))
    assert out.tolist() == pytest.approx([math.log(2), 0.126928, 2.126928], abs=1e-6)
    # only the difference matters
    assert RL.bradley_terry_loss(t([10.5]), t([9.5])).item() == pytest.approx(RL.bradley_terry_loss(t([1.0]), t([0.0])).item())


def test_binary_reward_loss_eq7_with_the_typo_fixed():
    # -z log sigma(r) - (1-z) log(1 - sigma(r)): r=2 -> 0.126928 (z=1), 2.126928 (z=0); r=0 -> log 2 either way
    out = RL.binary_reward_loss(t([2.0, 2.0, 0.0, 0.0]), t([1.0, 0.0, 1.0, 0.0]))
    assert out.tolist() == pytest.approx([0.126928, 2.126928, math.log(2), math.log(2)], abs=1e-6)
    # the paper's printed log sigma(1 - r) would give -log sigma(1 - 2) = 1.313262 for z=0, r=2: not what we compute
    assert out[1].item() != pytest.approx(1.313262, abs=1e-3)
    assert torch.isfinite(RL.binary_reward_loss(t([200.0, -200.0]), t([0.0, 1.0]))).all()  # 200 each, no inf


def test_mse_reward_loss_eq9():
    assert RL.mse_reward_loss(t([0.5, -1.0]), t([1.0, 1.0])).tolist() == pytest.approx([0.25, 4.0])


def test_kl_estimates_are_zero_when_policy_equals_reference():
    logps = t([[-1.3, -0.2, -4.0]])
    for est in ("k1", "k3"):
        assert RL.kl_penalty(logps, logps.clone(), est).tolist() == [[0.0, 0.0, 0.0]]
    # logp = -1, ref = -2: k1 = 1; k3 = e^-1 - 1 + 1 = 0.367879
    assert RL.kl_penalty(t([-1.0]), t([-2.0]), "k1").item() == pytest.approx(1.0)
    assert RL.kl_penalty(t([-1.0]), t([-2.0]), "k3").item() == pytest.approx(math.exp(-1), abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        RL.kl_penalty(logps, logps, "k2")


def test_shaped_rewards_put_the_score_on_the_last_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]]).bool()
    out = RL.shaped_rewards(t([1.0, 2.0]), kl, mask, beta=0.5)
    close(out, [[-0.05, -0.1, -0.15 + 1.0], [-0.25 + 2.0, 0.0, 0.0]])


def test_gae_three_steps_by_hand():
    """gamma=0.9, lam=0.5, reward 1 on the last of 3 tokens, V = (0.5, 0.6, 0.7):
    A2 = 1 - 0.7 = 0.3;  A1 = (0.9*0.7 - 0.6) + 0.45*0.3 = 0.165;  A0 = (0.9*0.6 - 0.5) + 0.45*0.165 = 0.11425.
    Second row, 2 tokens + padding (V there is garbage): A1 = 1 - 0.4 = 0.6; A0 = (0.36 - 0.2) + 0.45*0.6 = 0.43."""
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = t([[0.5, 0.6, 0.7], [0.2, 0.4, 99.0]])
    mask = t([[1, 1, 1], [1, 1, 0]]).bool()
    adv, ret = RL.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[0.11425, 0.165, 0.3], [0.43, 0.6, 0.0]])
    close(ret, [[0.61425, 0.765, 1.0], [0.63, 1.0, 0.0]])


def test_whitening():
    out = RL.masked_whiten(t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]]).bool())
    close(out, [[-1.0, 0.0, 1.0, 0.0]])  # unbiased std of 1, 2, 3 is 1; the masked 50 plays no part
    assert RL.masked_mean(t([1.0, 2.0, 30.0]), t([1, 1, 0]).bool()).item() == pytest.approx(1.5)


def test_clipped_policy_loss_inside_and_outside_the_clip_range():
    """ratio 1.1, A=2 (inside): -2.2, gradient -A*ratio; ratio 1.5, A=1 (outside): -1.2 and no
    gradient; ratio 1.5, A=-1: the unclipped 1.5 wins (a clip never helps a bad move)."""
    old = torch.zeros(3)
    logps = torch.log(t([1.1, 1.5, 1.5])).requires_grad_()
    loss, clipped = RL.clipped_policy_loss(logps, old, t([2.0, 1.0, -1.0]), clip_range=0.2)
    assert loss.tolist() == pytest.approx([-2.2, -1.2, 1.5], abs=1e-6)
    assert clipped.tolist() == [False, True, False]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-2.2, 0.0, 1.5], abs=1e-6)


def test_clipped_value_loss():
    # old 0, new 1, target 1: unclipped 0, clipped (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64 = 0.32
    # old 0, new 0.1, target 1: both 0.81 -> 0.405
    loss, clipped = RL.clipped_value_loss(t([1.0, 0.1]), t([0.0, 0.0]), t([1.0, 1.0]), clip_range=0.2)
    assert loss.tolist() == pytest.approx([0.32, 0.405], abs=1e-6)
    assert clipped.tolist() == [True, False]


def test_entropy_from_logits():
    # p = (1/4, 3/4): H = 0.25 ln 4 + 0.75 ln(4/3) = 0.562335; uniform over 5: ln 5
    logits = torch.stack([t([0.0, math.log(3.0), -1e9, -1e9, -1e9]), torch.zeros(5)])[:, None, :]
    assert RL.entropy_from_logits(logits, chunk_rows=1).flatten().tolist() == pytest.approx([0.562335, math.log(5)], abs=1e-5)


def test_response_mask_stops_after_the_first_eos():
    eos = 2
    resp = t([[5, 6, 2, 2], [2, 7, 7, 2], [5, 6, 7, 8]])
    assert response_mask(resp, eos).int().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_spearman_with_ties_and_ranks():
    assert rankdata(t([3.0, 1.0, 3.0])).tolist() == [2.5, 1.0, 2.5]
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = 0.948683
    assert spearman(t([1.0, 2.0, 2.0, 3.0]), t([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.948683, abs=1e-6)
    assert spearman(t([1.0, 5.0, 9.0]), t([0.1, 0.2, 0.3])) == pytest.approx(1.0)
    assert spearman(t([1.0, 5.0, 9.0]), t([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_calibration_by_hand():
    """p = (0.1, 0.4, 0.6, 0.9), z = (0, 1, 1, 1), 2 bins: |0.5 - 0.25| and |1 - 0.75| -> ECE 0.25;
    Brier (0.01 + 0.36 + 0.16 + 0.01) / 4 = 0.135."""
    p = t([0.1, 0.4, 0.6, 0.9])
    out = calibration(torch.log(p / (1 - p)), t([0.0, 1.0, 1.0, 1.0]), bins=2)
    assert out["ece"] == pytest.approx(0.25, abs=1e-6)
    assert out["brier"] == pytest.approx(0.135, abs=1e-6)
    expected_log_loss = -(math.log(0.9) + math.log(0.4) + math.log(0.6) + math.log(0.9)) / 4
    assert out["log_loss"] == pytest.approx(expected_log_loss, abs=1e-6)

"""Tests of ulma.losses against values worked out by hand with math.log / math.exp.

Every expected number is computed independently in the test (the arithmetic is
written out); the function under test is never used to produce an expectation.
"""

from __future__ import annotations

import math

import pytest
import torch

from ulma.losses import (
    dpo_loss,
    group_mean,
    implicit_reward,
    negative_dpo_loss,
    pointwise_dpo_loss,
    pointwise_dpo_mse_loss,
    positive_dpo_loss,
    sft_loss,
    token_unlikelihood_loss,
    ulma_continuous_loss,
    ulma_loss,
    unlearning_loss,
    unlikelihood_loss,
)

D = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=D)


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=D)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.to(D), expected, atol=tol, rtol=tol), (actual, expected)


def softplus(x: float) -> float:
    # -log sigma(-x) = log(1 + e^x), written out by hand.
    return math.log(1.0 + math.exp(x))


# Shared hand example: policy=-10, ref=-12, beta=0.1 -> r_hat = 0.1*(-10+12) = 0.2.
R = 0.2
NLL_POS = math.log(1 + math.exp(-R))  # -log sigma(0.2)     = 0.598139...
NLL_NEG = math.log(1 + math.exp(R))  # -log(1 - sigma(0.2)) = 0.798139...


def test_hand_constants():
    assert NLL_POS == pytest.approx(0.5981388693815918)
    assert NLL_NEG == pytest.approx(0.7981388693815918)


# ---------------------------------------------------------------- implicit reward


def test_implicit_reward():
    # 0.1*(-10 - -12) = 0.2 ; 0.1*(-3 - -1) = -0.2 ; 0.1*(0-0) = 0
    close(implicit_reward(t(-10.0, -3.0, 0.0), t(-12.0, -1.0, 0.0)), [0.2, -0.2, 0.0])  # default beta=0.1
    # 0.5*(-3 - -1) = -1.0
    close(implicit_reward(t(-3.0), t(-1.0), beta=0.5), [-1.0])


def test_log_z_shifts_reward_by_beta_log_z():
    # r_hat = 0.1*2 + 0.1*0.5 = 0.25 ; with beta=0.2: 0.2*2 + 0.2*(-1) = 0.2
    close(implicit_reward(t(-10.0), t(-12.0), beta=0.1, log_z=0.5), [0.25])
    close(implicit_reward(t(-10.0), t(-12.0), beta=0.2, log_z=-1.0), [0.2])
    # Per-example log_z tensor: 0.2 + 0.1*[0, 1] = [0.2, 0.3]
    close(implicit_reward(t(-10.0, -10.0), t(-12.0, -12.0), beta=0.1, log_z=t(0.0, 1.0)), [0.2, 0.3])
    # ... and it flows into the losses: z=1 -> log(1 + e^-0.25)
    losses, rewards = pointwise_dpo_loss(t(-10.0), t(-12.0), t(1.0), beta=0.1, log_z=0.5)
    close(losses, [math.log(1 + math.exp(-0.25))])
    close(rewards, [0.25])
    # ULMA negative: -log(1 - sigma(0.25)) = log(1 + e^0.25)
    losses, _ = ulma_loss(t(-10.0), t(-12.0), t(0.0), beta=0.1, log_z=0.5)
    close(losses, [math.log(1 + math.exp(0.25))])


# ---------------------------------------------------------------- SFT / unlearning


def test_sft_loss():
    close(sft_loss(t(-10.0, -0.5, 0.0)), [10.0, 0.5, 0.0])


def test_unlearning_loss():
    close(unlearning_loss(t(-10.0, -0.5, 0.0)), [-10.0, -0.5, 0.0])


def test_unlikelihood_loss():
    # z=1 -> -logp = 10 ; z=0 -> +logp = -10 ; z=0 -> -2.5
    close(unlikelihood_loss(t(-10.0, -10.0, -2.5), t(1.0, 0.0, 0.0)), [10.0, -10.0, -2.5])


# ---------------------------------------------------------------- DPO


def test_dpo_loss_hand_values():
    # ex0: chosen 0.1*(-10+11)=0.1, rejected 0.1*(-12+11)=-0.1, margin 0.2 -> log(1+e^-0.2)
    # ex1: chosen 0.1*(-5+4)=-0.1, rejected 0.1*(-3+4)=0.1, margin -0.2 -> log(1+e^0.2)
    # ex2: chosen 0.1*(-1+6)=0.5, rejected 0.1*(-8+3)=-0.5, margin 1.0 -> log(1+e^-1)
    losses, cr, rr = dpo_loss(t(-10.0, -5.0, -1.0), t(-12.0, -3.0, -8.0), t(-11.0, -4.0, -6.0), t(-11.0, -4.0, -3.0))
    close(losses, [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2)), math.log(1 + math.exp(-1.0))])
    close(cr, [0.1, -0.1, 0.5])
    close(rr, [-0.1, 0.1, -0.5])


def test_dpo_loss_beta():
    # beta=0.5: chosen 0.5*(-5+4)=-0.5, rejected 0.5*(-3+4)=0.5, margin -1 -> log(1+e^1) = 1.31326...
    losses, _, _ = dpo_loss(t(-5.0), t(-3.0), t(-4.0), t(-4.0), beta=0.5)
    close(losses, [math.log(1 + math.e)])
    assert losses.item() == pytest.approx(1.3132616875182228)


def test_dpo_is_log2_when_policy_equals_reference():
    pc, pr = t(-3.0, -40.0, -7.5), t(-9.0, -1.0, -7.5)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    close(losses, [math.log(2)] * 3)  # -log sigma(0) = log 2
    close(cr, [0.0] * 3)
    close(rr, [0.0] * 3)


def test_dpo_rewards_are_detached():
    pc = t(-1.0, -2.0).requires_grad_()
    losses, cr, rr = dpo_loss(pc, t(-3.0, -3.0), t(-1.0, -1.0), t(-1.0, -1.0))
    assert losses.requires_grad and not cr.requires_grad and not rr.requires_grad


# ---------------------------------------------------------------- point-wise DPO


def test_pointwise_dpo_hand_values():
    # r_hat = [0.2, 0.2, 0.1*(-7+5)=-0.2]; z = [1, 0, 1]
    # -> [log(1+e^-0.2), log(1+e^0.2), -log sigma(-0.2)=log(1+e^0.2)]
    losses, rewards = pointwise_dpo_loss(t(-10.0, -10.0, -7.0), t(-12.0, -12.0, -5.0), t(1.0, 0.0, 1.0))
    close(losses, [NLL_POS, NLL_NEG, NLL_NEG])
    close(rewards, [0.2, 0.2, -0.2])
    assert not rewards.requires_grad


def test_pointwise_dpo_soft_labels():
    # z=0.3 -> 0.3*log(1+e^-0.2) + 0.7*log(1+e^0.2)
    losses, _ = pointwise_dpo_loss(t(-10.0), t(-12.0), t(0.3))
    close(losses, [0.3 * NLL_POS + 0.7 * NLL_NEG])


def test_pointwise_dpo_is_stable_for_large_rewards():
    # r_hat = 0.1*(0 - -1000) = 100; z=0 -> log(1+e^100) = 100 + log(1+e^-100) ~ 100
    losses, _ = pointwise_dpo_loss(t(0.0, 0.0), t(-1000.0, 1000.0), t(0.0, 1.0))
    # z=1 with r_hat=-100 -> log(1+e^100) ~ 100 as well
    close(losses, [100.0, 100.0], tol=1e-12)


def test_pointwise_dpo_mse_hand_values():
    # r_hat = [0.2, 0.2, 0.1*(-9+6)=-0.3]
    # (1-0.2)^2=0.64 ; (0-0.2)^2=0.04 ; (2.5+0.3)^2=7.84
    losses, rewards = pointwise_dpo_mse_loss(t(-10.0, -10.0, -9.0), t(-12.0, -12.0, -6.0), t(1.0, 0.0, 2.5))
    close(losses, [0.64, 0.04, 7.84])
    close(rewards, [0.2, 0.2, -0.3])


def test_positive_and_negative_dpo():
    # Positive DPO = Eq. 8 with z=1: r_hat=[0.2, -0.2] -> [log(1+e^-0.2), log(1+e^0.2)]
    losses, rewards = positive_dpo_loss(t(-10.0, -7.0), t(-12.0, -5.0))
    close(losses, [NLL_POS, NLL_NEG])
    close(rewards, [0.2, -0.2])
    # Negative DPO = Eq. 8 with z=0: -log(1-sigma(r)) = log(1+e^r) -> [log(1+e^0.2), log(1+e^-0.2)]
    losses, _ = negative_dpo_loss(t(-10.0, -7.0), t(-12.0, -5.0))
    close(losses, [NLL_NEG, NLL_POS])
    # beta=1: r_hat = -10+12 = 2 -> z=1: log(1+e^-2); z=0: log(1+e^2)
    close(positive_dpo_loss(t(-10.0), t(-12.0), beta=1.0)[0], [math.log(1 + math.exp(-2))])
    close(negative_dpo_loss(t(-10.0), t(-12.0), beta=1.0)[0], [math.log(1 + math.exp(2))])


def _tiny_policy_logp(seed: int = 0):
    """A real differentiable policy: Linear(4 -> vocab 6), log-softmax, sum of
    the log-probs of a fixed 3-token response = log pi(y|x)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 6).to(D)
    x = torch.randn(3, 4, dtype=D)  # one "hidden state" per response position
    y = torch.tensor([2, 0, 5])  # the response tokens
    token_logps = torch.log_softmax(model(x), dim=-1).gather(-1, y[:, None]).squeeze(-1)
    return model, token_logps.sum().reshape(1)


@pytest.mark.parametrize("z", [1.0, 0.0])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_pointwise_dpo_gradient_identity(z, beta):
    # §4.2: grad L = -beta * (z*(1 - sigma(r)) - (1-z)*sigma(r)) * grad log pi(y|x)
    model, logp = _tiny_policy_logp()
    params = list(model.parameters())
    ref = logp.detach() + 0.8  # a fixed reference, so r_hat = beta*(-0.8) != 0
    grad_logp = torch.autograd.grad(logp.sum(), params, retain_graph=True)
    loss, _ = pointwise_dpo_loss(logp, ref, torch.tensor([z], dtype=D), beta=beta)
    grad_loss = torch.autograd.grad(loss.sum(), params)
    r = beta * (-0.8)
    sig = 1.0 / (1.0 + math.exp(-r))
    coef = -beta * (z * (1 - sig) - (1 - z) * sig)
    assert coef != 0.0
    for g_loss, g_logp in zip(grad_loss, grad_logp):
        assert torch.allclose(g_loss, coef * g_logp, atol=1e-12, rtol=1e-9)


def test_ulma_positive_gradient_is_sft_gradient():
    model, logp = _tiny_policy_logp(seed=1)
    params = list(model.parameters())
    grad_sft = torch.autograd.grad(sft_loss(logp).sum(), params, retain_graph=True)
    loss, _ = ulma_loss(logp, logp.detach() - 3.0, torch.ones(1, dtype=D))
    grad_ulma = torch.autograd.grad(loss.sum(), params)
    for a, b in zip(grad_ulma, grad_sft):
        assert torch.allclose(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------- ULMA


def test_ulma_binary_hand_values():
    # z=1 -> -logp = 10 ; z=0 -> -log(1 - sigma(0.2)) = log(1+e^0.2)
    losses, rewards = ulma_loss(t(-10.0, -10.0), t(-12.0, -12.0), t(1.0, 0.0))
    close(losses, [10.0, NLL_NEG])
    close(rewards, [0.2, 0.2])


def test_ulma_binary_matches_sft_and_negative_pointwise():
    policy = t(-10.0, -3.5, -20.0, -0.25)
    ref = t(-12.0, -4.0, -19.0, -1.0)
    ones, zeros = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    u1, _ = ulma_loss(policy, ref, ones, beta=0.3)
    assert torch.equal(u1, sft_loss(policy))  # z=1: exactly SFT
    u0, _ = ulma_loss(policy, ref, zeros, beta=0.3)
    p0, _ = pointwise_dpo_loss(policy, ref, zeros, beta=0.3)
    close(u0, p0, tol=1e-14)  # z=0: point-wise DPO negative term


def test_ulma_continuous_paper_vs_authors():
    # r_hat = 0.1*[-10+12, -20+20, -5+6] = [0.2, 0.0, 0.1]
    # labels [1.0, 0.5, -1.0]; only ex0 is positive
    # MSE: (1-0.2)^2=0.64 ; (0.5-0)^2=0.25 ; (-1-0.1)^2=1.21 ; NLL of ex0 = 10
    policy, ref = t(-10.0, -20.0, -5.0), t(-12.0, -20.0, -6.0)
    labels, is_pos = t(1.0, 0.5, -1.0), torch.tensor([True, False, False])
    paper, rewards = ulma_continuous_loss(policy, ref, labels, is_pos, form="paper")
    close(paper, [0.64 + 10.0, 0.25, 1.21])  # MSE on all + NLL on positives
    close(rewards, [0.2, 0.0, 0.1])
    authors, _ = ulma_continuous_loss(policy, ref, labels, is_pos, form="authors")
    close(authors, [10.0, 0.25, 1.21])  # MSE only on non-positives + NLL on positives
    default, _ = ulma_continuous_loss(policy, ref, labels, is_pos)
    close(default, [10.64, 0.25, 1.21])  # default form is the paper's


def test_ulma_continuous_unknown_form():
    with pytest.raises(ValueError, match="form"):
        ulma_continuous_loss(t(-1.0), t(-1.0), t(0.0), torch.tensor([False]), form="mse")


# ---------------------------------------------------------------- token unlikelihood


def test_token_unlikelihood_hand_values():
    # ex0 positive, tokens p=0.5, 0.9 (third is padding): -log 0.5 - log 0.9
    # ex1 negative, tokens p=0.5, 0.9, 0.2: -log(1-0.5) - log(1-0.9) - log(1-0.2)
    token_logps = t(math.log(0.5), math.log(0.9), -math.inf, math.log(0.5), math.log(0.9), math.log(0.2)).reshape(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = token_unlikelihood_loss(token_logps, mask, t(1.0, 0.0))
    close(out, [-math.log(0.5) - math.log(0.9), -math.log(0.5) - math.log(0.1) - math.log(0.8)], tol=1e-9)


def test_token_unlikelihood_p_half_same_for_both_kinds():
    # p = 0.5 -> -log 0.5 = -log(1 - 0.5) = log 2, per token; 2 tokens -> 2 log 2; float mask
    token_logps = torch.full((2, 2), math.log(0.5), dtype=D)
    out = token_unlikelihood_loss(token_logps, torch.ones(2, 2, dtype=D), t(1.0, 0.0))
    close(out, [2 * math.log(2), 2 * math.log(2)])


def test_token_unlikelihood_finite_when_p_is_one():
    # logp = 0 (p=1) on a negative: clamped to p = 1 - 1e-6 -> -log(1e-6) = 13.8155...
    token_logps = torch.zeros(1, 2, dtype=D, requires_grad=True)
    out = token_unlikelihood_loss(token_logps, torch.tensor([[True, False]]), t(0.0))
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(-math.log(1e-6), rel=1e-6)
    out.sum().backward()
    assert torch.isfinite(token_logps.grad).all()


def test_token_unlikelihood_low_precision_is_finite():
    token_logps = torch.tensor([[0.0, math.log(0.5)]], dtype=torch.bfloat16)
    out = token_unlikelihood_loss(token_logps, torch.tensor([[True, True]]), torch.tensor([0.0]))
    assert torch.isfinite(out).all()
    # -log(1e-6) + log 2 (bf16 input, float32 maths)
    assert out.item() == pytest.approx(-math.log(1e-6) + math.log(2), rel=1e-3)


# ---------------------------------------------------------------- group_mean


def test_group_mean_hand_values():
    losses = t(1.0, 2.0, 3.0, 4.0)
    is_pos = torch.tensor([True, False, True, False])
    # (1+3)/2 + (2+4)/2 = 2 + 3 = 5
    close(group_mean(losses, is_pos, n_pos=2, n_neg=2), 5.0)
    # 2*(1+3)/2 + 0.5*(2+4)/2 = 4 + 1.5 = 5.5
    close(group_mean(losses, is_pos, n_pos=2, n_neg=2, pos_weight=2.0, neg_weight=0.5), 5.5)
    # unbalanced counts 1 pos / 3 neg: losses [1 | 2, 3, 4] -> 1/1 + 9/3 = 4
    close(group_mean(losses, torch.tensor([True, False, False, False]), n_pos=1, n_neg=3), 4.0)
    # balance=False: (1+2+3+4)/4 = 2.5 ; weighted (2*4 + 0.5*6)/4 = 11/4
    close(group_mean(losses, is_pos, n_pos=2, n_neg=2, balance=False), 2.5)
    close(group_mean(losses, is_pos, n_pos=2, n_neg=2, pos_weight=2.0, neg_weight=0.5, balance=False), 2.75)
    # tensor counts (as after an all-reduce) give the same
    close(group_mean(losses, is_pos, n_pos=torch.tensor(2), n_neg=torch.tensor(2)), 5.0)
    assert group_mean(losses, is_pos, n_pos=2, n_neg=2).dim() == 0


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("kind", ["no_pos", "no_neg"])
def test_group_mean_one_group_missing_is_finite(kind, balance):
    losses = t(2.0, 4.0).requires_grad_()
    is_pos = torch.tensor([kind == "no_neg"] * 2)
    counts = dict(n_pos=0, n_neg=2) if kind == "no_pos" else dict(n_pos=2, n_neg=0)
    out = group_mean(losses, is_pos, **counts, balance=balance)
    close(out, 3.0)  # (2+4)/2, the missing group adds exactly 0
    out.backward()
    assert torch.isfinite(losses.grad).all()
    close(losses.grad, [0.5, 0.5])


def test_group_mean_empty_everything_is_zero():
    losses = torch.zeros(0, dtype=D, requires_grad=True)
    for balance in (True, False):
        out = group_mean(losses, torch.zeros(0, dtype=torch.bool), n_pos=0, n_neg=0, balance=balance)
        assert out.item() == 0.0
        out.backward()
        assert torch.isfinite(losses.grad).all()


def test_group_mean_inf_in_one_group_does_not_leak_when_other_group_empty():
    # A negative whose loss is inf must not turn the (empty) positive term into NaN.
    losses = t(math.inf, 1.0)
    out = group_mean(losses, torch.tensor([False, True]), n_pos=1, n_neg=0)
    close(out, 1.0)


@pytest.mark.parametrize("balance", [True, False])
def test_group_mean_micro_batches_add_up(balance):
    # Two micro-batches of one optimizer step; global counts 2 pos / 3 neg.
    l1, p1 = t(1.0, 2.0, 5.0), torch.tensor([True, False, False])
    l2, p2 = t(3.0, 7.0), torch.tensor([True, False])
    kw = dict(n_pos=2, n_neg=3, pos_weight=1.5, neg_weight=0.5, balance=balance)
    summed = group_mean(l1, p1, **kw) + group_mean(l2, p2, **kw)
    whole = group_mean(torch.cat([l1, l2]), torch.cat([p1, p2]), **kw)
    close(summed, whole.item(), tol=1e-12)
    # and by hand: balanced 1.5*(1+3)/2 + 0.5*(2+5+7)/3 = 3 + 7/3 ; plain (1.5*4 + 0.5*14)/5 = 13/5
    close(summed, 3.0 + 7.0 / 3.0 if balance else 13.0 / 5.0, tol=1e-12)


# ---------------------------------------------------------------- KTO and BCO (not in the paper)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_hand_values():
    """beta=0.1; logratios log pi - log pi_ref = [-10+12, -12+11, -8.5+9] = [2, -1, 0.5], labels [1, 0, 0].

    KL rows (mismatched prompt/response): policy [-5, -7, -6], reference [-6, -9, -6], so
    log pi - log pi_ref = [1, 2, 0], mean 1 = z0 (>= 0, kept).
      unit 0, desirable:   1 - sigma(0.1 * (2 - 1))    = 1 - sigma(0.10) = 0.4750208125
      unit 1, undesirable: 1 - sigma(0.1 * (1 - (-1))) = 1 - sigma(0.20) = 0.4501660027
      unit 2, undesirable: 1 - sigma(0.1 * (1 - 0.5))  = 1 - sigma(0.05) = 0.4875026035
    rewards = 0.1 * logratio = [0.2, -0.1, 0.05].
    """
    from ulma.losses import kto_loss

    losses, rewards = kto_loss(t(-10, -12, -8.5), t(-12, -11, -9), t(1, 0, 0), t(-5, -7, -6), t(-6, -9, -6), beta=0.1)
    close(losses, [1 - sigmoid(0.1), 1 - sigmoid(0.2), 1 - sigmoid(0.05)])
    close(losses, [0.4750208125, 0.4501660027, 0.4875026035], tol=1e-9)
    close(rewards, [0.2, -0.1, 0.05])


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    """KL rows with log pi - log pi_ref = [-1, -3]: mean -2, clamped to z0 = 0, so a desirable
    logratio of 2 costs 1 - sigma(0.1 * 2) = 0.4501660027; no gradient reaches the KL rows."""
    from ulma.losses import kto_kl_reference_point, kto_loss

    kl_policy = torch.tensor([-4.0, -6.0], dtype=D, requires_grad=True)
    assert float(kto_kl_reference_point(kl_policy, t(-3, -3))) == 0.0
    assert float(kto_kl_reference_point(t(-5, -7), t(-6, -9))) == 1.5  # mean of [1, 2]
    policy = torch.tensor([-10.0], dtype=D, requires_grad=True)
    loss, _ = kto_loss(policy, t(-12), t(1), kl_policy, t(-3, -3), beta=0.1)
    close(loss, [0.4501660027], tol=1e-9)
    loss.sum().backward()
    assert kl_policy.grad is None
    # d/dp [1 - sigma(0.1 (p - ref))] = -0.1 sigma(0.2) (1 - sigma(0.2))
    close(policy.grad, [-0.1 * sigmoid(0.2) * (1 - sigmoid(0.2))])


def test_kto_weights_and_the_loops_reduction_equal_trls_mean():
    """TRL: losses = cat(w_d * chosen_losses, w_u * rejected_losses); loss = mean.  ulma: the
    unweighted per-unit losses reduced by group_mean(balance=False, pos_weight=w_d,
    neg_weight=w_u).  Written here a second way, TRL's: chosen and rejected indexed apart."""
    from ulma.losses import kto_loss

    g = torch.Generator().manual_seed(0)
    policy, ref = -20 * torch.rand(6, generator=g, dtype=D), -20 * torch.rand(6, generator=g, dtype=D)
    kl_p, kl_r = -20 * torch.rand(6, generator=g, dtype=D), -20 * torch.rand(6, generator=g, dtype=D)
    labels = t(1, 0, 0, 1, 0, 1)
    w_d, w_u = 1.5, 0.75
    z0 = (kl_p - kl_r).mean().clamp(min=0)
    lr = policy - ref
    pos, neg = labels.bool(), ~labels.bool()
    trl = torch.cat([w_d * (1 - torch.sigmoid(0.1 * (lr[pos] - z0))), w_u * (1 - torch.sigmoid(0.1 * (z0 - lr[neg])))])
    weighted, _ = kto_loss(policy, ref, labels, kl_p, kl_r, beta=0.1, desirable_weight=w_d, undesirable_weight=w_u)
    close(torch.sort(weighted).values, torch.sort(trl).values, tol=1e-12)
    plain, _ = kto_loss(policy, ref, labels, kl_p, kl_r, beta=0.1)
    ours = group_mean(plain, pos, n_pos=3, n_neg=3, pos_weight=w_d, neg_weight=w_u, balance=False)
    close(ours, trl.mean(), tol=1e-12)


def test_bco_with_zero_shift_is_pointwise_dpo_eq8():
    """delta = 0: -log sigma(r) on desirable, -log sigma(-r) on undesirable = Eq. 8.
    By hand (r = 0.2): 0.5981388694 and 0.7981388694 (NLL_POS / NLL_NEG above); and on
    random log-probs against pointwise_dpo_loss."""
    from ulma.losses import bco_loss

    losses, rewards = bco_loss(t(-10, -10), t(-12, -12), t(1, 0), beta=0.1, delta=0.0)
    close(losses, [NLL_POS, NLL_NEG])
    close(rewards, [R, R])
    g = torch.Generator().manual_seed(1)
    policy, ref = -30 * torch.rand(8, generator=g, dtype=D), -30 * torch.rand(8, generator=g, dtype=D)
    labels = (torch.rand(8, generator=g) > 0.5).to(D)
    close(bco_loss(policy, ref, labels, beta=0.1)[0], pointwise_dpo_loss(policy, ref, labels, beta=0.1)[0], tol=1e-12)


def test_bco_shift_hand_values():
    """r = 0.2, delta = 0.3: desirable -log sigma(-0.1) = log(1 + e^0.1) = 0.7443966600,
    undesirable -log sigma(0.1) = log(1 + e^-0.1) = 0.6443966600; the same as point-wise DPO
    with log_z = -delta / beta = -3.  Rewards are the unshifted r."""
    from ulma.losses import bco_loss

    losses, rewards = bco_loss(t(-10, -10), t(-12, -12), t(1, 0), beta=0.1, delta=torch.tensor(0.3, dtype=D))
    close(losses, [math.log(1 + math.exp(0.1)), math.log(1 + math.exp(-0.1))])
    close(losses, [0.7443966600, 0.6443966600], tol=1e-9)
    close(rewards, [R, R])
    close(losses, pointwise_dpo_loss(t(-10, -10), t(-12, -12), t(1, 0), beta=0.1, log_z=-3.0)[0], tol=1e-12)


def test_bco_running_mean_moves_once_per_step_by_the_whole_step():
    """Step 1: micro-batches with rewards [0.2, -0.1] and [0.5], a stand-in [9] of weight 0:
    mean (0.2 - 0.1 + 0.5) / 3 = 0.2, read by step 2 only.  Step 2: [1, 1, 1, 1]:
    (0.6 + 4) / 7 = 0.6571428571.  state_dict / load_state_dict carry it exactly."""
    from ulma.methods import RunningMean

    s = RunningMean()
    assert s.mean == 0.0
    s.observe(t(0.2, -0.1))
    s.observe(t(0.5))
    s.observe(t(9.0), weight=0.0)
    assert s.mean == 0.0  # not before the step ends
    s.commit()
    assert s.mean == pytest.approx(0.2, abs=1e-12)
    s.observe(t(1, 1, 1, 1))
    s.commit(lambda x: x)
    assert s.mean == pytest.approx(4.6 / 7, abs=1e-12) and s.mean == pytest.approx(0.6571428571, abs=1e-10)
    again = RunningMean()
    again.load_state_dict(s.state_dict())
    assert again.mean == s.mean and again.count == 7

"""Reward-model losses and the pieces of PPO, as pure tensor functions.

Nothing here sees a config, a model or a device: tensors and floats in, tensors out.

Reward model (§3.2), ``r = r_phi(x, y)`` a scalar per response:

* Eq. 2, pairs:        ``-log sigma(r(x, y_w) - r(x, y_l))``            (Bradley-Terry)
* Eq. 7, binary z:     ``-z log sigma(r) - (1 - z) log(1 - sigma(r))``  (the paper prints
  ``log sigma(1 - r)``; that is a typo for ``log(1 - sigma(r))``, as Eq. 8 shows)
* Eq. 9, scores z:     ``(z - r)^2``

PPO on Eq. 3, ``max E[r(x, y)] - beta * KL(pi || pi_ref)``, with the KL taken per token:
the reward of token t is ``-beta * kl_t`` plus, on the last response token, the reward
model's score.  Per-token tensors are ``[N, R]`` over the R response positions of N
rollouts, with a ``mask [N, R]`` that is True on real response tokens (right padding:
every row's tokens come first).  Per-token losses are returned unreduced; the caller
takes :func:`masked_mean` (or a masked sum over a whole mini-batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bradley_terry_loss",
    "binary_reward_loss",
    "mse_reward_loss",
    "masked_mean",
    "masked_whiten",
    "kl_penalty",
    "shaped_rewards",
    "gae",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
]

KL_ESTIMATORS = ("k1", "k3")

# ------------------------------------------------------------------ reward model


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Eq. 2: ``-log sigma(r_w - r_l)``; ``chosen``, ``rejected``: ``[B]`` rewards -> ``[B]``.

    Equal rewards give ``log 2``; only the difference matters (shifting both changes nothing).
    """
    return -F.logsigmoid(chosen - rejected)


def binary_reward_loss(rewards: Tensor, labels: Tensor) -> Tensor:
    """Eq. 7 (typo fixed): ``-z log sigma(r) - (1-z) log(1 - sigma(r))``; ``[B], [B] -> [B]``.

    ``log(1 - sigma(r))`` is ``logsigmoid(-r)``, finite for any ``r``.
    """
    z = labels.to(rewards.dtype)
    return -z * F.logsigmoid(rewards) - (1 - z) * F.logsigmoid(-rewards)


def mse_reward_loss(rewards: Tensor, targets: Tensor) -> Tensor:
    """Eq. 9: ``(z - r)^2``; ``[B], [B] -> [B]``."""
    return (targets.to(rewards.dtype) - rewards) ** 2


# ------------------------------------------------------------------ masked statistics


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (same shape); 0 when none is True."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries; masked-out entries become 0.

    ``var`` is the unbiased (n - 1) variance, as in TRL.  ``shift_mean=False`` only rescales
    (keeps the mean), for rewards.  Example: ``[1, 2, 3]`` -> ``[-1, 0, 1]``.
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ------------------------------------------------------------------ PPO pieces


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the sampled token's log-probs.

    ``logps``, ``ref_logps``: ``[N, R]`` log pi(y_t | ...) and log pi_ref(y_t | ...) of
    tokens sampled from pi.  ``k1 = log pi - log pi_ref`` (unbiased, can be negative per
    token); ``k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (unbiased and
    >= 0, Schulman's estimator).  Both are exactly 0 where the two are equal.
    """
    diff = logps - ref_logps
    if estimator == "k1":
        return diff
    if estimator == "k3":
        return torch.expm1(-diff) + diff  # exp(-d) - 1 + d, accurate for small d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards of Eq. 3: ``-beta * kl_t``, plus ``score`` on each row's last token.

    ``scores``: ``[N]`` reward-model scores; ``kl``: ``[N, R]`` per-token KL estimate;
    ``mask``: ``[N, R]`` (right-padded).  A row with no response token gets nothing.
    Returns ``[N, R]``, 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -beta * kl * m
    length = mask.long().sum(-1)
    last = (length - 1).clamp(min=0)
    bonus = torch.where(length > 0, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last[:, None], bonus[:, None])


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` taken as 0 after a row's last token (the episode ends there).
    ``rewards``, ``values``, ``mask``: ``[N, R]``.  Returns ``(advantages, returns)``, both
    ``[N, R]``, 0 on padding; ``returns = advantages + values`` (the value target).
    """
    m = mask.to(values.dtype)
    v = values * m  # garbage values on padding must not leak into delta
    r = rewards * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + v) * m


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, per token.

    ``ratio = exp(logps - old_logps)``; ``loss = max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))``.
    All inputs ``[N, R]``.  Returns ``(loss [N, R], clipped [N, R] bool)``, where ``clipped``
    marks the tokens whose clipped term won (they get no gradient).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss, per token: ``0.5 * max((V - G)^2, (V_clip - G)^2)``.

    ``V_clip = old_V + clip(V - old_V, -eps, eps)``: the value may not move further than
    ``eps`` from the rollout's value without paying for it.  Inputs ``[N, R]``.  Returns
    ``(loss [N, R], clipped [N, R] bool)``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), b > a


@torch.no_grad()
def entropy_from_logits(logits: Tensor, chunk_rows: int = 4) -> Tensor:
    """Entropy of the next-token distribution, ``logsumexp(l) - sum softmax(l) * l``.

    ``logits``: ``[N, R, V]`` -> ``[N, R]`` float32.  Computed in chunks of rows so a
    float32 copy of the whole ``[N, R, V]`` tensor is never held; no gradient (it is logged,
    not optimised).
    """
    out = []
    for s in range(0, logits.shape[0], chunk_rows):
        lg = logits[s : s + chunk_rows].float()
        p = torch.softmax(lg, dim=-1)
        out.append(torch.logsumexp(lg, dim=-1) - (p * lg).sum(-1))
    return torch.cat(out)

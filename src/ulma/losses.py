"""Loss functions of the ULMA paper and its baselines, as pure tensor functions.

Conventions (shared by every function here):

* Inputs are per-example log-probabilities ``log pi(y|x)`` of shape ``[B]``
  (one number per response), already computed by the caller from the policy
  and the reference model. Whether such a number is the *sum* or the *mean* of
  the response's token log-probs is the caller's choice: the paper writes sums,
  while the authors' code uses the mean for point-wise DPO / ULMA / Unlearning
  and the sum for pair-wise DPO. Nothing here depends on which one is used,
  but ``beta`` acts on a different scale in the two cases.
* Every loss returns per-example values of shape ``[B]`` with **no
  reduction**; the training loop reduces them (see :func:`group_mean`, which
  averages positives and negatives separately as the authors' code does).
* ``beta`` is the KL strength (0.1 throughout the paper). ``log_z`` is the
  paper's ``log Z(x)`` of Eq. 4, entering the implicit reward as
  ``beta * log_z``; the paper takes ``Z(x) ~= 1`` (Appendix A), so the default
  is 0. It may be a float or a ``[B]`` tensor.
* Labels ``z`` are float tensors of shape ``[B]``: 1 = positive / preferred,
  0 = negative / dispreferred, or a score for the continuous losses.
* Rewards returned next to losses are the implicit rewards, **detached**:
  they are for logging and metrics, never for back-propagation.
* ``log(1 - sigma(r))`` is written ``logsigmoid(-r)`` and ``log sigma(r)`` is
  ``logsigmoid(r)``: both stay finite and accurate for large ``|r|``, where
  ``log(1 - torch.sigmoid(r))`` would round to ``log(0)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "implicit_reward",
    "sft_loss",
    "dpo_loss",
    "pointwise_dpo_loss",
    "pointwise_dpo_mse_loss",
    "ulma_loss",
    "ulma_continuous_loss",
    "unlearning_loss",
    "unlikelihood_loss",
    "token_unlikelihood_loss",
    "positive_dpo_loss",
    "negative_dpo_loss",
    "kto_kl_reference_point",
    "kto_loss",
    "bco_loss",
    "group_mean",
    "weighted",
]

ULMA_CONTINUOUS_FORMS = ("paper", "authors")

# Largest log p allowed inside log(1 - p) in token_unlikelihood_loss:
# log(1 - 1e-6). Caps each negative token's loss at -log(1e-6) ~= 13.8.
_MAX_LOGP_FOR_LOG1M = math.log1p(-1e-6)


def implicit_reward(
    policy_logps: Tensor, ref_logps: Tensor, beta: float = 0.1, log_z: float | Tensor = 0.0
) -> Tensor:
    """Implicit reward of DPO, Eq. 4: ``r_hat = beta*(log pi - log pi_ref) + beta*log Z``.

    Args:
        policy_logps: ``[B]`` log pi_theta(y|x).
        ref_logps: ``[B]`` log pi_ref(y|x).
        beta: KL strength.
        log_z: ``log Z(x)`` (float or ``[B]``); the added term is ``beta * log_z``.

    Returns:
        ``[B]`` reward, attached to the graph (callers that log it detach it).
    """
    return beta * (policy_logps - ref_logps) + beta * log_z


def sft_loss(policy_logps: Tensor) -> Tensor:
    """SFT negative log-likelihood, §3.1: ``-log pi(y|x)``; ``[B] -> [B]``."""
    return -policy_logps


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair-wise DPO, Eq. 5: ``-log sigma(beta*logratio(y_w) - beta*logratio(y_l))``.

    All four inputs are ``[B]`` log-probs of the chosen (y_w) / rejected (y_l)
    response under the policy / reference. ``log Z(x)`` cancels in the
    difference, so it has no argument here.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the
        rewards are ``beta*(policy - ref)``, detached.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pointwise_dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    log_z: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """Point-wise DPO with binary labels, Eq. 8.

    ``loss = -z*log sigma(r_hat) - (1-z)*log(1 - sigma(r_hat))``: binary
    cross-entropy of the label against ``sigma(r_hat)`` (Eq. 7 with the reward
    model replaced by the implicit reward; Eq. 7's ``log sigma(1 - r)`` is a
    typo for ``log(1 - sigma(r))``, as Eq. 8 shows).

    Args:
        policy_logps, ref_logps: ``[B]`` log-probs.
        labels: ``[B]`` float, 1 = positive, 0 = negative. Soft labels in
            ``[0, 1]`` are accepted too (a label-smoothed cross-entropy whose
            minimum is at ``sigma(r_hat) = z``).

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``r_hat`` detached.
    """
    rewards = implicit_reward(policy_logps, ref_logps, beta, log_z)
    z = labels.to(rewards.dtype)
    losses = -z * F.logsigmoid(rewards) - (1 - z) * F.logsigmoid(-rewards)
    return losses, rewards.detach()


def pointwise_dpo_mse_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    log_z: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """Point-wise DPO with continuous labels: Eq. 9 with ``r = r_hat``, ``(z - r_hat)^2``.

    ``labels`` is a ``[B]`` float score, regressed directly by the implicit
    reward, so its scale matters (rescale scores to the range ``r_hat`` can
    reach with the chosen ``beta``).

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``r_hat`` detached.
    """
    rewards = implicit_reward(policy_logps, ref_logps, beta, log_z)
    losses = (labels.to(rewards.dtype) - rewards) ** 2
    return losses, rewards.detach()


def ulma_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    log_z: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """ULMA with binary labels, §4.3: ``-z*log pi(y|x) - (1-z)*log(1 - sigma(r_hat))``.

    Positives get plain SFT (no KL regulariser, to exploit high-quality
    demonstrations); negatives get the negative half of point-wise DPO (the
    regulariser keeps unlearning from running away). ``labels``: ``[B]`` float
    in {0, 1}.

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``r_hat`` detached.
    """
    rewards = implicit_reward(policy_logps, ref_logps, beta, log_z)
    z = labels.to(rewards.dtype)
    losses = -z * policy_logps - (1 - z) * F.logsigmoid(-rewards)
    return losses, rewards.detach()


def ulma_continuous_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    is_positive: Tensor,
    *,
    beta: float = 0.1,
    log_z: float | Tensor = 0.0,
    form: str = "paper",
) -> tuple[Tensor, Tensor]:
    """ULMA with continuous labels, §4.3: MSE of point-wise DPO plus SFT on the best samples.

    Args:
        policy_logps, ref_logps: ``[B]`` log-probs.
        labels: ``[B]`` float scores (regressed by ``r_hat``).
        is_positive: ``[B]`` bool, True for the best-rated samples (e.g.
            red-team rating 0), which also get the SFT term.
        form: ``"paper"`` = ``(z - r_hat)^2`` on all samples ``+ (-log pi)``
            on positives (the text of §4.3). ``"authors"`` = ``(z - r_hat)^2``
            only on non-positives ``+ (-log pi)`` on positives (what the
            authors' public code does).

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``r_hat`` detached.

    Raises:
        ValueError: on an unknown ``form``.
    """
    if form not in ULMA_CONTINUOUS_FORMS:
        raise ValueError(f"unknown ULMA continuous form {form!r}; expected one of {ULMA_CONTINUOUS_FORMS}")
    mse, rewards = pointwise_dpo_mse_loss(policy_logps, ref_logps, labels, beta=beta, log_z=log_z)
    pos = is_positive.to(torch.bool)
    zero = torch.zeros_like(mse)
    nll = torch.where(pos, -policy_logps, zero)
    if form == "authors":
        # torch.where (not a 0/1 product) so a huge MSE on a positive
        # cannot leak inf*0 = NaN into the loss.
        mse = torch.where(pos, zero, mse)
    return mse + nll, rewards


def unlearning_loss(policy_logps: Tensor) -> Tensor:
    """Unlearning baseline, §5.1: ``+log pi(y|x)`` (minimise the likelihood of dispreferred samples).

    ``[B] -> [B]``. Unbounded below: nothing stops it but the step count,
    which is the point the paper's ablation (Table 3) makes against it.
    """
    return policy_logps


def unlikelihood_loss(policy_logps: Tensor, labels: Tensor) -> Tensor:
    """The paper's "Unlikelihood" baseline, §5.1: SFT on positives + Unlearning on negatives.

    ``loss = -z*log pi + (1-z)*log pi``, i.e. ``-log pi`` for ``z=1`` and
    ``+log pi`` for ``z=0``. ``labels``: ``[B]`` float in {0, 1}. This is
    sequence-level; for Welleck et al.'s token-level version see
    :func:`token_unlikelihood_loss`.
    """
    z = labels.to(policy_logps.dtype)
    return -z * policy_logps + (1 - z) * policy_logps


def token_unlikelihood_loss(token_logps: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Token-level unlikelihood (Welleck et al., 2019), summed over response tokens.

    Per token, positives get ``-log p(y_t)`` and negatives ``-log(1 - p(y_t))``.

    Args:
        token_logps: ``[B, T]`` log-prob of the actual token at each position.
        mask: ``[B, T]`` bool/float, true on response tokens; other positions
            are ignored even if they hold ``-inf`` or garbage.
        labels: ``[B]`` float, 1 = positive, 0 = negative.

    Returns:
        ``[B]`` per-example sum over masked tokens; divide by the token count
        yourself for a mean.

    ``log(1 - p)`` is ``log(-expm1(logp))`` with ``logp`` clamped to
    ``<= log(1 - 1e-6)``: as ``p -> 1`` the exact value goes to ``-inf``, so the
    clamp caps a negative token's loss at ``-log(1e-6) ~= 13.8`` (and gives it a
    zero gradient above the cap). Computed in float32 at least, since
    ``log(1 - 1e-6)`` rounds to 0 in bf16/fp16.
    """
    logp = token_logps.float() if token_logps.dtype in (torch.float16, torch.bfloat16) else token_logps
    z = labels.to(logp.dtype).unsqueeze(-1)  # [B, 1], broadcast over tokens
    log1m_p = torch.log(-torch.expm1(logp.clamp(max=_MAX_LOGP_FOR_LOG1M)))
    per_token = -z * logp - (1 - z) * log1m_p
    # where (not a product with the mask) so non-finite padding cannot give NaN.
    per_token = torch.where(mask.to(torch.bool), per_token, torch.zeros_like(per_token))
    return per_token.sum(dim=-1)


def positive_dpo_loss(
    policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1, log_z: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """Table 3 ablation "Positive DPO": point-wise DPO (Eq. 8) with every label 1.

    ``loss = -log sigma(r_hat)``. Returns ``(losses [B], rewards [B])``.
    """
    labels = torch.ones_like(policy_logps)
    return pointwise_dpo_loss(policy_logps, ref_logps, labels, beta=beta, log_z=log_z)


def negative_dpo_loss(
    policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1, log_z: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """Table 3 ablation "Negative DPO": point-wise DPO (Eq. 8) with every label 0.

    ``loss = -log(1 - sigma(r_hat))``. Returns ``(losses [B], rewards [B])``.
    """
    labels = torch.zeros_like(policy_logps)
    return pointwise_dpo_loss(policy_logps, ref_logps, labels, beta=beta, log_z=log_z)


def kto_kl_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, detached.

    An estimate of KL(pi || pi_ref) from mismatched (prompt, completion) pairs ``(x, y')``
    (Ethayarajh et al. 2024, §4.1; TRL's ``KTOTrainer``: the batch's completions shifted by
    one). No gradient flows through it. ``[K], [K] -> 0-dim``; ``K = 0`` gives 0.
    """
    diff = (kl_policy_logps - kl_ref_logps).detach()
    if diff.numel() == 0:
        return diff.new_zeros(())
    return diff.mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7 of their paper), as TRL's ``KTOTrainer`` computes it.

    With ``logratio = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0``
    (:func:`kto_kl_reference_point`, detached):

    * desirable (``z = 1``): ``w_d * (1 - sigma(beta * (logratio - z0)))``
    * undesirable (``z = 0``): ``w_u * (1 - sigma(beta * (z0 - logratio)))``

    Args:
        policy_logps, ref_logps: ``[B]`` log-probs of the units' own (x, y).
        labels: ``[B]`` float in {0, 1}.
        kl_policy_logps, kl_ref_logps: ``[K]`` log-probs of mismatched (x, y') rows.
        desirable_weight, undesirable_weight: ``w_d`` / ``w_u``. TRL takes the plain mean
            of the weighted losses, which is :func:`group_mean` with ``balance=False``,
            ``pos_weight=w_d``, ``neg_weight=w_u`` on the unweighted losses; the registry
            (``ulma.methods``) leaves the weights to that reduction.

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``beta * logratio`` detached (as TRL logs).

    Example (beta=0.1): logratios ``[2, -1]``, labels ``[1, 0]``, KL rows with
    ``log pi - log pi_ref = [1, 2]`` give ``z0 = 1.5``; desirable loss
    ``1 - sigma(0.05) = 0.487503``, undesirable ``1 - sigma(0.25) = 0.437823``.
    """
    z0 = kto_kl_reference_point(kl_policy_logps, kl_ref_logps).to(policy_logps.dtype)
    logratio = policy_logps - ref_logps
    z = labels.to(logratio.dtype)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    losses = z * desirable + (1 - z) * undesirable
    return losses, (beta * logratio).detach()


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    delta: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization"), as TRL's ``bco_loss``.

    A binary classifier on the implicit reward ``r = beta * (log pi - log pi_ref)`` shifted
    by ``delta``: ``-log sigma(r - delta)`` for desirable (``z = 1``) and
    ``-log sigma(-(r - delta))`` for undesirable (``z = 0``) samples. TRL's ``delta`` is the
    running mean of the rewards seen so far (``RunningMoments``); here it is an argument and
    the caller keeps the state (``ulma.methods.RunningMean``). With ``delta = 0`` this is
    point-wise DPO with binary labels, Eq. 8 (``log_z = 0``); a constant ``delta`` is
    point-wise DPO with ``log_z = -delta / beta``.

    TRL's optional underlying-distribution matching (UDM: a classifier on prompt
    embeddings that re-weights undesirable samples) is not implemented.

    Args:
        policy_logps, ref_logps: ``[B]`` log-probs.
        labels: ``[B]`` float in {0, 1}.
        delta: the reward shift (float or 0-dim tensor), treated as a constant.

    Returns:
        ``(losses [B], rewards [B])``, rewards = ``r`` (unshifted) detached.
    """
    rewards = implicit_reward(policy_logps, ref_logps, beta)
    shifted = rewards - torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device).detach()
    z = labels.to(rewards.dtype)
    losses = -z * F.logsigmoid(shifted) - (1 - z) * F.logsigmoid(-shifted)
    return losses, rewards.detach()


def group_mean(
    losses: Tensor,
    is_positive: Tensor,
    *,
    n_pos: int | float | Tensor,
    n_neg: int | float | Tensor,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    balance: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Reduce per-example losses ``[B]`` to a scalar, positives and negatives apart.

    ``balance=True`` (the authors' code): ``pos_weight * sum(losses[pos]) / n_pos
    + neg_weight * sum(losses[neg]) / n_neg`` -- the mean over positives plus
    the mean over negatives, so an unbalanced data set does not let the larger
    group dominate. ``balance=False``: ``(pos_weight*sum(pos) +
    neg_weight*sum(neg)) / (n_pos + n_neg)``, a plain weighted mean.

    ``n_pos`` / ``n_neg`` are the GLOBAL counts over the whole optimizer step
    (all micro-batches of the gradient accumulation and all processes), not
    this micro-batch's: then the micro-batch results simply add up to the
    global value. A group whose global count is 0 contributes exactly 0 (no
    NaN, zero gradient); with both counts 0 the result is 0.

    Example: one step of two micro-batches, losses ``[1, 2]`` (pos, neg) and
    ``[3]`` (neg); global ``n_pos=1, n_neg=2``. balance=True gives
    ``(1/1 + 2/2) + (3/2) = 1 + 2.5 = 3.5`` = mean(pos) + mean(neg);
    balance=False gives ``(1+2)/3 + 3/3 = 2`` = mean of all three.

    ``weights`` (per-example weights ``w >= 0``, the data's ``weight`` column): each loss
    counts ``w`` times, so ``n_pos`` / ``n_neg`` are then the global SUMS of the weights
    of each group and each mean becomes the weighted mean ``sum(w*l) / sum(w)``.  With
    every weight 1 (or None) the result is the unweighted one, bit for bit.  Example:
    losses ``[4, 6]``, both positive, weights ``[2, 0]``, ``n_pos=2``:
    ``(2*4 + 0*6) / 2 = 4``, the loss of the first example alone.

    Args:
        losses: ``[B]`` per-example losses.
        is_positive: ``[B]`` bool (or 0/1) group of each example.
        weights: ``[B]`` float, or None (every weight 1).

    Returns:
        A 0-dim tensor.
    """
    if weights is not None:
        losses = weighted(losses, weights)
    pos = is_positive.to(device=losses.device, dtype=torch.bool)
    zero = torch.zeros_like(losses)
    # where (not a mask product) keeps an inf/NaN in one group out of the other.
    sum_pos = pos_weight * torch.where(pos, losses, zero).sum()
    sum_neg = neg_weight * torch.where(pos, zero, losses).sum()

    def safe_div(num: Tensor, count) -> Tensor:
        # Tensor counts (e.g. all-reduced) are handled without a host sync.
        # The denominator is swapped to 1 where the count is 0, so 0/0 never
        # appears, not even in the backward (where() alone would give NaN there).
        c = torch.as_tensor(count, dtype=losses.dtype, device=losses.device)
        return torch.where(c > 0, num / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(num))

    if balance:
        return safe_div(sum_pos, n_pos) + safe_div(sum_neg, n_neg)
    n_total = torch.as_tensor(n_pos, dtype=losses.dtype, device=losses.device) + torch.as_tensor(
        n_neg, dtype=losses.dtype, device=losses.device
    )
    return safe_div(sum_pos + sum_neg, n_total)


def weighted(losses: Tensor, weights: Tensor) -> Tensor:
    """``w * l`` per example (``[B], [B] -> [B]``), exactly 0 where ``w == 0``: an example
    of weight 0 counts for nothing even when its loss is inf or NaN (``0 * inf`` is NaN)."""
    w = weights.to(device=losses.device, dtype=losses.dtype)
    return torch.where(w > 0, losses * w, torch.zeros_like(losses))
